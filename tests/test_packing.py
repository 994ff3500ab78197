"""Packed SFT rows and doc_mask pretraining: every document computed exactly as it would be alone, unpadded."""

import json
import numpy as np
import pytest
import torch

from llm_trainer.training import losses
import train
from llm_trainer.data.batches import pack
from tests.helpers import TINY, metrics, train_in_process


def build(data_dir, out_dir, **overrides):
    keys = {"data_dir": data_dir, "out_dir": out_dir, "stage": "sft", "dim": 64, "n_layers": 2, "n_heads": 4,
            "n_kv_heads": 2, "block_size": 96, "batch_size": 4, "warmup_iters": 0, "grad_clip": 0.0,
            "verify_data": False, "learning_rate": 1e-2, **overrides}
    run = train.build(train.configure([f"--{k}={v}" for k, v in keys.items()]))
    for p in run.raw_model.parameters():  # weights off their init, so that every position's loss differs
        p.data += 0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
    return run


def test_best_fit_decreasing_places_every_item_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, 500).tolist()
    rows = pack(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) <= 1.06 * -(-sum(lengths) // 64)  # nearly full: within 6% of the fewest rows possible
    assert pack(lengths, 64) == rows  # a pure function of the lengths


def alone(run, tokens, mask):
    """Per-label losses and weights of one document run by itself, unpadded."""
    x, y = torch.tensor(tokens[None, :-1]), torch.tensor(tokens[None, 1:])
    w = torch.tensor(mask[None, 1:], dtype=torch.float32)
    return losses.token_losses(run.model, x, y)[0], w[0]


@pytest.mark.parametrize("data, tag_weight", [("demo_sft", 1.0), ("demo_reason", 10.0)])
def test_packed_rows_equal_their_documents_alone(data, tag_weight, request, tmp_path):
    """Multi-turn chats (demo_sft) and reasoning with the tag weight (demo_reason): each document's per-token
    losses in a packed row equal the document run alone (fp32, 1e-5), and so do the gradients of the loss."""
    run = build(request.getfixturevalue(data), str(tmp_path), think_tag_weight=tag_weight, block_size=256)
    batches = run.train_batches
    rows = [batches.unit(g) for g in range(4)]
    assert all(isinstance(r, list) for r in rows) and max(len(r) for r in rows) >= 2  # really packed
    batch = batches.batch(rows)
    assert batch.real / batch.x.numel() > 0.7  # mostly real tokens (76% in the reasoning set's first rows)
    packed_ce = losses.token_losses(run.model, batch.x, batch.y, batch.segments)
    total_alone, n_docs = 0.0, 0
    for r, docs in enumerate(rows):
        start = 0
        for d in docs:
            tokens, mask = batches.split.document(d, batches.T + 1)
            ce, w = alone(run, tokens, mask)
            w = torch.where((w > 0) & torch.isin(torch.tensor(tokens[1:]), torch.tensor(batches.tag_ids)),
                            w * tag_weight, w)
            n = len(tokens) - 1
            assert torch.allclose(packed_ce[r, start:start + n], ce, atol=1e-5), (r, d)
            assert torch.equal(batch.w[r, start:start + n], w)
            if start + n < batches.T:
                assert batch.w[r, start + n] == 0  # its label is the next document's first token
            total_alone = total_alone + (ce * w).sum()
            start, n_docs = start + len(tokens), n_docs + 1
        assert batch.w[r, start:].sum() == 0  # padding
    assert n_docs > len(rows)
    packed_loss = (packed_ce * batch.w).sum()
    assert packed_loss.item() == pytest.approx(total_alone.item(), rel=1e-5)
    grads_packed = torch.autograd.grad(packed_loss, list(run.raw_model.parameters()))
    grads_alone = torch.autograd.grad(total_alone, list(run.raw_model.parameters()))
    for a, b in zip(grads_packed, grads_alone):  # relative to the gradient's size
        assert (a - b).norm() <= 1e-5 * b.norm(), ((a - b).norm() / b.norm()).item()


def test_a_packed_step_equals_the_same_documents_unpacked(demo_sft, tmp_path):
    """One optimizer step on a packed micro-batch and on the same documents one per row (padded): the same
    targets, the same loss, the same weights after the step."""
    lr = 1e-4  # an SFT learning rate: AdamW's first step is about lr x sign(gradient), rounding differences included
    packed = build(demo_sft, str(tmp_path), learning_rate=lr)
    rows = [packed.train_batches.unit(g) for g in range(packed.train_batches.B)]
    docs = [d for r in rows for d in r]
    unpacked = build(demo_sft, str(tmp_path), pack=False, batch_size=len(docs), learning_rate=lr)
    for run, batch in ((packed, packed.train_batches.batch(rows)), (unpacked, unpacked.train_batches.batch(docs))):
        run.prefetched = {0: (losses.batch_counts(batch), [batch])}
    assert float((packed.prefetched[0][1][0].w > 0).sum()) == float((unpacked.prefetched[0][1][0].w > 0).sum())
    a, b = train.train_step(packed, 0), train.train_step(unpacked, 0)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["target_tokens"] == b["target_tokens"]
    assert a["fill"] > 1.5 * b["fill"]
    for p, q in zip(packed.raw_model.parameters(), unpacked.raw_model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), (p - q).abs().max().item()


def test_validation_loss_is_the_same_packed_or_not(demo_sft, tmp_path):
    packed, unpacked = (build(demo_sft, str(tmp_path), pack=p, eval_iters=3) for p in (True, False))
    assert packed.val_batches.get(0).x.shape[0] < unpacked.val_batches.get(0).x.shape[0]  # fewer rows
    assert train.evaluate(packed)["val_loss"] == pytest.approx(train.evaluate(unpacked)["val_loss"], rel=1e-5)


def test_doc_mask_windows_equal_their_segments_alone(demo_pretrain, tmp_path):
    """doc_mask=True: each segment of a pretraining window (from the <|endoftext|> before a document to the
    document's last token) is computed as if alone, and every label stays a target."""
    run = build(demo_pretrain, str(tmp_path), stage="pretrain", doc_mask=True, block_size=128)
    batch = run.train_batches.get(0)
    assert torch.equal(batch.w, torch.ones_like(batch.w))
    ce = losses.token_losses(run.model, batch.x, batch.y, batch.segments)
    eot = run.train_batches.split.meta["special_ids"]["<|endoftext|>"]
    checked = 0
    for r in range(batch.x.shape[0]):
        seg = batch.segments[r]
        for s in seg.unique():
            where = (seg == s).nonzero().flatten()
            lo, hi = int(where[0]), int(where[-1]) + 1
            if lo > 0:
                assert batch.x[r, lo] == eot  # a segment starts at the <|endoftext|> before its document
            tokens = torch.cat([batch.x[r, lo:hi], batch.y[r, hi - 1:hi]])
            alone_ce = losses.token_losses(run.model, tokens[None, :-1], tokens[None, 1:])[0]
            assert torch.allclose(ce[r, lo:hi], alone_ce, atol=1e-5)
            checked += 1
    assert checked > batch.x.shape[0]  # windows really hold several documents


def test_fill_and_target_tokens_are_logged_for_every_stage(demo_sft, demo_pretrain, tmp_path):
    fill = {}
    for name, data, extra in (("sft", demo_sft, []), ("sft", demo_sft, ["--pack=False"]),
                              ("pretrain", demo_pretrain, [])):
        out = str(tmp_path / f"{name}{len(extra)}")
        p = train_in_process([f"--data_dir={data}", f"--out_dir={out}", f"--stage={name}", "--max_iters=2",
                              "--eval_interval=2", *TINY, *extra])
        record = [r for r in metrics(out) if "loss" in r][-1]
        assert record["target_tokens_per_s"] > 0 and 0 < record["fill"] <= 1
        assert "fill" in p.stdout and "target tok/s" in p.stdout and "rows per epoch" in p.stdout
        fill[name, bool(extra)] = record["fill"]
    assert fill["pretrain", False] == 1.0
    assert fill["sft", False] > 1.5 * fill["sft", True]  # packed (the default) against padded


@pytest.mark.parametrize("args, message", [
    (["--stage=pretrain", "--pack=True"], "pack=True packs sft/dpo/rm documents; stage pretrain rows are windows"),
    (["--stage=sft", "--doc_mask=True"], "doc_mask=True is for pretrain windows; stage sft"),
    (["--stage=sft", "--pack=maybe"], "pack must be True, False or None"),
])
def test_bad_packing_config_is_one_line_exit_2(args, message, demo_sft, tmp_path):
    p = train_in_process([f"--data_dir={demo_sft}", f"--out_dir={tmp_path / 'run'}", *TINY, *args], check=False)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_no_val_split_is_refused_with_the_fix_or_trained_without_evaluation(tmp_path):
    import prepare

    data = tmp_path / "data"
    src = tmp_path / "chat.jsonl"
    src.write_text('{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    prepare.main([f"--input={src}", f"--out_dir={data}", "--tokenizer=train", "--vocab_size=300", "--val_fraction=0",
                  "--workers=1"])
    p = train_in_process([f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}", "--stage=sft", *TINY, "--max_iters=3"],
                         check=False)
    assert p.returncode == 2, p.stderr
    assert f"{data} has no val split" in p.stderr and "--val_fraction=0.01" in p.stderr and "--eval_iters=0" in p.stderr
    p = train_in_process([f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}", "--stage=sft", *TINY,
                          "--eval_iters=0", "--max_iters=3"])
    assert p.stdout.count("no evaluation (eval_iters=0)") == 1, p.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records and not any(k.startswith("val_") for r in records for k in r)
    assert (tmp_path / "run" / "ckpt.pt").exists()
