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
