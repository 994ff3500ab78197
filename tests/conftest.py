"""Shared fixtures of the data tests: a small bilingual corpus and a tokenizer trained on it once."""

import json

import pytest

import chat

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "It is only the great men who are truly obscene.\n\t\t-- Havelock Ellis",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "三百六十行，行行出状元。“你好！”她说：（这是测试）【标题】《书名》……",
    "Assistant: 42 + 17 = 59. User asked again, the assistant answered twice!",
    "def add(a, b):\n    return a + b  # 🙂 emoji 🚀 and tabs\tok",
]


def write_jsonl(path, records):
    """Write records (dicts/lists, or raw str/bytes lines written as they are) one per line."""
    with open(path, "wb") as f:
        for r in records:
            line = r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)).encode()
            f.write(line + b"\n")
    return path


@pytest.fixture(scope="session")
def data_tok():
    """A byte-level BPE ChatTokenizer (vocab 600) trained on CORPUS."""
    return chat.train_tokenizer(CORPUS * 20, 600)


@pytest.fixture(scope="session")
def data_tok_dir(data_tok, tmp_path_factory):
    """data_tok saved in a directory, as prepare.py --tokenizer=DIR takes it."""
    path = tmp_path_factory.mktemp("tokenizer")
    data_tok.save(str(path))
    return path
