"""Post-training stages in the one loop: long-context SFT with RoPE scaling, reasoning distillation, DPO."""

import math
import os

import numpy as np
import pytest
import torch

import export
from llm_trainer.training import losses
import train
from llm_trainer.data.tokenizer import load_tokenizer
from llm_trainer.core.checkpoint import load_checkpoint, load_model, save_checkpoint
from model import KVCache
from tests.helpers import (TINY, metrics, run_train, sigkill_after_checkpoint, train_in_process, train_losses,
                           two_ranks_equal_one_process, val_losses)

transformers = pytest.importorskip("transformers")
# sft_run (conftest.py), a tiny SFT model, is the starting point of every post-training stage here


# -----------------------------------------------------------------------------
# long-context SFT


@pytest.fixture(scope="module")
def long_run(sft_run, demo_sft, tmp_path_factory):
    """kind -> (our model, transformers' model of its export): SFT at twice the original length with that scaling."""
    made = {}

    def make(kind):
        if kind not in made:
            root = tmp_path_factory.mktemp(f"long_{kind}")
            out, hf_dir = str(root / "run"), str(root / "hf")
            scaling = {"type": kind, "factor": 2.0, "original_max_seq_len": 64}
            train_in_process([f"--data_dir={demo_sft}", f"--out_dir={out}", "--stage=sft", f"--init_from={sft_run}",
                              "--max_iters=2", "--eval_interval=2", *TINY, "--block_size=128",
                              f"--rope_scaling={scaling}"])
            state = load_checkpoint(os.path.join(out, "ckpt.pt"))
            assert state["model_config"]["rope_scaling"]["type"] == kind and state["model_config"]["max_seq_len"] == 128
            export.export(out, hf_dir)
            made[kind] = (load_model(out)[0], transformers.AutoModelForCausalLM.from_pretrained(
                hf_dir, dtype=torch.float32).eval())
        return made[kind]

    return make


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn"])
def test_rope_scaling_logits_equal_transformers_at_every_length(kind, long_run):
    """Below, at, just past and well past the original length of 64 (increasing: transformers' dynamic NTK keeps
    the longest length it has seen, and a fresh model is what it means)."""
    ours, hf = long_run(kind)
    for T in (20, 63, 64, 65, 100, 128):
        idx = torch.randint(0, ours.mcfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            diff = (ours(idx) - hf(idx).logits).abs().max().item()
        assert diff <= 1e-5, (T, diff)


@pytest.mark.slow
def test_dynamic_rope_generation_across_the_original_length_equals_transformers(long_run):
    """Under a KV cache transformers rotates each new position with the frequencies of its own length and keeps the
    cached keys as they were: so does our cache, one sequence (generate) or a batch (generate_batch, whose longest
    row sets the length, as in transformers' batched generate)."""
    ours, hf = long_run("dynamic")
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, ours.mcfg.vocab_size, (1, 50), generator=gen)
    with torch.no_grad():
        out = hf.generate(prompt, max_new_tokens=40, do_sample=False, output_logits=True, return_dict_in_generate=True,
                          pad_token_id=0, eos_token_id=None)
        tokens = out.sequences[0, 50:].tolist()
        assert list(ours.generate(prompt[0].tolist(), 40, temperature=0.0)) == tokens
        cache = KVCache(ours.mcfg, 1, 90, "cpu", torch.float32)  # the same tokens fed through our cache
        logits = [ours(prompt, cache, 0)[:, -1]] + [ours(torch.tensor([[t]]), cache, 50 + i)[:, -1]
                                                    for i, t in enumerate(tokens[:-1])]
        assert max((a - b).abs().max().item() for a, b in zip(logits, out.logits)) <= 1e-5
        prompts = [prompt[0].tolist(), prompt[0, :30].tolist()]
        pad = torch.zeros(2, 50, dtype=torch.long)  # transformers' batch: left-padded, its positions from the mask
        mask = torch.zeros(2, 50, dtype=torch.long)
        for r, p in enumerate(prompts):
            pad[r, 50 - len(p):], mask[r, 50 - len(p):] = torch.tensor(p), 1
        batch = hf.generate(pad, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0,
                            eos_token_id=None, output_logits=True, return_dict_in_generate=True)
        new = batch.sequences[:, 50:]
        assert ours.generate_batch(prompts, 40, temperature=0.0) == new.tolist()
        lens, cache = torch.tensor([50, 30]), KVCache(ours.mcfg, 2, 90, "cpu", torch.float32)
        right = torch.stack([pad[0], torch.roll(pad[1], -20)])  # ours: right-padded
        logits = [ours(right, cache, 0, logits_at=lens - 1)[:, -1]] + [ours(new[:, i:i + 1], cache, lens + i)[:, -1]
                                                                       for i in range(39)]
        assert max((a - b).abs().max().item() for a, b in zip(logits, batch.logits)) <= 1e-5


def test_block_size_beyond_rope_scaling_is_refused(sft_run, demo_sft, tmp_path):
    scaling = {"type": "linear", "factor": 2.0, "original_max_seq_len": 64}
    p = train_in_process([f"--data_dir={demo_sft}", f"--out_dir={tmp_path}", "--stage=sft", f"--init_from={sft_run}",
                          *TINY, "--block_size=256", f"--rope_scaling={scaling}"], check=False)
    assert p.returncode == 2 and "larger than rope_scaling allows" in p.stderr


# -----------------------------------------------------------------------------
# reasoning distillation


def distill_run(data_dir, out_dir, weight, **extra):
    args = {"data_dir": data_dir, "out_dir": out_dir, "stage": "sft", "dim": 32, "n_layers": 1, "n_heads": 2,
            "block_size": 256, "batch_size": 4, "warmup_iters": 0, "verify_data": False,
            "think_tag_weight": weight, **extra}
    return train.build(train.configure([f"--{k}={v}" for k, v in args.items()]))


def test_think_tag_weight_lands_exactly_on_reply_tags(demo_reason, tmp_path):
    run = distill_run(demo_reason, str(tmp_path), 10.0)
    tok = load_tokenizer(demo_reason)
    tags = {tok.special_ids[t] for t in ("<think>", "</think>", "<answer>", "</answer>")}
    assert all(len(tok.encode(t)) > 1 for t in ("<think>", "</think>"))  # typed text is not the special token
    n_weighted = 0
    for g in range(6):
        b = run.train_batches.get(g)
        y, w = b.y.numpy(), b.w.numpy()
        is_tag = np.isin(y, list(tags))
        # weight 10 exactly where the label is a reasoning tag inside a reply, 1 on other reply tokens, 0 elsewhere
        assert set(np.unique(w)) <= {0.0, 1.0, 10.0}
        assert np.array_equal(w == 10.0, is_tag & (w > 0))
        assert not np.any(w[~is_tag] == 10.0)
        n_weighted += int((w == 10.0).sum())
        for row in range(len(y)):  # each reply in view opens and closes its think block: tags come in pairs
            text = tok.decode(y[row][w[row] > 0].tolist())
            assert text.count("<think>") == int(((w[row] == 10.0) & (y[row] == tok.special_ids["<think>"])).sum())
    assert n_weighted >= 6 * 4  # every row of these batches holds tags


def test_weighted_loss_is_normalised_by_the_weighted_count(demo_reason, tmp_path):
    run = distill_run(demo_reason, str(tmp_path), 10.0)
    b = run.train_batches.get(0)
    with torch.no_grad():
        ce = losses.token_losses(run.model, b.x, b.y, b.segments)
    expected = float((ce * b.w).sum() / b.w.sum())  # sum(w * ce) / sum(w)
    assert train.train_step(run, 0)["loss"] == pytest.approx(expected, rel=1e-6)
    # weight 1 is plain SFT: the mean over target tokens
    plain = distill_run(demo_reason, str(tmp_path), 1.0)
    b1 = plain.train_batches.get(0)
    assert torch.equal(b1.w, (b.w > 0).float())


def test_validation_loss_is_unweighted(demo_reason, tmp_path):
    weighted = train.evaluate(distill_run(demo_reason, str(tmp_path), 10.0, eval_iters=2))
    plain = train.evaluate(distill_run(demo_reason, str(tmp_path), 1.0, eval_iters=2))
    assert weighted["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-6)


# -----------------------------------------------------------------------------
# DPO


def dpo_args(data, sft_run, out, *extra):
    return [f"--data_dir={data}", f"--out_dir={out}", "--stage=dpo", f"--init_from={sft_run}", *TINY,
            "--eval_iters=4", *extra]


@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_loss_is_log2_at_step_0(demo_dpo_small, sft_run, tmp_path, precompute):
    out = str(tmp_path / "dpo")
    train_in_process(dpo_args(demo_dpo_small, sft_run, out, "--max_iters=1", "--eval_interval=1",
                              f"--dpo_precompute_ref={precompute}"))
    rows = metrics(out)
    assert rows[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["val_rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    first = [r for r in rows if "loss" in r][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.slow
def test_dpo_raises_held_out_margin_and_accuracy(demo_dpo, sft_run, tmp_path):
    out = str(tmp_path / "dpo")
    train_in_process(dpo_args(demo_dpo, sft_run, out, "--max_iters=40", "--eval_interval=40", "--learning_rate=2e-3",
                              "--batch_size=8", "--eval_iters=10", "--dpo_beta=0.1"))
    evals = [r for r in metrics(out) if "val_loss" in r]
    before, after = evals[0], evals[-1]
    assert after["val_rewards/margins"] > before["val_rewards/margins"] + 0.1
    # 80 held-out pairs of right vs wrong answers, from a 0.4M-parameter model: above chance, not far above
    assert after["val_rewards/accuracies"] > 0.55 and after["val_loss"] < before["val_loss"] - 0.05
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        assert key in [r for r in metrics(out) if "loss" in r and "val_loss" not in r][-1]


def test_dpo_precomputed_reference_equals_reference_model(demo_dpo_small, sft_run, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train_in_process(dpo_args(demo_dpo_small, sft_run, a, "--max_iters=4", "--eval_interval=4", "--learning_rate=1e-3"))
    train_in_process(dpo_args(demo_dpo_small, sft_run, b, "--max_iters=4", "--eval_interval=4", "--learning_rate=1e-3",
                              "--dpo_precompute_ref=True"))
    la, lb = train_losses(a), train_losses(b)
    assert all(abs(la[i] - lb[i]) < 1e-5 for i in la)


@pytest.mark.slow
def test_dpo_under_fsdp_bfloat16_starts_at_its_reference_as_one_process(demo_dpo_small, sft_run, tmp_path):
    """FSDP computes the policy with bfloat16 parameters: the reference (model or precomputed table) must too, so
    that step 0 is ln 2 with no reward won, as in one process."""
    if not torch.distributed.is_gloo_available():
        pytest.skip("needs gloo")
    args = ["--max_iters=1", "--eval_interval=1", "--device=cpu", "--dtype=bfloat16", "--gradient_accumulation_steps=2"]
    runs = {"one": (1, []), "fsdp": (2, ["--fsdp=True"]), "fsdp-table": (2, ["--fsdp=True", "--dpo_precompute_ref=True"])}
    for name, (nproc, extra) in runs.items():
        run = dpo_args(demo_dpo_small, sft_run, str(tmp_path / name), *args, *extra)
        if nproc == 1:
            train_in_process(run)
        else:
            run_train(run, nproc=nproc, timeout=300)
        rows = metrics(str(tmp_path / name))
        first = [r for r in rows if "loss" in r][0]
        assert rows[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6), name
        assert rows[0]["val_rewards/accuracies"] == 0.0 and rows[0]["val_rewards/margins"] == 0.0, name
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/accuracies"] == 0.0, name


def test_dpo_pairs_cut_to_no_target_are_counted_and_left_out(demo_dpo, tmp_path, capsys):
    """At block 32 some prompts fill the row: such a pair has no target, so no loss, no statistics, no divisor."""
    run = train.build(train.configure([f"--data_dir={demo_dpo}", f"--out_dir={tmp_path}", "--stage=dpo", "--dim=32",
                                       "--n_layers=1", "--n_heads=2", "--block_size=32", "--batch_size=4",
                                       "--verify_data=False"]))
    batches = run.train_batches
    empty = [k for k in range(batches.n_units) if not any(
        batches.split.document(d, 33)[1][1:].any() for d in (2 * k, 2 * k + 1))]  # labels are tokens 1..32
    assert batches.untargeted == len(empty) >= 1
    train.print_plan(run)
    assert f"{len(empty)} of {batches.n_units:,} pairs have a prompt that fills the row" in capsys.readouterr().out
    with torch.no_grad():  # the policy moved off the reference: every pair has a loss of its own, not ln 2
        for p in run.raw_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    good = [k for k in range(batches.n_units) if k not in empty][:2]

    def dpo(units):
        b = batches.batch(units)
        with torch.no_grad():
            loss, stats = losses.dpo_loss(run.model, b, run.reference.logps(b, "train"), run.cfg["dpo_beta"])
        return float(loss), float(stats["rewards/accuracies"]), losses.target_count(b, pairs=True)

    alone = [dpo([k]) for k in good]
    loss, accuracy, count = dpo([empty[0], *good])
    assert count == 2 and dpo([empty[0]]) == (0.0, 0.0, 0.0)
    assert loss == pytest.approx(sum(a[0] for a in alone), rel=1e-5) and abs(loss - 2 * math.log(2)) > 1e-3
    assert accuracy == sum(a[1] for a in alone)


@pytest.mark.slow
def test_dpo_two_ranks_equal_one_process(demo_dpo_small, sft_run, tmp_path):
    args = [a for a in dpo_args(demo_dpo_small, sft_run, "", "--max_iters=3", "--eval_interval=3",
                                "--learning_rate=1e-3", "--gradient_accumulation_steps=2", "--device=cpu")
            if a != "--out_dir="]
    runs, _ = two_ranks_equal_one_process(args, tmp_path, fsdp=False)
    m1, m2 = ([r for r in metrics(runs[n]) if "val_loss" in r][-1] for n in ("one", "ddp"))
    assert m1["val_rewards/margins"] == pytest.approx(m2["val_rewards/margins"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_resumed_after_sigkill_keeps_its_reference(demo_dpo_small, sft_run, tmp_path, precompute):
    """The reference is the starting weights, rebuilt from the init_from the checkpoint records (it used to be the
    resumed policy: every reward restarted at zero, the loss at ln 2)."""
    args = [a for a in dpo_args(demo_dpo_small, sft_run, "", "--max_iters=8", "--eval_interval=4",
                                "--learning_rate=3e-3", f"--dpo_precompute_ref={precompute}") if a != "--out_dir="]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    train_in_process([*args, f"--out_dir={ref}"])
    sigkill_after_checkpoint([*args, f"--out_dir={out}"], 4)
    train_in_process([*args, f"--out_dir={out}", "--init_from=resume"])
    want, got = train_losses(ref), train_losses(out)
    assert sorted(got) == list(range(1, 9)) and got == want, (want, got)
    assert val_losses(out) == val_losses(ref)


def test_a_resumed_reference_that_changed_or_is_gone_is_refused(demo_dpo_small, sft_run, tmp_path):
    import shutil

    start = str(tmp_path / "start")
    shutil.copytree(sft_run, start)
    out = str(tmp_path / "dpo")
    train_in_process(dpo_args(demo_dpo_small, start, out, "--max_iters=2", "--eval_interval=2"))
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["frozen"]["reference"]["path"] == os.path.abspath(start)
    state = load_checkpoint(os.path.join(start, "ckpt.pt"))
    state["model"]["model.norm.weight"] = state["model"]["model.norm.weight"] * 2
    save_checkpoint(start, state)
    resume = dpo_args(demo_dpo_small, start, out, "--max_iters=4", "--eval_interval=2", "--init_from=resume")
    p = train_in_process(resume, check=False)
    assert p.returncode == 2 and "the reference of this dpo run" in p.stderr and "has changed since" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    shutil.rmtree(start)
    p = train_in_process(resume, check=False)
    assert p.returncode == 2 and "is not there any more" in p.stderr, p.stderr
