"""shards.py: writing shards, reading a split across shard boundaries, refusing incomplete or damaged data."""

import json
import os

import numpy as np
import pytest

import shards


def make_dataset(tmp_path, docs, shard_tokens, vocab_size=1000, pairs=False):
    """A prepared directory holding `docs` (lists of ids; mask = id is odd) in the train split."""
    dtype = shards.token_dtype(vocab_size)
    writer = shards.ShardWriter(str(tmp_path), "train", dtype, shard_tokens)
    for i, d in enumerate(docs):
        if pairs and i % 2 == 0:
            writer.add_pair(d, np.array(d) % 2, docs[i + 1], np.array(docs[i + 1]) % 2)
        elif not pairs:
            writer.add(d, np.array(d) % 2)
    split = {"tokens": writer.tokens, "documents": writer.documents, "targets": writer.targets, "shards": writer.close()}
    empty = {"tokens": 0, "documents": 0, "targets": 0, "shards": []}
    meta = {"version": shards.FORMAT_VERSION, "stage": "pretrain", "dtype": dtype, "vocab_size": vocab_size,
            "special_ids": {}, "splits": {"train": split, "val": empty}}
    shards.write_meta(str(tmp_path), meta)
    return meta


DOCS = [list(range(1 + 10 * k, 1 + 10 * k + n)) for k, n in enumerate([5, 7, 3, 9, 4, 6, 8, 2])]


def test_split_reads_across_shard_boundaries(tmp_path):
    meta = make_dataset(tmp_path, DOCS, shard_tokens=12)
    names = [s["name"] for s in meta["splits"]["train"]["shards"]]
    assert names == ["train_00000", "train_00001", "train_00002", "train_00003"]  # 5+7, 3+9, 4+6, 8+2
    split = shards.open_split(tmp_path, "train", verify=True)
    everything = np.concatenate([np.array(d) for d in DOCS])
    assert split.num_tokens == len(everything) and split.num_docs == len(DOCS)
    assert split.meta["dtype"] == "uint16"
    for i, d in enumerate(DOCS):  # documents never span shards, and come back whole
        tokens, mask = split.document(i)
        assert tokens.tolist() == d and mask.tolist() == [t % 2 for t in d]
        assert split.doc_ends[i] - split.doc_starts[i] == len(d)
    for start in range(len(everything) - 20):  # windows crossing one or more shard boundaries
        tokens, mask = split.read(start, 20)
        assert tokens.dtype == np.int64 and mask.dtype == np.uint8
        assert tokens.tolist() == everything[start : start + 20].tolist()
        assert mask.tolist() == (everything[start : start + 20] % 2).tolist()
    with pytest.raises(IndexError):
        split.read(len(everything) - 3, 4)
    assert meta["splits"]["train"]["targets"] == int((everything % 2).sum())
    val = shards.open_split(tmp_path, "val", verify=True)  # an empty split is valid
    assert (val.num_tokens, val.num_docs, len(val.doc_starts), len(val.doc_ends)) == (0, 0, 0, 0)


def test_big_document_gets_its_own_shard_and_pairs_stay_together(tmp_path):
    meta = make_dataset(tmp_path, [[1, 2], [3] * 30, [4, 5, 6], [7]], shard_tokens=4, pairs=True)
    counts = [(s["tokens"], s["documents"]) for s in meta["splits"]["train"]["shards"]]
    assert counts == [(32, 2), (4, 2)]  # pair 1 overflows shard_tokens but is never cut


def test_uint32_ids(tmp_path):
    docs = [[70000, 1, 65535, 65536], [99999]]
    make_dataset(tmp_path, docs, shard_tokens=100, vocab_size=100_000)
    split = shards.open_split(tmp_path, "train", verify=True)
    assert split.meta["dtype"] == "uint32" and os.path.getsize(tmp_path / "train_00000.bin") == 5 * 4
    assert split.read(0, 5)[0].tolist() == [70000, 1, 65535, 65536, 99999]


def error_of(call):
    with pytest.raises(SystemExit) as e:
        call()
    assert e.value.code == 2
    return str(e.value)


def test_incomplete_or_unknown_directories_are_refused(tmp_path):
    assert "does not exist" in error_of(lambda: shards.load_meta(tmp_path / "missing"))
    make_dataset(tmp_path, DOCS, shard_tokens=100)
    os.remove(tmp_path / "meta.json")
    message = error_of(lambda: shards.open_split(tmp_path, "train"))
    assert "incomplete (no meta.json)" in message and str(tmp_path) in message and "re-run prepare.py" in message
    make_dataset(tmp_path, DOCS, shard_tokens=100)
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps(dict(meta, version=99)))
    assert "version 99" in error_of(lambda: shards.load_meta(tmp_path))


def test_size_mismatch_names_the_file(tmp_path):
    make_dataset(tmp_path, DOCS, shard_tokens=20)
    path = tmp_path / "train_00001.mask"
    path.write_bytes(path.read_bytes()[:-1])
    message = error_of(lambda: shards.open_split(tmp_path, "train"))  # checked even without verify
    assert str(path) in message and "bytes" in message
    make_dataset(tmp_path, DOCS, shard_tokens=20)
    os.remove(tmp_path / "train_00002.idx")
    assert str(tmp_path / "train_00002.idx") in error_of(lambda: shards.open_split(tmp_path, "train"))


def test_checksum_mismatch_names_the_file(tmp_path):
    make_dataset(tmp_path, DOCS, shard_tokens=20)
    path = tmp_path / "train_00001.bin"
    data = bytearray(path.read_bytes())
    data[0] ^= 1  # same size, different content
    path.write_bytes(bytes(data))
    shards.open_split(tmp_path, "train")  # sizes are fine: only verify reads every byte
    message = error_of(lambda: shards.open_split(tmp_path, "train", verify=True))
    assert str(path) in message and "sha256" in message


def test_out_of_vocab_id_is_detected(tmp_path):
    make_dataset(tmp_path, DOCS, shard_tokens=1000, vocab_size=50)  # DOCS hold ids up to 78
    message = error_of(lambda: shards.open_split(tmp_path, "train", verify=True))
    assert "train_00000.bin" in message and ">= vocab_size 50" in message
