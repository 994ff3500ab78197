"""The session fixtures of the test suite (its one conftest.py; shared helpers are in tests/helpers.py): a small
corpus and a tokenizer trained on it, and the embedded demo data prepared once per test session."""

import json
import os
import random

import pytest
import torch

import prepare
from llm_trainer.data import tokenizer
from tests.helpers import DEMO, TINY, TOY_REWARD, make_run_dir, train_in_process


def pytest_configure(config):
    """Under pytest-xdist (make test) the workers share the cores: one torch thread each, in this process and in the
    processes it starts (demo.py), so that two workers do not fight over two cores; and torch.compile compiles in
    the worker, without a pool of compile processes (starting one cost the two compile tests ~38 s of their 48)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        from torch._inductor import config as inductor  # read its environment when torch was imported, before this

        os.environ["OMP_NUM_THREADS"] = os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
        torch.set_num_threads(1)
        inductor.compile_threads = 1


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
def demo_dpo_small(tmp_path_factory, demo_pretrain):
    """The demo's first 96 training and 32 held-out pairs: for tests of what a DPO step computes, where
    dpo_precompute_ref=True would score all 1,150 pairs of demo_dpo up front."""
    root = tmp_path_factory.mktemp("demo_dpo_small")
    for split, n in (("train", 96), ("val", 32)):
        with open(os.path.join(DEMO, f"dpo_{split}.jsonl"), encoding="utf-8") as f:
            (root / f"{split}.jsonl").write_text("".join(line for _, line in zip(range(n), f)), encoding="utf-8")
    return _prepare(root / "data", input=root / "train.jsonl", val_input=root / "val.jsonl", tokenizer=demo_pretrain)


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


# -----------------------------------------------------------------------------
# tiny runs of train.py, trained once per session: start from them (init_from) rather than train your own


@pytest.fixture(scope="session")
def pretrain_run(demo_pretrain, tmp_path_factory):
    """A tiny pretrained model (20 steps), e.g. the base of LoRA runs."""
    out = str(tmp_path_factory.mktemp("pretrain_run"))
    train_in_process([f"--data_dir={demo_pretrain}", f"--out_dir={out}", "--max_iters=20", "--eval_interval=20",
                      "--learning_rate=1e-2", *TINY])
    return out


@pytest.fixture(scope="session")
def sft_run(demo_sft, tmp_path_factory):
    """A tiny SFT model (40 steps from scratch), the start of the post-training stages."""
    out = str(tmp_path_factory.mktemp("sft_run"))
    train_in_process([f"--data_dir={demo_sft}", f"--out_dir={out}", "--stage=sft", "--max_iters=40",
                      "--eval_interval=40", "--learning_rate=3e-3", *TINY])
    return out


@pytest.fixture(scope="session")
def made_run(tmp_path_factory):
    """made_run(stage): a run directory named stage, from helpers.make_run_dir (a tiny model, 30 AdamW steps, no
    train.py), made once per session. Read it, export it; copy it to change it."""
    made = {}

    def get(stage):
        if stage not in made:
            made[stage] = make_run_dir(tmp_path_factory.mktemp(f"made_{stage}") / stage, stage=stage)
        return made[stage]

    return get
