"""Distillation from a frozen teacher: logit distillation in the sft stage (its loss by hand for every divergence,
temperature and weight over packed rows, alpha = 0 is plain SFT bit for bit, a copy of the student teaches nothing,
chunked == unchunked, 2 ranks == 1 process, exact resume, a LoRA student, an HF teacher) and on-policy distillation
as a grpo reward (per-token advantages by hand, 2 ranks, resume), and one clear line for each bad input."""

import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import train
from configurator import ConfigError
from llm_trainer.core.checkpoint import load_checkpoint, load_model, save_checkpoint
from llm_trainer.training import grpo, losses
from tests.helpers import (metrics, run_train, sigkill_after_checkpoint, train_in_process, train_losses,
                           two_ranks_equal_one_process)

TEACHER = ["--dim=64", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2"]
STUDENT = {"dim": 32, "n_layers": 1, "n_heads": 2}  # smaller than the teacher: another shape


@pytest.fixture(scope="module")
def teacher(demo_sft, tmp_path_factory):
    """A small SFT model: the teacher of every test here."""
    out = str(tmp_path_factory.mktemp("teacher"))
    train_in_process([f"--data_dir={demo_sft}", f"--out_dir={out}", "--stage=sft", "--max_iters=30",
                      "--eval_interval=30",
               "--learning_rate=3e-3", "--block_size=128", "--batch_size=8", "--eval_iters=1", *TEACHER])
    return out


def build(data_dir, out_dir, **overrides):
    args = {"data_dir": data_dir, "out_dir": out_dir, "stage": "sft", **STUDENT, "block_size": 128, "batch_size": 4,
            "warmup_iters": 0, "verify_data": False, "eval_iters": 2, **overrides}
    return train.build(train.configure([f"--{k}={v}" for k, v in args.items()]))


def by_hand(run, batch, kind, temperature, alpha):
    """(loss, ce, kd, teacher_ce) sums of a micro-batch from both models' full logits, in float64."""
    with torch.no_grad():
        zs = run.raw_model(batch.x, segments=batch.segments).double()
        zt = run.teacher(batch.x, segments=batch.segments).double()
    s, t = F.log_softmax(zs / temperature, -1), F.log_softmax(zt / temperature, -1)
    if kind == "forward_kl":
        d = (t.exp() * (t - s)).sum(-1)
    elif kind == "reverse_kl":
        d = (s.exp() * (s - t)).sum(-1)
    else:
        m = (0.5 * (s.exp() + t.exp())).log()
        d = 0.5 * (t.exp() * (t - m)).sum(-1) + 0.5 * (s.exp() * (s - m)).sum(-1)
    d = d * temperature**2
    y = batch.y.unsqueeze(-1)
    ce = -F.log_softmax(zs, -1).gather(-1, y).squeeze(-1)
    tce = -F.log_softmax(zt, -1).gather(-1, y).squeeze(-1)
    w = batch.w.double()
    return (((1 - alpha) * ce + alpha * d) * w).sum(), (ce * w).sum(), (d * w).sum(), (tce * w).sum()


def several_documents(batch):
    """Whether a row of the batch holds targets of two or more documents."""
    return any(len(set(seg[w > 0].tolist())) > 1 for seg, w in zip(batch.segments, batch.w))


# -----------------------------------------------------------------------------
# the loss


@pytest.mark.parametrize("kind, temperature, alpha, chunk", [
    ("forward_kl", 1.0, 0.5, 0), ("forward_kl", 2.0, 0.9, 16), ("reverse_kl", 1.0, 0.3, 0),
    ("reverse_kl", 0.5, 1.0, 7), ("jsd", 1.0, 0.5, 0), ("jsd", 4.0, 0.2, 33)])
def test_the_loss_is_the_formula_over_packed_rows(kind, temperature, alpha, chunk, teacher, demo_reason, tmp_path):
    """Reasoning rows: the tags weigh 10, and the divergence of a tag position weighs 10 as its cross-entropy does."""
    run = build(demo_reason, str(tmp_path), teacher=teacher, kd_loss=kind, kd_temperature=temperature,
                kd_weight=alpha, kd_chunk=chunk, think_tag_weight=10.0, block_size=256)
    batch = run.train_batches.get(0)
    assert several_documents(batch) and set(batch.w.unique().tolist()) == {0.0, 1.0, 10.0}
    with torch.no_grad():
        loss, stats = run.stage.loss(run, batch, "train")
    want, weight = by_hand(run, batch, kind, temperature, alpha), batch.w.sum().item()
    for got, expected in zip([loss, stats["ce"], stats["kd"], stats["teacher_ce"]], want):  # means over the targets
        assert got.item() / weight == pytest.approx(expected.item() / weight, abs=1e-6)
    assert stats["kd"] > 0 and stats["teacher_ce"] < stats["ce"]  # a trained teacher, a random student
    # the step's loss is the weighted mean, and validation counts the cross-entropy alone, every target once
    assert train.train_step(run, 0)["loss"] == pytest.approx(loss.item() / batch.w.sum().item(), rel=1e-6)
    val = run.val_batches.get(0)
    with torch.no_grad():
        vloss, vstats = run.stage.loss(run, val, "val")
        plain = losses.lm_loss(run.model, val, weighted=False)[0]
    assert vloss.item() == plain.item() == vstats["ce"].item()


def test_alpha_zero_is_plain_sft_bit_for_bit(teacher, demo_sft, tmp_path):
    plain = build(demo_sft, str(tmp_path / "plain"))
    kd = build(demo_sft, str(tmp_path / "kd"), teacher=teacher, kd_weight=0.0, kd_chunk=16)
    for it in range(3):
        a, b = train.train_step(plain, it), train.train_step(kd, it)
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]) and b["kd"] > 0
    for p, q in zip(plain.raw_model.parameters(), kd.raw_model.parameters()):
        assert torch.equal(p, q)


def test_a_copy_of_the_student_teaches_nothing_at_step_0(teacher, demo_sft, tmp_path):
    run = build(demo_sft, str(tmp_path), teacher=teacher, init_from=teacher, kd_weight=1.0,
                **{k: v for k, v in zip(("dim", "n_layers", "n_heads"), (64, 2, 4))})
    stats = train.train_step(run, 0)
    # the same cross-entropy, but for rounding: the teacher's head multiplies the target rows alone (kd_terms)
    assert abs(stats["kd"]) <= 1e-7 and stats["ce"] == pytest.approx(stats["teacher_ce"], rel=1e-6)


def test_chunked_equals_unchunked(teacher, demo_sft, tmp_path):
    runs = [build(demo_sft, str(tmp_path / str(c)), teacher=teacher, kd_chunk=c) for c in (0, 5, 37)]
    batch = runs[0].train_batches.get(0)
    assert int((batch.w > 0).sum()) > 5 * 10  # many chunks
    results = []
    for run in runs:
        loss, stats = run.stage.loss(run, batch, "train")
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in run.raw_model.parameters()]))
    (whole, grads), rest = results[0], results[1:]
    for loss, g in rest:
        assert loss == pytest.approx(whole, rel=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(grads, g))


@pytest.mark.slow
def test_a_compiled_student_and_teacher_train_as_eager(teacher, demo_sft, tmp_path):
    """compile=True compiles both models; the chunked divergence runs eagerly between them (kd_terms)."""
    runs = {c: build(demo_sft, str(tmp_path / str(c)), teacher=teacher, compile=c, kd_chunk=16) for c in (False, True)}
    compiled_type = torch._dynamo.eval_frame.OptimizedModule
    assert isinstance(runs[True].model, compiled_type) and isinstance(runs[True].teacher, compiled_type)
    for it in range(3):
        eager, compiled = (train.train_step(runs[c], it) for c in (False, True))
        for k in ("loss", "grad_norm", *losses.KD_STATS):
            assert compiled[k] == pytest.approx(eager[k], rel=1e-4), (it, k)


@pytest.fixture(scope="module")
def student_base(demo_sft, tmp_path_factory):
    """A student-shaped SFT run of a few steps: what a LoRA or long-context student starts from."""
    out = str(tmp_path_factory.mktemp("student"))
    train_in_process([f"--data_dir={demo_sft}", f"--out_dir={out}", "--stage=sft", "--max_iters=4", "--eval_interval=4",
               "--block_size=128", "--batch_size=4", "--eval_iters=1", "--learning_rate=3e-3",
               *(f"--{k}={v}" for k, v in STUDENT.items())])
    return out


def test_a_lora_student_trains_its_adapters_only(teacher, student_base, demo_sft, tmp_path):
    run = build(demo_sft, str(tmp_path), teacher=teacher, init_from=student_base, lora_rank=4, kd_weight=1.0,
                kd_chunk=16, learning_rate=1e-2)
    batch = run.train_batches.get(0)
    with torch.no_grad():
        loss, stats = run.stage.loss(run, batch, "train")
    assert loss.item() / batch.w.sum().item() == pytest.approx(
        by_hand(run, batch, "forward_kl", 1.0, 1.0)[0].item() / batch.w.sum().item(), abs=1e-6)
    before = {n: p.detach().clone() for n, p in run.raw_model.named_parameters()}
    kd = [train.train_step(run, it)["kd"] for it in range(8)]
    assert kd[-1] < kd[0]
    for n, p in run.raw_model.named_parameters():
        assert torch.equal(p, before[n]) == (".lora_" not in n), n  # the adapters moved, nothing else


def test_long_sft_with_a_teacher_of_a_shorter_context(teacher, student_base, demo_sft, tmp_path, capsys):
    scaling = {"type": "yarn", "factor": 2.0, "original_max_seq_len": 128}
    run = build(demo_sft, str(tmp_path), teacher=teacher, init_from=student_base, block_size=256,
                rope_scaling=scaling, kd_chunk=64)
    train.print_plan(run)
    assert "trained at 128 positions, beyond which it extrapolates (block_size 256)" in capsys.readouterr().out
    batch = run.train_batches.get(0)
    assert batch.x.shape[1] == 256 and several_documents(batch)
    with torch.no_grad():
        loss, _ = run.stage.loss(run, batch, "train")
    assert loss.item() / batch.w.sum().item() == pytest.approx(
        by_hand(run, batch, "forward_kl", 1.0, 0.5)[0].item() / batch.w.sum().item(), abs=1e-6)
    assert math.isfinite(train.train_step(run, 0)["loss"])


def test_an_hf_teacher_of_the_same_tokenizer_teaches_as_its_run(teacher, demo_sft, tmp_path):
    import export

    hf_dir = str(tmp_path / "hf")
    export.export(teacher, hf_dir)
    runs = [build(demo_sft, str(tmp_path / name), teacher=t) for name, t in (("run", teacher), ("hf", hf_dir))]
    batch = runs[0].train_batches.get(0)
    with torch.no_grad():
        (a, sa), (b, sb) = (run.stage.loss(run, batch, "train") for run in runs)
    for k in losses.KD_STATS:
        assert sa[k].item() == pytest.approx(sb[k].item(), rel=1e-5), k


# -----------------------------------------------------------------------------
# bad input: one line, exit 2, before any work


@pytest.fixture(scope="module")
def odd_teachers(teacher, tmp_path_factory):
    """Teachers that must be refused: another vocabulary size (the same tokenizer), another tokenizer (the same
    number of ids, two of them swapped), a directory without a model."""
    root = tmp_path_factory.mktemp("odd_teachers")
    vocab, tokenizer, empty = (str(root / n) for n in ("vocab", "tokenizer", "empty"))
    shutil.copytree(teacher, vocab)
    state = load_checkpoint(os.path.join(vocab, "ckpt.pt"))
    n = state["model_config"]["vocab_size"]
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in state["model"]:
            state["model"][key] = torch.cat([state["model"][key], torch.zeros(64, state["model"][key].shape[1])])
    state["model_config"]["vocab_size"] = n + 64
    save_checkpoint(vocab, state)
    shutil.copytree(teacher, tokenizer)
    path = os.path.join(tokenizer, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    ids = spec["model"]["vocab"]
    a, b = sorted(ids, key=ids.get)[300:302]
    ids[a], ids[b] = ids[b], ids[a]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    os.makedirs(empty)
    return {"vocab": vocab, "tokenizer": tokenizer, "empty": empty, "n": n}


@pytest.mark.parametrize("case, args, message", [
    ("vocab", {"teacher": "{vocab}"}, "teacher {vocab} has a vocabulary of {n64} ids, the student {n}"),
    ("tokenizer", {"teacher": "{tokenizer}"}, "teacher {tokenizer}: its tokenizer ({n} tokens) is not the one {data}"),
    ("empty", {"teacher": "{empty}"}, "teacher: '{empty}' holds no model"),
    ("missing", {"teacher": "{empty}/nowhere"}, "teacher: '{empty}/nowhere' holds no model"),
    ("stage", {"stage": "pretrain", "teacher": "{teacher}"},
     "teacher='{teacher}' is a setting of stage sft; stage pretrain does not use it"),
    ("alpha", {"teacher": "{teacher}", "kd_weight": 1.5}, "kd_weight must be in [0, 1]"),
    ("alpha", {"teacher": "{teacher}", "kd_weight": -0.1}, "kd_weight must be in [0, 1]"),
    ("temperature", {"teacher": "{teacher}", "kd_temperature": 0.0}, "kd_temperature must be > 0, got 0.0"),
    ("kind", {"teacher": "{teacher}", "kd_loss": "kl"}, "kd_loss must be one of forward_kl, reverse_kl, jsd"),
    ("alone", {"kd_weight": 0.9}, "kd_weight=0.9 does nothing without teacher"),
    ("grpo", {"stage": "grpo", "reward": "teacher:{empty}"}, "reward 'teacher:{empty}': '{empty}' holds no model"),
    ("grpo", {"stage": "grpo", "reward": "exact_answer + teacher:"}, "reward 'exact_answer + teacher:': '' holds no"),
    ("grpo", {"stage": "grpo", "reward": "exact_answer", "grpo_group": 1}, "grpo_group must be >= 2"),
    ("grpo", {"stage": "grpo", "reward": "teacher:{teacher} + teacher:{teacher}"}, "more than one teacher term"),
])
def test_a_bad_teacher_setting_is_one_line_exit_2(case, args, message, odd_teachers, teacher, demo_sft, tmp_path,
                                                  capsys):
    names = {**odd_teachers, "teacher": teacher, "data": demo_sft, "n": f"{odd_teachers['n']:,}",
             "n64": f"{odd_teachers['n'] + 64:,}"}
    out = str(tmp_path / "run")
    with pytest.raises(ConfigError) as e:
        build(demo_sft, out, **{k: v.format(**names) if isinstance(v, str) else v for k, v in args.items()})
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message.format(**names) in err[0], err
    assert not os.path.exists(out)  # before any work


# -----------------------------------------------------------------------------
# across processes and restarts (subprocesses: torchrun, SIGKILL)


def kd_args(data, teacher, *extra):
    """train.py's arguments of a small distilled student, but its out_dir."""
    return [f"--data_dir={data}", "--stage=sft", f"--teacher={teacher}", "--kd_chunk=32",
            *(f"--{k}={v}" for k, v in STUDENT.items()), "--block_size=128", "--batch_size=4", "--eval_iters=2",
            "--log_interval=1", "--learning_rate=3e-3", "--warmup_iters=2", *extra]


@pytest.mark.slow
def test_kd_two_ranks_ddp_and_fsdp_equal_one_process(teacher, demo_sft, tmp_path):
    args = kd_args(demo_sft, teacher, "--max_iters=3", "--eval_interval=3", "--gradient_accumulation_steps=2",
                   "--device=cpu")
    runs, _ = two_ranks_equal_one_process(args, tmp_path, keys=("loss", "ce", "kd", "teacher_ce"))
    one = runs["one"]
    for d in (runs["ddp"], runs["fsdp"]):
        last = [r for r in metrics(d) if "val_kd" in r][-1]
        assert last["val_kd"] == pytest.approx([r for r in metrics(one) if "val_kd" in r][-1]["val_kd"], abs=1e-5)


@pytest.mark.slow
def test_kd_resumed_after_sigkill_equals_uninterrupted_and_keeps_its_teacher(teacher, demo_sft, tmp_path):
    own = str(tmp_path / "teacher")
    shutil.copytree(teacher, own)
    args = kd_args(demo_sft, own, "--max_iters=8", "--eval_interval=4", "--dropout=0.1")
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    train_in_process([*args, f"--out_dir={ref}"])
    sigkill_after_checkpoint([*args, f"--out_dir={out}"], 4)
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["frozen"]["teacher"]["path"] == os.path.abspath(own)
    train_in_process([*args, f"--out_dir={out}", "--init_from=resume"])
    want, got = train_losses(ref), train_losses(out)
    assert sorted(got) == list(range(1, 9)) and got == want, (want, got)
    for k, v in load_checkpoint(os.path.join(ref, "ckpt.pt"))["model"].items():
        assert torch.equal(v, load_checkpoint(os.path.join(out, "ckpt.pt"))["model"][k]), k
    # a teacher that changed since, or is gone, is refused on resume
    resume = [*args, f"--out_dir={out}", "--init_from=resume", "--max_iters=10"]
    state = load_checkpoint(os.path.join(own, "ckpt.pt"))
    state["model"]["model.norm.weight"] = state["model"]["model.norm.weight"] * 2
    save_checkpoint(own, state)
    p = run_train(resume, check=False)
    assert p.returncode == 2 and "the teacher of this run" in p.stderr and "has changed since" in p.stderr, p.stderr
    shutil.rmtree(own)
    p = run_train(resume, check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "holds no model" in p.stderr, p.stderr


# -----------------------------------------------------------------------------
# on-policy distillation: a teacher in grpo's reward


def grpo_args(data, reward, *extra):
    """train.py's arguments of a small grpo run, but its out_dir."""
    return [f"--data_dir={data}", "--stage=grpo", f"--reward={reward}",
            *(f"--{k}={v}" for k, v in STUDENT.items()), "--block_size=64", "--batch_size=2", "--grpo_group=2",
            "--max_new_tokens=12", "--eval_iters=1", "--log_interval=1", "--learning_rate=1e-2", "--warmup_iters=0",
            *extra]


@pytest.mark.parametrize("with_reward", [False, True])
def test_on_policy_advantages_are_the_log_prob_differences(with_reward, teacher, toy_grpo, tmp_path):
    """teacher alone: every completion token's advantage is log p_teacher - log p of the token sampled (the policy's
    at the sampling temperature); beside a verifiable reward: that times the term's weight, plus the completion's
    group-normalised advantage."""
    from llm_trainer.inference.generation import chat_stop_ids, completion_text

    data, toy = toy_grpo
    reward, weight = (f"{toy} + 0.5 * teacher:{teacher}", 0.5) if with_reward else (f"teacher:{teacher}", 1.0)
    run = train.build(train.configure(grpo_args(data, reward, f"--out_dir={tmp_path}", "--temperature=0.7")))
    _, micros, _ = grpo.rollouts(run, 0)
    b = micros[0]
    mask = b.w > 0
    with torch.no_grad():
        lp = F.log_softmax(run.raw_model(b.x).double() / 0.7, -1).gather(-1, b.y.unsqueeze(-1)).squeeze(-1)
        lt = F.log_softmax(run.teacher(b.x).double(), -1).gather(-1, b.y.unsqueeze(-1)).squeeze(-1)
    stop = chat_stop_ids(run.tokenizer)
    refs = [run.train_batches.split.refs[int(u)] for u in b.units]
    texts = [completion_text(run.tokenizer, y[m].tolist(), stop) for y, m in zip(b.y, mask)]
    rewards = torch.tensor([run.reward(r["prompt"], t, r["answer"]) for r, t in zip(refs, texts)])
    row = grpo.advantages(rewards, 2) if with_reward else torch.zeros(len(texts))
    assert bool(row.abs().sum() > 0) == with_reward
    want = (row[:, None].double() + weight * (lt - lp)) * mask
    assert b.advantages.shape == b.w.shape and mask.sum() > 10
    assert torch.allclose(b.advantages.double(), want, atol=1e-5, rtol=0)
    loss, stats = run.stage.loss(run, b, "train")
    assert stats["teacher_kl"].item() == pytest.approx(((lp - lt) * mask).sum().item(), abs=1e-4)


def test_a_grpo_group_of_one_is_enough_for_a_teacher_alone(teacher, toy_grpo, tmp_path):
    run = train.build(train.configure(grpo_args(toy_grpo[0], f"teacher:{teacher}", f"--out_dir={tmp_path}",
                                                "--grpo_group=1")))
    stats = train.train_step(run, 0)
    assert math.isfinite(stats["loss"]) and stats["teacher_kl"] > 0


@pytest.mark.slow
def test_on_policy_two_ranks_equal_one_process_and_resume_exactly(teacher, toy_grpo, tmp_path):
    data, toy = toy_grpo
    args = grpo_args(data, f"{toy} + teacher:{teacher}", "--max_iters=4", "--eval_interval=2",
                     "--gradient_accumulation_steps=2", "--device=cpu")
    runs, _ = two_ranks_equal_one_process(args, tmp_path, keys=("loss", "reward", "teacher_kl"))
    one, killed = runs["one"], str(tmp_path / "killed")
    sigkill_after_checkpoint([*args, f"--out_dir={killed}"], 2)
    train_in_process([*args, f"--out_dir={killed}", "--init_from=resume"])
    assert train_losses(killed) == train_losses(one)
    assert [r["teacher_kl"] for r in metrics(killed) if "teacher_kl" in r] == [
        r["teacher_kl"] for r in metrics(one) if "teacher_kl" in r]


# -----------------------------------------------------------------------------
# bench.py --kd


def test_bench_kd_mode_times_the_three_runs(tmp_path):
    import bench

    path = tmp_path / "bench.json"
    n = torch.get_num_threads()
    try:
        bench.main(["--device=cpu", "--model=tiny", "--dim=32", "--n_layers=1", "--n_heads=2", "--vocab_size=256",
                    "--block_size=32", "--batch_size=2", "--warmup_steps=1", "--steps=1", "--rounds=1", "--threads=1",
                    "--kd=True", "--kd_chunk=8", "--kd_teacher=tiny", f"--json={path}"])
    finally:
        torch.set_num_threads(n)
    fig = json.loads(path.read_text())["figures"]
    assert list(fig) == bench.KD_KEYS
    assert fig["kd.teacher_params"] > fig["model.params"] > 0  # the tiny preset's shape, the student's vocabulary
    assert fig["kd.kd_over_sft"] == pytest.approx(fig["kd.kd.step_ms"] / fig["kd.sft.step_ms"])
    assert fig["kd.target_tokens_per_step"] > 8 and fig["kd.kd.peak_mem_mb"] is None  # no CUDA peak on a CPU
