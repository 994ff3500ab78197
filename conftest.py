"""Session fixtures shared by the test files: the embedded demo data, prepared once per test session."""

import os

import pytest

import prepare

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo")


def _prepare(out_dir, **keys):
    prepare.main([f"--{k}={v}" for k, v in {"out_dir": out_dir, "workers": 1, "seed": 1337, **keys}.items()])
    return str(out_dir)


@pytest.fixture(scope="session")
def demo_pretrain(tmp_path_factory):
    """The demo corpus with a freshly trained 1,024-token tokenizer, 5% held out."""
    return _prepare(tmp_path_factory.mktemp("demo_pretrain"), input=os.path.join(DEMO, "pretrain.jsonl"),
                    tokenizer="train", vocab_size=1024, val_fraction=0.05)


def _chat_data(tmp_path_factory, name, stem, demo_pretrain, max_len=256):
    return _prepare(tmp_path_factory.mktemp(name), input=os.path.join(DEMO, f"{stem}_train.jsonl"),
                    val_input=os.path.join(DEMO, f"{stem}_val.jsonl"), tokenizer=demo_pretrain, max_len=max_len)


@pytest.fixture(scope="session")
def demo_sft(tmp_path_factory, demo_pretrain):
    return _chat_data(tmp_path_factory, "demo_sft", "sft", demo_pretrain)


@pytest.fixture(scope="session")
def demo_reason(tmp_path_factory, demo_pretrain):
    return _chat_data(tmp_path_factory, "demo_reason", "reason", demo_pretrain, max_len=384)


@pytest.fixture(scope="session")
def demo_dpo(tmp_path_factory, demo_pretrain):
    return _chat_data(tmp_path_factory, "demo_dpo", "dpo", demo_pretrain)


TOY_REWARD = '''
def share_of_a(prompt, completion, reference):
    """The share of the completion's characters that are the letter a: an easy, dense reward."""
    return completion.count("a") / max(len(completion), 1)
'''


@pytest.fixture(scope="session")
def toy_grpo(tmp_path_factory, demo_pretrain):
    """A grpo set of made-up prompts ({"prompt", "answer"}) with the demo tokenizer, and a reward file for a task a
    random model learns within a few dozen steps: write many a's. Returns (data dir, reward spec)."""
    import json
    import random

    root = tmp_path_factory.mktemp("toy_grpo")
    rng = random.Random(0)
    words = ["apple", "banana", "cherry", "river", "stone", "music", "light", "ocean", "tree", "cloud"]
    for name, n in (("train", 300), ("val", 40)):
        with open(root / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for i in range(n):
                f.write(json.dumps({"prompt": f"Say something about the {rng.choice(words)}, case {i}.",
                                    "answer": "a"}) + "\n")
    (root / "reward_a.py").write_text(TOY_REWARD, encoding="utf-8")
    data = _prepare(root / "data", input=root / "train.jsonl", val_input=root / "val.jsonl", tokenizer=demo_pretrain)
    return data, f"{root / 'reward_a.py'}:share_of_a"
