"""Packed preference pairs (dpo's and rm's default): whole pairs share rows, each document computed as it would be alone, so a
packed step equals the same pairs unpacked: log-probabilities, losses, DPO statistics, the reference's log-probs
(model or precomputed table), a reward model's scores and losses, gradients, validation figures; resumed and on 2 ranks as one process."""

import json
import math
import random

import pytest
import torch

import prepare
import train
from llm_trainer import stages
from llm_trainer.training import losses
from tests.helpers import TINY, metrics, run_train, sigkill_after_checkpoint, train_losses, val_losses


def build(data_dir, out_dir, **overrides):
    keys = {"data_dir": data_dir, "out_dir": out_dir, "stage": "dpo", "dim": 64, "n_layers": 2, "n_heads": 4,
            "n_kv_heads": 2, "block_size": 128, "batch_size": 4, "warmup_iters": 0, "grad_clip": 0.0,
            "verify_data": False, "learning_rate": 1e-4, "eval_iters": 3, **overrides}
    run = train.build(train.configure([f"--{k}={v}" for k, v in keys.items()]))
    with torch.no_grad():  # the policy off its reference (built above from the same weights): every pair's loss its own
        for p in run.raw_model.parameters():
            p += 0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
    return run


WORDS = "the river stone music light ocean tree cloud apple banana cherry green quiet bright".split()


@pytest.fixture(scope="module")
def varied_pairs(demo_pretrain, tmp_path_factory):
    """A preference set of pairs of very different lengths, at block 64: short ones (several fit a row), ones with a
    side cut at 65 tokens, and prompts that fill the row (no target left)."""
    root = tmp_path_factory.mktemp("varied_pairs")
    rng = random.Random(0)

    def text(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    shapes = [(1, 1, 2), (2, 5, 1), (1, 1, 1), (30, 2, 2), (2, 25, 2), (1, 2, 25), (3, 6, 4), (1, 2, 2)]
    for split, n in (("train", 40), ("val", 16)):
        with open(root / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i in range(n):
                prompt, chosen, rejected = shapes[i % len(shapes)]
                f.write(json.dumps({"prompt": text(prompt), "chosen": text(chosen), "rejected": text(rejected)}) + "\n")
    out = str(root / "data")
    prepare.main([f"--input={root / 'train.jsonl'}", f"--val_input={root / 'val.jsonl'}", f"--out_dir={out}",
                  f"--tokenizer={demo_pretrain}", "--workers=1"])
    return out


def fixed_pairs(batches):
    """The first 16 pairs (all the shapes twice): one in eight has a prompt that fills its row (no target), one in
    four a side cut at block_size+1 tokens."""
    pairs = list(range(16))
    full = batches.split.doc_ends - batches.split.doc_starts
    kept = batches.split.row_targets(batches.T + 1)
    assert sum(not (kept[2 * k] and kept[2 * k + 1]) for k in pairs) == 2
    assert sum(max(full[2 * k], full[2 * k + 1]) > batches.T + 1 for k in pairs) >= 4
    return pairs


@pytest.mark.parametrize("rope_scaling", [None, {"type": "dynamic", "factor": 2.0, "original_max_seq_len": 64}])
def test_packed_pairs_equal_the_same_pairs_unpacked(rope_scaling, varied_pairs, tmp_path):
    """Per pair: the policy's and the reference's log-probs, the DPO loss and statistics (fp32, 1e-5), which pairs
    count, the chosen replies' bytes; and the gradients of the summed loss. Dynamic NTK too: a row of pairs is longer
    than block_size, its documents are not."""
    run = build(varied_pairs, str(tmp_path), rope_scaling=rope_scaling, block_size=64)
    batches, beta = run.train_batches, run.cfg["dpo_beta"]
    rows = batches.packed(fixed_pairs(batches))
    packed = batches.batch(rows)
    unpacked = batches.batch([p for row in rows for p in row])  # the same pairs in the same order, one per row pair
    assert packed.x.shape == (len(rows), 2 * (batches.T + 1))
    assert len(rows) < 16 and max(map(len, rows)) >= 2  # packed: fewer rows than pairs, several pairs in some
    assert torch.equal(packed.units, unpacked.units)
    assert packed.real == pytest.approx(unpacked.real, rel=0.1) and packed.x.numel() < unpacked.x.numel()

    def terms(batch):
        logps = losses.sequence_logps(run.model, batch)
        ref = run.reference.logps(batch, "train")
        per_pair, stats = losses.dpo_terms(logps, ref, beta)
        return logps, ref, per_pair, stats, losses.dpo_loss(run.model, batch, ref, beta)[0]

    (lp, ref_p, loss_p, stats_p, total_p), (lu, ref_u, loss_u, stats_u, total_u) = terms(packed), terms(unpacked)
    assert torch.allclose(lp, lu, atol=1e-5, rtol=1e-5) and torch.allclose(ref_p, ref_u, atol=1e-5, rtol=1e-5)
    kept = losses.pair_has_targets(unpacked)  # a pair with no target is ln 2 whatever the weights
    assert torch.allclose(loss_p, loss_u, atol=1e-5, rtol=0) and (loss_u - math.log(2)).abs()[kept].min() > 1e-4
    for k in losses.DPO_STATS:
        assert torch.allclose(stats_p[k], stats_u[k], atol=1e-5, rtol=1e-5), k
    assert torch.equal(losses.pair_has_targets(packed), losses.pair_has_targets(unpacked))
    assert losses.target_count(packed, pairs=True) == losses.target_count(unpacked, pairs=True) == 14
    if run.token_bytes is not None:
        assert losses.target_bytes(packed, run.token_bytes, True) == losses.target_bytes(unpacked, run.token_bytes,
                                                                                         True)
    assert total_p.item() == pytest.approx(total_u.item(), rel=1e-5)
    params = [p for p in run.raw_model.parameters()]
    for a, b in zip(torch.autograd.grad(total_p, params), torch.autograd.grad(total_u, params)):
        assert (a - b).norm() <= 1e-5 * b.norm(), ((a - b).norm() / b.norm()).item()


def test_packed_rm_scores_and_losses_equal_the_same_pairs_unpacked(varied_pairs, tmp_path):
    """stage rm: per pair, the reward model's scores (read at each document's last token), the Bradley-Terry loss with
    margins and centring, and its statistics (fp32, 1e-5); the gradients of the summed loss."""
    run = build(varied_pairs, str(tmp_path), stage="rm", block_size=64, center_rewards_coefficient=0.1)
    batches, pad = run.train_batches, run.train_batches.pad_id
    assert run.cfg["pack"] is True  # rm's default, as dpo's
    rows = batches.packed(fixed_pairs(batches))
    packed, unpacked = batches.batch(rows), batches.batch([p for row in rows for p in row])
    assert packed.x.shape == (len(rows), 2 * (batches.T + 1)) and len(rows) < 16
    margins = torch.rand(16, generator=torch.Generator().manual_seed(0))[packed.units]  # each pair its own

    def terms(batch):
        r = losses.document_scores(run.model, batch, pad)
        per_pair, stats = losses.rm_terms(r, margins, 0.1)
        return r, per_pair, stats, losses.rm_loss(run.model, batch, pad, margins, 0.1)[0]

    (rp, loss_p, stats_p, total_p), (ru, loss_u, stats_u, total_u) = terms(packed), terms(unpacked)
    assert torch.allclose(rp, ru, atol=1e-5, rtol=1e-5) and ru.std() > 1e-3  # the documents score differently
    assert torch.allclose(loss_p, loss_u, atol=1e-5, rtol=1e-5)
    for k in losses.RM_STATS:
        assert torch.allclose(stats_p[k], stats_u[k], atol=1e-5, rtol=1e-5), k
    assert total_p.item() == pytest.approx(total_u.item(), rel=1e-5)
    params = [p for p in run.raw_model.parameters()]
    for a, b in zip(torch.autograd.grad(total_p, params), torch.autograd.grad(total_u, params)):
        assert (a - b).norm() <= 1e-5 * b.norm(), ((a - b).norm() / b.norm()).item()


@pytest.mark.slow
def test_precomputed_reference_tables_are_the_same_packed_or_not(demo_dpo, tmp_path):
    """The table is computed on packed rows (fewer positions): it equals the unpacked one and the reference model."""
    tables = {pack: build(demo_dpo, str(tmp_path), pack=pack, dpo_precompute_ref=True).reference.tables
              for pack in (True, False)}
    for split in ("train", "val"):
        assert torch.allclose(tables[True][split], tables[False][split], atol=1e-5, rtol=1e-5), split
        assert tables[True][split].abs().min() > 0  # every pair scored
    run = build(demo_dpo, str(tmp_path))  # the reference model, on a packed training batch
    batch = run.train_batches.get(0)
    table = tables[True]["train"][batch.units]
    assert torch.allclose(run.reference.logps(batch, "train"), table.T.reshape(-1), atol=1e-5, rtol=1e-5)


def test_a_packed_dpo_step_equals_the_same_pairs_unpacked(demo_dpo, tmp_path):
    """One optimizer step on a packed micro-batch and on its pairs one per row pair: the same loss (a mean over the
    pairs), the same DPO statistics, the same weights after the step."""
    packed = build(demo_dpo, str(tmp_path))
    rows = [packed.train_batches.unit(g) for g in range(packed.train_batches.B)]
    pairs = [p for row in rows for p in row]
    unpacked = build(demo_dpo, str(tmp_path), pack=False, batch_size=len(pairs))
    for run, batch in ((packed, packed.train_batches.batch(rows)), (unpacked, unpacked.train_batches.batch(pairs))):
        run.prefetched = {0: (losses.batch_counts(batch, pairs=True), [batch])}
    a, b = train.train_step(packed, 0), train.train_step(unpacked, 0)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["target_tokens"] == b["target_tokens"]
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    for k in losses.DPO_STATS:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    assert a["fill"] > 2 * b["fill"]
    # AdamW's first step is about lr x sign(gradient): a gradient near 0 may round to either sign, by 1e-4 at most
    for p, q in zip(packed.raw_model.parameters(), unpacked.raw_model.parameters()):
        assert torch.allclose(p, q, atol=1e-5), (p - q).abs().max().item()


@pytest.mark.parametrize("stage, figure", [("dpo", "val_rewards/margins"), ("rm", "val_accuracy")])
def test_validation_figures_are_the_same_packed_or_not(stage, figure, demo_dpo, tmp_path):
    packed, unpacked = (build(demo_dpo, str(tmp_path), stage=stage, pack=p, batch_size=16) for p in (True, False))
    assert packed.val_batches.get(0).x.numel() < unpacked.val_batches.get(0).x.numel() / 2
    a, b = train.evaluate(packed), train.evaluate(unpacked)
    assert a.keys() == b.keys() and figure in a and ("val_bpb" in a) == (stage == "dpo")
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


def test_pack_is_dpo_default_and_the_plan_says_how_rows_hold_pairs(demo_dpo, tmp_path, capsys):
    cfg = train.configure(["--stage=dpo", "--block_size=48", "--batch_size=4", "--gradient_accumulation_steps=2"])
    assert cfg["pack"] is True and stages.get("dpo").packs
    assert stages.tokens_per_step(cfg) == 4 * 2 * 49 * 2
    assert stages.tokens_per_step({**cfg, "pack": False}) == 4 * 2 * 48 * 2
    fill = {}
    for pack in (True, False):
        run = build(demo_dpo, str(tmp_path), pack=pack)
        train.print_plan(run)
        fill[pack] = run.train_batches.expected_fill()
    out = capsys.readouterr().out
    assert "4 rows x 258 (whole pairs, 2 x (block_size+1)) x 1 micro-steps" in out, out
    assert "4 pairs x 2 rows (chosen, rejected) x 128 x 1 micro-steps" in out, out
    assert fill[True] > 0.9 and fill[True] > 1.5 * fill[False]


def dpo_args(data, out, *extra):
    return [f"--data_dir={data}", f"--out_dir={out}", "--stage=dpo", *TINY, "--eval_iters=3", "--device=cpu", *extra]


@pytest.mark.slow
def test_packed_dpo_resumed_after_sigkill_equals_the_uninterrupted_run(demo_dpo, tmp_path):
    args = [a for a in dpo_args(demo_dpo, "", "--max_iters=8", "--eval_interval=4", "--learning_rate=3e-3",
                                "--block_size=128") if a != "--out_dir="]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    run_train([*args, f"--out_dir={ref}"])
    sigkill_after_checkpoint([*args, f"--out_dir={out}"], 4)
    run_train([*args, f"--out_dir={out}", "--init_from=resume"])
    want, got = train_losses(ref), train_losses(out)
    assert sorted(got) == list(range(1, 9)) and got == want, (want, got)  # bit for bit
    assert val_losses(out) == val_losses(ref)
    assert min(r["fill"] for r in metrics(ref) if "fill" in r) > 0.7  # packed (one pair a row: 0.28)


@pytest.mark.slow
def test_packed_dpo_on_two_ranks_equals_one_process(demo_dpo, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = ["--max_iters=3", "--eval_interval=3", "--learning_rate=1e-3", "--gradient_accumulation_steps=2"]
    run_train(dpo_args(demo_dpo, one, *args))
    run_train(dpo_args(demo_dpo, two, *args), nproc=2)
    l1, l2 = train_losses(one), train_losses(two)
    assert sorted(l1) == sorted(l2) == [1, 2, 3]
    assert all(abs(l1[i] - l2[i]) <= 1e-5 for i in l1), (l1, l2)
    e1, e2 = ([r for r in metrics(d) if "val_loss" in r][-1] for d in (one, two))
    for k in ("val_loss", "val_rewards/margins", "val_rewards/accuracies", "val_bpb"):
        assert e1[k] == pytest.approx(e2[k], abs=1e-5), k


@pytest.fixture
def keep_threads():
    """bench.py --threads sets torch's thread count for the process: give the next tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_bench_dpo_mode_compares_packed_with_padded_pairs(tmp_path, keep_threads):
    import bench
    from tests.helpers import BENCH_SMALL as SMALL

    path = tmp_path / "bench.json"
    bench.main(SMALL + ["--dpo=True", "--sft_docs=100", "--block_size=64", "--rounds=2", f"--json={path}"])
    fig = json.loads(path.read_text())["figures"]
    assert list(fig) == bench.DPO_KEYS and all(v is not None for v in fig.values())
    assert fig["dpo.documents"] == 200 and fig["dpo.tokens_per_step"] == 2 * 130 * 2
    assert fig["dpo.packed.fill"] > 0.8 > 0.3 > fig["dpo.padded.fill"]  # short pairs: a side is ~ block/8
    assert fig["dpo.packed_over_padded"] == pytest.approx(
        fig["dpo.packed.target_tokens_per_s"] / fig["dpo.padded.target_tokens_per_s"])
