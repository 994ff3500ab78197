"""The session fixtures of the test suite (its one conftest.py; shared helpers are in tests/helpers.py): a small
corpus and a tokenizer trained on it, and the embedded demo data prepared once per test session."""

import json
import os
import random

import pytest

import prepare
from llm_trainer.data import tokenizer
from tests.helpers import DEMO, TOY_REWARD

# -----------------------------------------------------------------------------
# a small bilingual corpus and a tokenizer trained on it once (the data tests)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "It is only the great men who are truly obscene.\n\t\t-- Havelock Ellis",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "三百六十行，行行出状元。“你好！”她说：（这是测试）【标题】《书名》……",
    "Assistant: 42 + 17 = 59. User asked again, the assistant answered twice!",
    "def add(a, b):\n    return a + b  # 🙂 emoji 🚀 and tabs\tok",
]


@pytest.fixture(scope="session")
def data_corpus():
    """CORPUS, a copy per test."""
    return list(CORPUS)


@pytest.fixture(scope="session")
def data_tok():
    """A byte-level BPE ChatTokenizer (vocab 600) trained on CORPUS."""
    return tokenizer.train_tokenizer(CORPUS * 20, 600)


@pytest.fixture(scope="session")
def data_tok_dir(data_tok, tmp_path_factory):
    """data_tok saved in a directory, as prepare.py --tokenizer=DIR takes it."""
    path = tmp_path_factory.mktemp("tokenizer")
    data_tok.save(str(path))
    return path


# -----------------------------------------------------------------------------
# the demo data, prepared


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


@pytest.fixture(scope="session")
def toy_grpo(tmp_path_factory, demo_pretrain):
    """A grpo set of made-up prompts ({"prompt", "answer"}) with the demo tokenizer, and a reward file for a task a
    random model learns within a few dozen steps: write many a's. Returns (data dir, reward spec)."""
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
