"""train.py: it learns, its loss is token-exact, it resumes bit for bit, torchrun equals one process."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from llm_trainer.training import losses
import train
from llm_trainer.core.checkpoint import load_checkpoint
from tests.helpers import (ROOT, TINY, build_run, final_weights, metrics, run_train, sigkill_after_checkpoint,
                           train_in_process, train_losses, two_ranks_equal_one_process, val_losses)


@pytest.mark.slow
def test_pretrain_then_sft_learn(demo_pretrain, demo_sft, tmp_path):
    pre = str(tmp_path / "pre")
    train_in_process([f"--data_dir={demo_pretrain}", f"--out_dir={pre}", "--max_iters=200", "--eval_interval=100",
                      "--learning_rate=1e-2", *TINY, "--batch_size=8"])
    v = val_losses(pre)
    assert v[-1] < 0.78 * v[0], v
    sft = str(tmp_path / "sft")
    train_in_process([f"--data_dir={demo_sft}", f"--out_dir={sft}", "--stage=sft", f"--init_from={pre}",
                      "--max_iters=30", "--eval_interval=30", "--learning_rate=2e-3", "--block_size=128", *TINY[:4],
                      "--batch_size=4", "--warmup_iters=2", "--eval_iters=2"])
    v = val_losses(sft)
    assert v[-1] < 0.85 * v[0], v  # 30 steps from a 200-step model: packed and padded rows both reach ~0.8
    assert os.path.exists(os.path.join(sft, "tokenizer.json"))  # a run dir is self-contained


def test_step_loss_is_mean_over_all_targets(demo_sft, tmp_path):
    """2 micro-batches of 2 rows == 1 batch of 4 rows, though rows hold very different numbers of targets."""
    split = build_run(demo_sft, str(tmp_path)).train_batches
    counts = [float(split.get(g).w.sum()) for g in range(8)]
    assert max(counts) > 1.5 * min(counts)  # the micro-batches really differ
    two = build_run(demo_sft, str(tmp_path), batch_size=2, gradient_accumulation_steps=2)
    one = build_run(demo_sft, str(tmp_path), batch_size=4, gradient_accumulation_steps=1)
    s2, s1 = train.train_step(two, 0), train.train_step(one, 0)
    assert s2["loss"] == pytest.approx(s1["loss"], rel=1e-6)
    for a, b in zip(two.raw_model.parameters(), one.raw_model.parameters()):
        assert torch.allclose(a, b, atol=1e-7)
    # and it is the token mean: recompute by hand from the four rows
    ref = build_run(demo_sft, str(tmp_path), batch_size=4, gradient_accumulation_steps=1)
    b = ref.train_batches.get(0)
    with torch.no_grad():
        ce = losses.token_losses(ref.model, b.x, b.y, b.segments)
    assert s1["loss"] == pytest.approx(float((ce * b.w).sum() / b.w.sum()), rel=1e-6)


def test_val_bpb_is_a_hand_computation(demo_sft, tmp_path):
    """val_bpb = the targets' cross-entropy in nats / ln 2 / the UTF-8 bytes of the text they decode to. A model
    with a zero final norm gives uniform logits, so every target costs ln(vocab) nats; the bytes are counted
    here from decoded text (each run of targets on its own: replies are whole), not from tokenizer.token_bytes."""
    import math

    from llm_trainer.data.tokenizer import load_tokenizer

    run = build_run(demo_sft, str(tmp_path), eval_iters=3, batch_size=2, block_size=256)
    with torch.no_grad():
        run.raw_model.model.norm.weight.zero_()
    tok = load_tokenizer(demo_sft)
    targets, text_bytes = 0, 0
    for i in range(3):
        b = run.val_batches.get(i)
        for row_y, row_w in zip(b.y.tolist(), b.w.tolist()):
            runs, current = [], []
            for t, w in zip(row_y, row_w):
                if w > 0:
                    current.append(t)
                elif current:
                    runs, current = runs + [current], []
            for ids in runs + ([current] if current else []):
                targets += len(ids)
                text = tok.decode(ids)
                for control in ("<|im_end|>", "<|im_start|>", "<|endoftext|>"):
                    text = text.replace(control, "")
                text_bytes += len(text.encode("utf-8"))
    ev = train.evaluate(run)
    vocab = run.raw_model.mcfg.vocab_size
    assert ev["val_loss"] == pytest.approx(math.log(vocab), rel=1e-5)
    assert ev["val_bpb"] == pytest.approx(targets * math.log(vocab) / math.log(2) / text_bytes, rel=1e-5)
    assert text_bytes > 1.2 * targets  # tokens of more than one byte: bits per byte is not bits per token


@pytest.mark.slow
def test_compiled_step_equals_eager(demo_sft, tmp_path):
    """compile=True (model and loss in one graph, as on a GPU) trains the same as eager: loss, grad norm, weights."""
    runs = {c: build_run(demo_sft, str(tmp_path), compile=c, batch_size=2, gradient_accumulation_steps=2)
            for c in (False, True)}
    assert isinstance(runs[True].model, torch._dynamo.eval_frame.OptimizedModule)  # really compiled
    for it in range(2):
        eager, compiled = (train.train_step(runs[c], it) for c in (False, True))
        assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-5)
        assert compiled["grad_norm"] == pytest.approx(eager["grad_norm"], rel=1e-4)
    for a, b in zip(runs[False].raw_model.parameters(), runs[True].raw_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    b = runs[True].val_batches.get(0)
    with torch.no_grad():  # the compiled model's loss is the cross-entropy of its own logits
        logits = runs[True].raw_model(b.x, segments=b.segments)
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b.y.flatten(), reduction="none")
        assert torch.allclose(losses.token_losses(runs[True].model, b.x, b.y, b.segments), ce.view(b.y.shape), atol=1e-5)


def test_batches_are_a_pure_function_of_step(demo_pretrain, tmp_path):
    a = build_run(demo_pretrain, str(tmp_path), stage="pretrain").train_batches
    b = build_run(demo_pretrain, str(tmp_path), stage="pretrain").train_batches
    for g in [5, 0, 10**4, 3]:  # any order: no hidden state
        assert torch.equal(a.get(g).x, b.get(g).x)
    assert not torch.equal(a.get(0).x, a.get(1).x)


@pytest.mark.slow
@pytest.mark.parametrize("stage, data", [("pretrain", "demo_pretrain"), ("sft", "demo_sft"), ("grpo", "toy_grpo")])
def test_exact_resume_after_sigkill(stage, data, request, tmp_path):
    """A train.py process SIGKILLed after a checkpoint, resumed, ends as an uninterrupted run (both in this process).
    Also for packed SFT rows (pack=True is sft's default: the packing is a pure function of (seed, epoch)) and
    for grpo with a KL (its rollouts are a pure function of (seed, micro-batch, weights))."""
    data = request.getfixturevalue(data)
    extra = ["--dropout=0.1"]
    if stage == "grpo":  # (data dir, reward); no dropout: the rollout policy must be the policy trained
        data, reward = data
        # with a KL, whose reference is the starting weights (rebuilt on resume, not the resumed weights)
        extra = [f"--reward={reward}", "--grpo_group=4", "--max_new_tokens=8", "--learning_rate=1e-2", "--grpo_kl=0.1"]
    args = [f"--data_dir={data}", f"--stage={stage}", "--max_iters=16", "--eval_interval=4", *TINY, *extra]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    train_in_process([*args, f"--out_dir={ref}"])
    sigkill_after_checkpoint([*args, f"--out_dir={out}"], 8)  # mid-way, after its second checkpoint
    train_in_process([*args, f"--out_dir={out}", "--init_from=resume"])
    want, got = train_losses(ref), train_losses(out)
    assert sorted(got) == sorted(want)
    assert all(got[i] == want[i] for i in want)  # bit for bit
    for k, v in final_weights(ref).items():
        assert torch.equal(v, final_weights(out)[k]), k


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(demo_pretrain, tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "train.py", f"--data_dir={demo_pretrain}", f"--out_dir={out}", "--max_iters=100000",
           "--eval_interval=100000", *TINY]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    for line in p.stdout:
        if line.startswith("train iter      3"):
            p.send_signal(signal.SIGTERM)
            break
    rest = p.communicate(timeout=60)[0]
    assert p.returncode == 0, rest
    state = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert 3 <= state["iter"] < 100000


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(demo_sft, tmp_path):
    """eval_iters 2: one batch per rank, no padding."""
    args = [f"--data_dir={demo_sft}", "--stage=sft", "--max_iters=4", "--eval_interval=2", "--device=cpu",
            "--gradient_accumulation_steps=2", *TINY]
    runs, _ = two_ranks_equal_one_process(args, tmp_path)
    for k, v in final_weights(runs["one"]).items():
        assert torch.allclose(v, final_weights(runs["fsdp"])[k], atol=1e-5), k


@pytest.mark.parametrize("args, message", [
    (["--batch_sise=4"], "unknown config key 'batch_sise' (did you mean batch_size"),
    (["--max_iters=ten"], "config key 'max_iters' expects int"),
    (["--stage=rlhf"], "stage must be one of"),
    (["--fsdp=True"], "launch with torchrun"),
    (["--rope_scaling={'type': 'linear', 'factor': 2.0, 'original_max_seq_len': 16}"], "larger than rope_scaling allows"),
])
def test_config_errors_exit_2(demo_pretrain, args, message, tmp_path):
    p = train_in_process([f"--data_dir={demo_pretrain}", f"--out_dir={tmp_path}", *TINY, *args], check=False)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_data_dir_without_meta_is_refused(demo_pretrain, tmp_path):
    broken = tmp_path / "incomplete"
    broken.mkdir()
    for name in os.listdir(demo_pretrain):
        if name != "meta.json":
            os.symlink(os.path.join(demo_pretrain, name), broken / name)
    p = train_in_process([f"--data_dir={broken}", f"--out_dir={tmp_path / 'o'}", *TINY], check=False)
    assert p.returncode == 2 and "meta.json" in p.stderr, p.stderr


@pytest.mark.slow
def test_vocab_mismatch_is_refused(demo_pretrain, tmp_path):
    """As a user sees it, from a real process: exit 2 and one line on stderr (no warning, no traceback)."""
    p = run_train([f"--data_dir={demo_pretrain}", f"--out_dir={tmp_path}", "--vocab_size=100", *TINY], check=False)
    assert p.returncode == 2 and "does not cover" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_nonfinite_steps_are_skipped_then_stop(demo_pretrain, tmp_path):
    out = str(tmp_path / "run")
    p = train_in_process([f"--data_dir={demo_pretrain}", f"--out_dir={out}", "--max_iters=20", "--eval_interval=4",
                          "--max_bad_steps=3", *TINY], check=False,
                         env={"TRAIN_FAULTS": '{"nonfinite_iters": [5, 9, 10, 11]}'})
    assert p.returncode == 1 and "non-finite steps in a row" in p.stdout + p.stderr
    skipped = [r["iter"] for r in metrics(out) if r.get("skipped")]
    assert skipped == [6, 10, 11, 12]
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["iter"] == 8  # the last good one, intact
    # a skipped step changes nothing: iteration 6's update was dropped, the next ones applied
    losses = train_losses(out)
    assert 7 in losses and all(v == v for v in losses.values())


def test_lr_schedules():
    cfg = {"learning_rate": 1.0, "min_lr": 0.1, "warmup_iters": 10, "lr_decay_iters": 110, "max_iters": 110,
           "lr_schedule": "cosine", "wsd_decay_frac": 0.2}
    assert train.lr_at(0, cfg) < train.lr_at(9, cfg) <= 1.0
    assert train.lr_at(10, cfg) == pytest.approx(1.0)
    assert train.lr_at(60, cfg) == pytest.approx(0.55)
    assert train.lr_at(110, cfg) == pytest.approx(0.1)
    cfg["lr_schedule"] = "wsd"
    assert train.lr_at(80, cfg) == 1.0 and train.lr_at(99, cfg) < 1.0 and train.lr_at(110, cfg) == 0.1
