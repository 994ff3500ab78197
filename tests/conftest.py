"""Shared fixtures of the data tests: a small bilingual corpus and a tokenizer trained on it once."""

import pytest

from llm_trainer.data import tokenizer

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
    """CORPUS (test files import nothing from conftest: another conftest.py may shadow the name)."""
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
