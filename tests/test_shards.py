"""llm_trainer/data/shards.py: writing shards, reading a split across shard boundaries, refusing incomplete or damaged data."""

import json
import os

import numpy as np
import pytest

from llm_trainer.data import shards


def make_dataset(tmp_path, docs, shard_tokens, vocab_size=1000, pairs=False):
    """A prepared directory holding `docs` (lists of ids; mask = id is odd) in the train split."""
    dtype = shards.token_dtype(vocab_size)
    writer = shards.ShardWriter(str(tmp_path), "train", dtype, shard_tokens)
    for i, d in enumerate(docs):
        if pairs and i % 2 == 0:
            pair = np.array(d + docs[i + 1])
            writer.add_units(pair, pair % 2, [len(d), len(docs[i + 1])], [2])
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


def test_units_added_in_batches_give_the_same_shards_as_one_by_one(tmp_path):
    """add_units() places many units per call; the shards must be those of the one-unit-at-a-time rule: a unit
    goes into the current shard if it fits or the shard is empty, else it starts the next one."""
    rng = np.random.default_rng(0)
    units = [[list(rng.integers(1, 999, rng.integers(1, 30))) for _ in range(rng.choice([1, 2]))] for _ in range(60)]
    shard_tokens = 40  # some units (up to 58 tokens) are longer than a shard

    def write(name, batches):
        writer = shards.ShardWriter(str(tmp_path / name), "train", "uint16", shard_tokens)
        os.makedirs(tmp_path / name)
        for batch in batches:
            docs = [d for u in batch for d in u]
            ids = np.concatenate([np.array(d) for d in docs])
            writer.add_units(ids, ids % 2, [len(d) for d in docs], [len(u) for u in batch])
        return writer.close(), {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()}

    expected, used = [], shard_tokens  # the rule, unit by unit: (tokens, documents) per shard
    for u in units:
        n = sum(map(len, u))
        if used + n > shard_tokens and used > 0:
            expected.append([0, 0])
            used = 0
        expected[-1][0] += n
        expected[-1][1] += len(u)
        used += n
    one_by_one = write("one", [[u] for u in units])
    cuts = sorted(rng.choice(np.arange(1, len(units)), 7, replace=False))
    batched = write("batched", [units[a:b] for a, b in zip([0, *cuts], [*cuts, len(units)])])
    whole = write("whole", [units])
    assert [[s["tokens"], s["documents"]] for s in one_by_one[0]] == expected
    assert one_by_one == batched == whole


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
