"""GRPO's held-out figures: an evaluation counts no prompt twice, and the demo's prompt-independent baselines (the
most frequent train answer; answers drawn from the train answers' frequencies) are what they say, by hand."""

import pytest

import demo
from tests.helpers import TINY, train_in_process


def test_answer_baselines_by_hand():
    train = ["3", "4", "4", "5", "4", "3"]  # shares: 4 -> 1/2, 3 -> 1/3, 5 -> 1/6
    held_out = ["4", "3", "7", "5"]
    b = demo.answer_baselines(train, held_out, k=2)
    assert b["answer"] == "4"
    assert b["greedy"] == [1.0, 0.0, 0.0, 0.0]
    assert b["mean"] == pytest.approx([1 / 2, 1 / 3, 0.0, 1 / 6])
    assert b["pass"] == pytest.approx([1 - (1 / 2) ** 2, 1 - (2 / 3) ** 2, 0.0, 1 - (5 / 6) ** 2])  # 3/4, 5/9, 0, 11/36
    assert demo.answer_baselines(["b", "a", "b", "a"], ["a"], 1)["answer"] == "a"  # a tie: the first in sorted order


def test_paired_differences_by_hand():
    d = demo.paired([1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0])  # differences 0, 1, 0, 1
    assert d["mean"] == 0.5 and d["n"] == 4 and d["se"] == pytest.approx((1 / 3) ** 0.5 / 2)


def test_the_answer_baselines_match_sampling():
    """The exact expectations equal the means of many draws from the train answers (within 4 standard errors)."""
    import random

    rng, train, held_out = random.Random(0), ["2"] * 5 + ["3"] * 3 + ["4"] * 2, ["2", "3", "4", "9"]
    b = demo.answer_baselines(train, held_out, k=3)
    draws = 20000
    for i, a in enumerate(held_out):
        hits = sum(any(rng.choice(train) == a for _ in range(3)) for _ in range(draws)) / draws
        assert abs(hits - b["pass"][i]) < 4 * (b["pass"][i] * (1 - b["pass"][i]) / draws) ** 0.5 + 1e-9


def test_an_evaluation_that_would_count_a_prompt_twice_is_one_clear_line(toy_grpo, tmp_path):
    data, reward = toy_grpo  # 40 held-out prompts: 11 x 4 would take 44
    p = train_in_process([f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}", "--stage=grpo", f"--reward={reward}",
                          *TINY, "--grpo_group=2", "--max_new_tokens=4", "--max_iters=1", "--eval_iters=11"],
                         check=False)
    lines = [line for line in p.stderr.strip().splitlines() if line]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "eval_iters 11 x batch_size 4 held-out prompts" in lines[0] and "holds 40" in lines[0]
