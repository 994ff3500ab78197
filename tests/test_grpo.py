"""GRPO as a stage of the one loop: advantages and loss by hand, the built-in rewards, a toy task learnt, exact
resume, 2 ranks == 1 process, clear errors for bad rewards, and a GRPO run that exports like any other."""

import json
import math
import os

import pytest
import torch

import export
from llm_trainer.training import grpo
from llm_trainer.training import losses
from llm_trainer.training import rewards
from llm_trainer.data import shards
from llm_trainer.core.checkpoint import load_model
from tests.helpers import TINY, metrics, train_in_process, two_ranks_equal_one_process

transformers = pytest.importorskip("transformers")


# -----------------------------------------------------------------------------
# by hand


def test_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5])
    a = grpo.advantages(r, group=2, std_norm=False)
    assert a.tolist() == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0]
    a = grpo.advantages(r, group=2)  # std of [1, 0] is 0.5; a group of equal rewards has no signal
    assert a.tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0, 0.0, 0.0], abs=1e-5)


def test_loss_by_hand_and_ratio_one_kl_zero_at_the_start():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.5, -2.5]])
    w = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # target tokens: (0,1), (0,2), (1,0), (1,1)
    adv = torch.tensor([2.0, -1.0])
    old = logp + torch.tensor([[0.0, 0.5, -0.05], [0.1, -0.4, 0.0]])  # ratios e^-0.5, e^0.05, e^-0.1, e^0.4
    ref = logp - 0.2
    clip, kl_coef = 0.2, 0.1
    loss, stats = losses.grpo_terms(logp, old, ref, adv, w, clip, kl_coef)
    expected, kl_sum, clipped = 0.0, 0.0, 0
    for (i, j), a in {(0, 1): 2.0, (0, 2): 2.0, (1, 0): -1.0, (1, 1): -1.0}.items():
        ratio = math.exp(logp[i, j] - old[i, j])
        pg = -min(ratio * a, min(max(ratio, 1 - clip), 1 + clip) * a)
        kl = math.exp(-0.2) + 0.2 - 1  # ref - logp = -0.2 everywhere
        expected += pg + kl_coef * kl
        kl_sum += kl
        clipped += abs(ratio - 1) > clip
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["kl"].item() == pytest.approx(kl_sum, rel=1e-6) and stats["clip_fraction"].item() == clipped == 2
    # policy == rollout policy == reference: ratio 1 (nothing clipped), KL 0, the loss is -sum(A) over targets
    loss, stats = losses.grpo_terms(logp, logp.detach(), logp.detach(), adv, w, clip, kl_coef)
    assert stats["kl"].item() == 0 and stats["clip_fraction"].item() == 0
    assert loss.item() == pytest.approx(-(2 * 2.0 + 2 * -1.0))


@pytest.mark.parametrize("completion, reference, exact, form", [
    ("788", "788", 1, 0),
    ("  788 \n", "788", 1, 0),
    ("７８８", "788", 1, 0),  # full-width digits
    ("<think>\n7+1=8, 8+1=9...\n</think>\n788", "788", 1, 1),
    ("<think>\nstill thinking, 788", "788", 0, 0),  # unclosed: no answer yet
    ("<think>\n\n</think>\n788", "788", 1, 0),  # empty reasoning is not well formed
    ("<think>\nok\n</think>\n", "788", 0, 0),  # no answer
    ("788 is the answer", "788", 0, 0),  # trailing text
    ("<think>a</think>1<think>b</think>788", "788", 1, 0),  # two blocks: the answer after the last
])
def test_builtin_rewards(completion, reference, exact, form):
    assert rewards.exact_answer("q", completion, reference) == exact
    assert rewards.think_format("q", completion, reference) == form


def test_a_weighted_sum_of_rewards(tmp_path):
    r = rewards.Reward("exact_answer + 0.5 * think_format")
    assert r("q", "<think>\nx\n</think>\n4", "4") == 1.5 and r("q", "5", "4") == 0.0


# -----------------------------------------------------------------------------
# data


def test_prepare_makes_tasks_from_prompts_and_from_chats(tmp_path, demo_pretrain):
    import prepare

    src = tmp_path / "mixed.jsonl"
    lines = [{"prompt": "1 + 1 = ?", "answer": "2"},
             {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                {"role": "user", "content": "2 + 2?"},
                                {"role": "assistant", "reasoning_content": "two and two", "content": "4"}]},
             {"prompt": "  ", "answer": "x"},  # bad: empty prompt
             {"conversations": [{"role": "assistant", "content": "alone"}]}]  # bad: nothing to answer
    src.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    meta = prepare.main([f"--input={src}", f"--out_dir={tmp_path / 'out'}", f"--tokenizer={demo_pretrain}",
                         "--stage=grpo", "--val_fraction=0", "--workers=1"])
    assert meta["stage"] == "grpo" and meta["counts"]["kept"] == 2
    assert meta["counts"]["skipped"] == {"empty_content": 1, "no_prompt": 1}
    split = shards.open_split(tmp_path / "out", "train", verify=True)
    assert split.refs == [{"prompt": "1 + 1 = ?", "answer": "2"}, {"prompt": "2 + 2?", "answer": "4"}]
    from llm_trainer.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tmp_path / "out")
    text = tok.decode(split.document(1)[0].tolist())
    assert text.endswith("<|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\n") and "yo" in text
    assert split.document(1)[1].sum() == 0  # a prompt has no targets


# -----------------------------------------------------------------------------
# training


def grpo_args(toy, out, *extra):
    data, reward = toy
    return [f"--data_dir={data}", f"--out_dir={out}", "--stage=grpo", f"--reward={reward}", *TINY,
            "--batch_size=4", "--grpo_group=4", "--max_new_tokens=12", "--eval_iters=3", *extra]


@pytest.mark.slow
def test_a_toy_reward_is_learnt_on_held_out_prompts(toy_grpo, tmp_path):
    out = str(tmp_path / "run")
    p = train_in_process(grpo_args(toy_grpo, out, "--max_iters=30", "--eval_interval=30", "--learning_rate=1e-2",
                            "--grpo_group=8", "--max_new_tokens=16", "--eval_iters=5"))
    evals = [r for r in metrics(out) if "val_reward" in r]
    assert evals[-1]["val_reward"] > evals[0]["val_reward"] + 0.2, evals
    record = [r for r in metrics(out) if "loss" in r][-1]
    for key in ("reward", "reward_std", "accuracy", "no_signal", "completion_len", "kl", "clip_fraction", "gen_s"):
        assert key in record, key
    assert "stage grpo: 4 prompts x 8 completions" in p.stdout


def test_ppo_epochs_and_kl_run_and_start_at_ratio_one(toy_grpo, tmp_path):
    """grpo_epochs=2 (the ratio to the rollout policy, clipped) with a KL to the start: at the first update the
    policy is the rollout policy and the reference, so nothing is clipped and the KL is 0."""
    out = str(tmp_path / "run")
    train_in_process(grpo_args(toy_grpo, out, "--max_iters=2", "--eval_interval=2", "--grpo_epochs=2",
                               "--grpo_kl=0.1", "--learning_rate=1e-2", "--warmup_iters=0"))
    first = [r for r in metrics(out) if "loss" in r][0]  # the record of iteration 1: its second update's figures
    assert first["kl"] > 0  # the second update's: the policy has moved off the reference by then
    import train

    run = train.build(train.configure(grpo_args(toy_grpo, str(tmp_path / "inproc"), "--grpo_epochs=2",
                                                "--grpo_kl=0.1")))
    _, micros, _ = grpo.rollouts(run, 0)
    cfg = run.cfg
    loss, stats = losses.grpo_loss(run.model, micros[0], cfg["temperature"], cfg["grpo_clip"], cfg["grpo_kl"])
    assert stats["kl"].item() == pytest.approx(0, abs=1e-6) and stats["clip_fraction"].item() == 0


@pytest.mark.slow
def test_two_ranks_equal_one_process(toy_grpo, tmp_path):
    """Under FSDP too (generation in the step: no hang); the same rewards: the same completions were sampled."""
    args = [a for a in grpo_args(toy_grpo, "", "--max_iters=3", "--eval_interval=3", "--gradient_accumulation_steps=2",
                                 "--device=cpu", "--learning_rate=1e-2") if a != "--out_dir="]
    two_ranks_equal_one_process(args, tmp_path, keys=("loss", "reward"), tol=1e-6)


@pytest.mark.parametrize("body, message", [
    ("def f(prompt, completion, reference):\n    raise ValueError('boom')\n", "reward {spec} raised ValueError: boom"),
    ("def f(prompt, completion, reference):\n    return 'yes'\n", "reward {spec} returned 'yes', not a finite number"),
    ("g = 1\n", "has no function f"),
])
def test_a_bad_reward_is_one_clear_line(body, message, toy_grpo, tmp_path):
    path = tmp_path / "bad_reward.py"
    path.write_text(body)
    spec = f"{path}:f"
    p = train_in_process(grpo_args((toy_grpo[0], spec), str(tmp_path / "run"), "--max_iters=2"), check=False)
    lines = [line for line in p.stderr.strip().splitlines() if line]
    assert p.returncode == 2 and len(lines) == 1 and message.format(spec=spec) in lines[0], p.stderr
    if "raised" in message:
        assert "(prompt 'Say something about" in lines[0]  # which prompt


def test_a_grpo_run_exports_and_samples_like_any_other(toy_grpo, tmp_path):
    out, hf_dir = str(tmp_path / "run"), str(tmp_path / "hf")
    train_in_process(grpo_args(toy_grpo, out, "--max_iters=2", "--eval_interval=2"))
    export.export(out, hf_dir)
    ours, info = load_model(out)
    assert info["stage"] == "grpo"
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True)
    idx = torch.randint(0, ours.mcfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() <= 1e-4
    from llm_trainer.inference import generation

    assert generation.load(out)[2]["chat"]  # a grpo run chats by default, as sft and dpo runs do
    assert os.path.isfile(os.path.join(hf_dir, "tokenizer.json"))
