"""prepare.py end to end on small inputs: formats, splits, bad records, errors, compression, workers, atomicity."""

import bz2
import gzip
import io
import json
import lzma
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import prepare
from llm_trainer.data import shards
from llm_trainer.data.records import detect_record
from llm_trainer.data.tokenizer import file_sha256, load_tokenizer
from tests.helpers import documents, run_prepare, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
def snapshot(out_dir):
    """Every byte of a prepared directory, meta.json without its timing."""
    files = {p.name: p.read_bytes() for p in sorted(Path(out_dir).iterdir()) if p.name != "meta.json"}
    meta = json.loads((Path(out_dir) / "meta.json").read_text())
    meta.pop("timing")
    return files, meta


def fails(capsys, **config):
    """Run prepare expecting a one-line error with exit status 2; return the error line."""
    with pytest.raises(SystemExit) as e:
        run_prepare(**config)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ")
    return err[-1]


def msg(role, content, **extra):
    return {"role": role, "content": content, **extra}


CHAT_RECORDS = [
    {"conversations": [msg("user", "床前明月光"), msg("assistant", "疑是地上霜")]},
    {"messages": [msg("system", "be brief"), msg("user", "42 + 17?"), msg("assistant", "59")]},
    {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "您好！"}]},
    [msg("user", "list style"), msg("assistant", "ok")],
    {"instruction": "Add", "input": "2 and 3", "output": "5", "history": [["hi", "hello"]]},
    {"conversations": [msg("user", "1+1?"), msg("assistant", "2", reasoning_content="one plus one")]},
]


def test_chat_formats_become_rendered_documents(tmp_path, data_tok, data_tok_dir):
    write_jsonl(tmp_path / "chat.jsonl", CHAT_RECORDS)
    meta = run_prepare(tmp_path / "out", input=tmp_path / "chat.jsonl", tokenizer=data_tok_dir, val_fraction=0.0)
    assert meta["stage"] == "sft" and meta["counts"]["kept"] == len(CHAT_RECORDS)
    assert meta["counts"]["by_format"] == {"conversations": 2, "messages": 1, "sharegpt": 1, "message_list": 1,
                                           "alpaca": 1}
    expected = [data_tok.render_chat(detect_record(r)[1]) for r in CHAT_RECORDS]
    assert documents(tmp_path / "out") == expected
    assert meta["splits"]["train"]["targets"] == sum(sum(m) for _, m in expected)
    assert meta["tokenizer_source"] == str(data_tok_dir) and meta["added_special_tokens"] == 0
    copy, original = (json.loads(t.to_str()) for t in (load_tokenizer(tmp_path / "out"), data_tok))
    assert copy.pop("post_processor")["single"][0] == {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
    original.pop("post_processor")
    assert copy == original  # a copy of the tokenizer travels along (it starts a text as a document: see save())


def test_text_documents_and_a_seeded_val_split(tmp_path, data_tok, data_tok_dir, data_corpus):
    texts = [f"{data_corpus[i % len(data_corpus)]} #{i}" for i in range(200)]
    write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in texts])
    common = dict(input=tmp_path / "text.jsonl", tokenizer=data_tok_dir, val_fraction=0.25)
    meta = run_prepare(tmp_path / "a", seed=1, **common)
    assert meta["stage"] == "pretrain" and meta["dtype"] == "uint16"
    docs = documents(tmp_path / "a") + documents(tmp_path / "a", "val")
    assert sorted(d for d, _ in docs) == sorted(data_tok.encode(t) + [data_tok.eot_id] for t in texts)
    assert all(set(m) == {1} for _, m in docs)
    n_val = meta["splits"]["val"]["documents"]
    assert 25 <= n_val <= 75 and meta["splits"]["train"]["documents"] + n_val == 200
    run_prepare(tmp_path / "b", seed=1, **common)
    run_prepare(tmp_path / "c", seed=2, **common)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    assert documents(tmp_path / "a", "val") != documents(tmp_path / "c", "val")


BAD_LINES = [
    {"text": "a good record"},
    b'{"text": "unterminated',
    b'{"text": "bad utf-8 \xff\xfe here"}',
    {"foo": "bar"},
    {"text": ""},
    {"text": 5},
    b"",  # a blank line is not a record
    {"conversations": [msg("user", "hello?")]},
    {"conversations": [msg("wizard", "x"), msg("assistant", "y")]},
    {"conversations": []},
    {"text": "another good one"},
]


def test_bad_records_are_skipped_and_counted(tmp_path, data_tok_dir, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    meta = run_prepare(tmp_path / "out", input=path, tokenizer=data_tok_dir, val_fraction=0.0)
    counts = meta["counts"]
    assert (counts["records"], counts["kept"]) == (10, 2)
    assert counts["skipped"] == {"invalid_json": 1, "invalid_utf8": 1, "unknown_shape": 1, "empty_content": 1,
                                 "non_string_content": 1, "no_assistant": 1, "unknown_role": 1,
                                 "empty_conversation": 1}
    assert counts["skipped_examples"]["invalid_json"] == [f"{path}:2"]
    assert counts["skipped_examples"]["empty_conversation"] == [f"{path}:10"]
    out = capsys.readouterr().out
    assert "invalid_utf8" in out and f"{path}:3" in out and "MB/s" in out  # the summary table
    err = fails(capsys, out_dir=tmp_path / "strict", input=path, tokenizer=data_tok_dir, strict=True)
    assert f"{path}:2: invalid_json" in err


def test_bad_inputs_are_one_line_errors(tmp_path, data_tok_dir, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "hello"}])
    cfg = dict(out_dir=tmp_path / "out", tokenizer=data_tok_dir)
    assert "does not exist" in fails(capsys, input=tmp_path / "missing.jsonl", **cfg)
    assert "matches no file" in fails(capsys, input=f"{good},{tmp_path}/*.parquet", **cfg)
    assert "no input" in fails(capsys, **cfg)
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "empty" in fails(capsys, input=tmp_path / "empty.jsonl", **cfg)
    write_jsonl(tmp_path / "junk.jsonl", [b"not json", {"text": ""}])
    assert "no usable record" in fails(capsys, input=tmp_path / "junk.jsonl", **cfg)
    (tmp_path / "a_file").write_text("x")
    err = fails(capsys, input=good, out_dir=tmp_path / "a_file" / "out", tokenizer=data_tok_dir)
    assert "not writable" in err and "a_file" in err
    assert "tokenizer" in fails(capsys, input=good, out_dir=tmp_path / "out", tokenizer=tmp_path / "nope")


def test_stage_mixing(tmp_path, data_tok_dir, capsys):
    path = write_jsonl(tmp_path / "mixed.jsonl", CHAT_RECORDS[:2] + [{"text": "plain"}])
    err = fails(capsys, out_dir=tmp_path / "out", input=path, tokenizer=data_tok_dir)
    assert f"{path}:3" in err and "allow_mixed" in err
    meta = run_prepare(tmp_path / "out", input=path, tokenizer=data_tok_dir, allow_mixed=True, val_fraction=0.0)
    assert meta["stage"] == "sft" and set(documents(tmp_path / "out")[2][1]) == {1}
    assert "dpo" in fails(capsys, out_dir=tmp_path / "out", input=path, tokenizer=data_tok_dir, stage="dpo")


def test_dpo_pairs_are_consecutive_documents(tmp_path, data_tok, data_tok_dir):
    records = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"chosen": [msg("user", "hi"), msg("assistant", "hello"), msg("user", "name?"), msg("assistant", "Bot")],
         "rejected": [msg("user", "hi"), msg("assistant", "hello"), msg("user", "name?"), msg("assistant", "??")]},
    ]
    write_jsonl(tmp_path / "dpo.jsonl", records)
    meta = run_prepare(tmp_path / "out", input=tmp_path / "dpo.jsonl", tokenizer=data_tok_dir, val_fraction=0.0)
    docs = documents(tmp_path / "out")
    assert meta["stage"] == "dpo" and len(docs) == 4
    replies = ["4", "5", "Bot", "??"]
    for (ids, mask), reply in zip(docs, replies):  # targets: the final reply only, earlier turns are prompt
        assert data_tok.decode([i for i, m in zip(ids, mask) if m]) == reply + "<|im_end|>"
    for chosen, rejected in (docs[0:2], docs[2:4]):
        prompt = chosen[1].index(1)
        assert chosen[0][:prompt] == rejected[0][:prompt] and rejected[1].index(1) == prompt


def test_max_len_truncates_and_counts(tmp_path, data_tok, data_tok_dir, data_corpus):
    long_text = " ".join(data_corpus)
    records = [{"text": long_text}, {"text": "short"},
               {"conversations": [msg("user", "hi"), msg("assistant", long_text)]},
               {"conversations": [msg("user", long_text), msg("assistant", "late")]},
               {"prompt": long_text, "chosen": "a", "rejected": "b"},
               {"prompt": "q", "chosen": long_text, "rejected": "b"}]
    cfg = dict(tokenizer=data_tok_dir, val_fraction=0.0, max_len=16, allow_mixed=True, stage="sft")
    write_jsonl(tmp_path / "t.jsonl", records[:4])
    meta = run_prepare(tmp_path / "sft", input=tmp_path / "t.jsonl", **cfg)
    docs = documents(tmp_path / "sft")
    assert meta["counts"]["truncated"] == 2 and meta["counts"]["skipped"] == {"no_target_after_truncation": 1}
    assert docs[0][0] == data_tok.encode(long_text)[:15] + [data_tok.eot_id]  # text keeps its <|endoftext|>
    assert docs[1][0] == data_tok.encode("short") + [data_tok.eot_id]
    full_ids, full_mask = data_tok.render_chat(detect_record(records[2])[1])
    assert docs[2] == (full_ids[:16], full_mask[:16]) and sum(docs[2][1]) > 0  # visible reply tokens stay targets
    write_jsonl(tmp_path / "p.jsonl", records[4:])
    meta = run_prepare(tmp_path / "dpo", input=tmp_path / "p.jsonl", **dict(cfg, stage="dpo"))
    assert meta["counts"]["skipped"] == {"prompt_too_long": 1} and meta["counts"]["truncated"] == 1
    assert [len(ids) for ids, _ in documents(tmp_path / "dpo")] == [16, len(data_tok.render_chat(
        detect_record(records[5])[1][1])[0])]


def test_val_input_files_make_the_val_split(tmp_path, data_tok_dir):
    write_jsonl(tmp_path / "train.jsonl", CHAT_RECORDS)
    write_jsonl(tmp_path / "val.jsonl", CHAT_RECORDS[:2])
    meta = run_prepare(tmp_path / "out", input=tmp_path / "train.jsonl", val_input=tmp_path / "val.jsonl",
                       tokenizer=data_tok_dir, val_fraction=0.5)
    assert meta["splits"]["train"]["documents"] == 6 and meta["splits"]["val"]["documents"] == 2
    assert documents(tmp_path / "out", "val") == documents(tmp_path / "out")[:2] and meta["val_fraction"] == 0.0


def mixed_corpus(path, n, corpus, seed=0):
    rng = random.Random(seed)
    records = []
    for i in range(n):
        text = " ".join(rng.choice(corpus) for _ in range(rng.randint(1, 6)))
        records.append({"text": f"{i}: {text}"})
    return write_jsonl(path, records)


def test_output_does_not_depend_on_workers(tmp_path, data_tok_dir, monkeypatch, data_corpus):
    monkeypatch.setattr(prepare, "_CHUNK_BYTES", 4096)  # many chunks, so that workers interleave
    path = mixed_corpus(tmp_path / "in.jsonl", 600, data_corpus)
    cfg = dict(input=path, tokenizer=data_tok_dir, val_fraction=0.1, shard_tokens=5000)
    run_prepare(tmp_path / "w1", workers=1, **cfg)
    meta = run_prepare(tmp_path / "w2", workers=2, **cfg)
    assert len(meta["splits"]["train"]["shards"]) > 3
    assert snapshot(tmp_path / "w1") == snapshot(tmp_path / "w2")


def test_compressed_and_archived_inputs_match_plain(tmp_path, data_tok_dir, data_corpus):
    zstandard = pytest.importorskip("zstandard")
    plain = mixed_corpus(tmp_path / "in.jsonl", 300, data_corpus)
    data = plain.read_bytes()
    (tmp_path / "in.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "in.jsonl.bz2").write_bytes(bz2.compress(data))
    (tmp_path / "in.jsonl.xz").write_bytes(lzma.compress(data))
    (tmp_path / "in.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data[:5000])
                                            + zstandard.ZstdCompressor().compress(data[5000:]))  # two frames
    (tmp_path / "README").write_text("not data")
    with tarfile.open(tmp_path / "in.jsonl.tar.bz2", "w:bz2") as tar:
        tar.add(tmp_path / "README", arcname="corpus/README")
        tar.add(plain, arcname="corpus/in.jsonl")
    cfg = dict(tokenizer=data_tok_dir, val_fraction=0.1)
    run_prepare(tmp_path / "plain", input=plain, **cfg)
    files, meta = snapshot(tmp_path / "plain")
    for name in ["in.jsonl.gz", "in.jsonl.bz2", "in.jsonl.xz", "in.jsonl.zst", "in.jsonl.tar.bz2"]:
        run_prepare(tmp_path / name.replace(".", "_"), input=tmp_path / name, **cfg)
        other_files, other_meta = snapshot(tmp_path / name.replace(".", "_"))
        assert other_files == files, name
        assert dict(other_meta, inputs=meta["inputs"]) == meta, name


def test_json_array_and_parquet_inputs(tmp_path, data_tok_dir):
    write_jsonl(tmp_path / "chat.jsonl", CHAT_RECORDS)
    (tmp_path / "chat.json").write_text(json.dumps(CHAT_RECORDS, indent=2, ensure_ascii=False))
    cfg = dict(tokenizer=data_tok_dir, val_fraction=0.0)
    run_prepare(tmp_path / "jsonl", input=tmp_path / "chat.jsonl", **cfg)
    run_prepare(tmp_path / "json", input=tmp_path / "chat.json", **cfg)
    assert documents(tmp_path / "json") == documents(tmp_path / "jsonl")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [r for r in CHAT_RECORDS if isinstance(r, dict) and "conversations" in r]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    run_prepare(tmp_path / "pq", input=tmp_path / "chat.parquet", **cfg)
    expected = [d for d, r in zip(documents(tmp_path / "jsonl"), CHAT_RECORDS) if r in rows]
    assert documents(tmp_path / "pq") == expected


def test_big_vocab_uses_uint32_and_added_specials_are_recorded(tmp_path):
    words = {f"w{i}": i for i in range(70_000)}
    raw = Tokenizer(models.WordLevel(words, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.save(str(tmp_path / "tokenizer.json"))
    write_jsonl(tmp_path / "t.jsonl", [{"text": "w69999 w1 w65536"}, {"text": "w3"}])
    meta = run_prepare(tmp_path / "out", input=tmp_path / "t.jsonl", tokenizer=tmp_path / "tokenizer.json",
                       val_fraction=0.0)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_007 + 4 and meta["added_special_tokens"] == 7 + 4  # + the tool tags
    eot = meta["special_ids"]["<|endoftext|>"]
    assert eot == 70_000 and documents(tmp_path / "out") == [([69999, 1, 65536, eot], [1] * 4), ([3, eot], [1, 1])]
    assert os.path.getsize(tmp_path / "out" / "train_00000.bin") == 6 * 4


def test_tokenizer_trained_on_the_input(tmp_path, data_corpus):
    path = mixed_corpus(tmp_path / "in.jsonl", 300, data_corpus)
    meta = run_prepare(tmp_path / "out", input=path, tokenizer="train", vocab_size=400, val_fraction=0.0)
    tok = load_tokenizer(tmp_path / "out")
    assert tok.vocab_size == meta["vocab_size"] <= 400 and tok.special_ids == meta["special_ids"]
    assert meta["tokenizer_sha256"] == file_sha256(tmp_path / "out" / "tokenizer.json")
    first = json.loads(path.read_text().splitlines()[0])["text"]
    ids, mask = documents(tmp_path / "out")[0]
    assert tok.decode(ids) == first + "<|endoftext|>"


@pytest.mark.slow
def test_interrupted_prepare_is_refused_then_replaced(tmp_path, data_tok_dir, data_corpus):
    path = mixed_corpus(tmp_path / "big.jsonl", 10_000, data_corpus)  # about 50 shards: killed after the third
    cfg = dict(input=path, tokenizer=data_tok_dir, shard_tokens=20_000, val_fraction=0.01)
    run_prepare(tmp_path / "reference", **cfg)
    out = tmp_path / "out"
    out.mkdir()
    (out / "meta.json").write_bytes((tmp_path / "reference" / "meta.json").read_bytes())  # an old, complete run
    args = [sys.executable, "prepare.py"] + [f"--{k}={v}" for k, v in dict(cfg, out_dir=out, workers=2).items()]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 60
    while not (out / "train_00002.bin").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers, mid-way
    proc.wait()
    assert not (out / "meta.json").exists(), "the run finished before it could be interrupted"
    with pytest.raises(SystemExit) as e:
        shards.open_split(out, "train")
    assert "incomplete (no meta.json)" in str(e.value)
    run_prepare(out, **cfg)
    assert snapshot(out) == snapshot(tmp_path / "reference")
    shards.open_split(out, "train", verify=True)


def test_demo_config(tmp_path, monkeypatch):
    if not (ROOT / "data" / "demo" / "pretrain.jsonl").exists():
        pytest.skip("no demo corpus")
    monkeypatch.chdir(ROOT)
    meta = prepare.main(["config/prepare_demo.py", f"--out_dir={tmp_path}"])
    assert meta["stage"] == "pretrain" and meta["vocab_size"] == 4096 and meta["counts"]["skipped"] == {}
    assert meta["splits"]["val"]["documents"] > 0


# -- files as people have them ---------------------------------------------------------------------


def no_meta(out_dir):
    return not (Path(out_dir) / "meta.json").exists()


def test_prompt_completion_is_a_chat(tmp_path, data_tok, data_tok_dir):
    records = [{"prompt": "Translate to French: cat", "completion": "chat"},
               {"prompt": [msg("system", "be brief"), msg("user", "hi")], "completion": [msg("assistant", "yo")]}]
    meta = run_prepare(tmp_path / "out", input=write_jsonl(tmp_path / "pc.jsonl", records), tokenizer=data_tok_dir,
                       val_fraction=0.0)
    assert meta["stage"] == "sft" and meta["counts"]["by_format"] == {"prompt_completion": 2}
    assert documents(tmp_path / "out") == [
        data_tok.render_chat([msg("user", "Translate to French: cat"), msg("assistant", "chat")]),
        data_tok.render_chat([msg("system", "be brief"), msg("user", "hi"), msg("assistant", "yo")])]


def compress(kind, data):
    zstandard = pytest.importorskip("zstandard")
    return {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress,
            "zst": zstandard.ZstdCompressor().compress}[kind](data)


def tar_of(path, members, compression=""):
    """A tar archive (compressed with "gz", "zst", ... or not) of {name: bytes}."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(compress(compression, buf.getvalue()) if compression else buf.getvalue())
    return path


@pytest.mark.parametrize("name", ["in.jsonl.gz", "in.jsonl.bz2", "in.jsonl.xz", "in.jsonl.zst", "in.tar",
                                  "in.tar.gz", "in.tar.zst"])
def test_a_truncated_input_is_an_error_saying_how_far_it_got(tmp_path, data_tok_dir, data_corpus, capsys, name):
    data = mixed_corpus(tmp_path / "in.jsonl", 2000, data_corpus).read_bytes()
    path = tmp_path / name
    if ".tar" in name:
        tar_of(path, {"part1.jsonl": data, "part2.jsonl": data}, name.rpartition(".tar")[2].lstrip("."))
    else:
        path.write_bytes(compress(name.rpartition(".")[2], data))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    err = fails(capsys, out_dir=tmp_path / "out", input=path, tokenizer=data_tok_dir)
    assert str(path) in err and "ends early (truncated?)" in err and ("after line" in err or "before its first" in err)
    assert no_meta(tmp_path / "out")


def test_corrupt_inputs_are_one_line_errors(tmp_path, data_tok_dir, data_corpus, capsys):
    zstandard = pytest.importorskip("zstandard")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    data = mixed_corpus(tmp_path / "in.jsonl", 300, data_corpus).read_bytes()
    crc = bytearray(gzip.compress(data))
    crc[-8] ^= 0xFF  # the CRC32 in the trailer
    (tmp_path / "crc.jsonl.gz").write_bytes(bytes(crc))
    (tmp_path / "plain.jsonl.gz").write_bytes(data)  # not gzip at all
    zst = bytearray(zstandard.ZstdCompressor().compress(data))
    zst[len(zst) // 2 : len(zst) // 2 + 64] = b"\x00" * 64
    (tmp_path / "bad.jsonl.zst").write_bytes(bytes(zst))
    pq.write_table(pa.Table.from_pylist([{"text": t} for t in data_corpus]), tmp_path / "ok.parquet")
    (tmp_path / "broken.parquet").write_bytes((tmp_path / "ok.parquet").read_bytes()[:-40])
    for name in ["crc.jsonl.gz", "plain.jsonl.gz", "bad.jsonl.zst", "broken.parquet"]:
        err = fails(capsys, out_dir=tmp_path / f"out_{name}", input=f"{tmp_path / 'in.jsonl'},{tmp_path / name}",
                    tokenizer=data_tok_dir)
        assert str(tmp_path / name) in err and "cannot be read" in err, err
        assert no_meta(tmp_path / f"out_{name}")


def test_a_zstd_long_window_file_is_read(tmp_path, data_tok_dir, data_corpus):
    """`zstd --long=31` writes a 2 GB window, which zstandard refuses by default."""
    zstandard = pytest.importorskip("zstandard")
    plain = mixed_corpus(tmp_path / "in.jsonl", 300, data_corpus)
    params = zstandard.ZstdCompressionParameters.from_level(19, window_log=31, enable_ldm=True)
    out = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(out, closefd=False) as w:
        w.write(plain.read_bytes())  # streamed: the frame keeps its 2 GB window
    assert zstandard.get_frame_parameters(out.getvalue()).window_size == 1 << 31
    (tmp_path / "in.jsonl.zst").write_bytes(out.getvalue())
    cfg = dict(tokenizer=data_tok_dir, val_fraction=0.0)
    run_prepare(tmp_path / "plain", input=plain, **cfg)
    run_prepare(tmp_path / "zst", input=tmp_path / "in.jsonl.zst", **cfg)
    assert documents(tmp_path / "zst") == documents(tmp_path / "plain")


def test_parquet_binary_text_is_utf8(tmp_path, data_tok, data_tok_dir):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"text": pa.array([b"hello bytes", b"bad \xff utf-8", "床前".encode()], type=pa.binary())})
    pq.write_table(table, tmp_path / "bin.parquet")
    meta = run_prepare(tmp_path / "out", input=tmp_path / "bin.parquet", tokenizer=data_tok_dir, val_fraction=0.0)
    assert [ids for ids, _ in documents(tmp_path / "out")] == [data_tok.encode(t) + [data_tok.eot_id]
                                                               for t in ("hello bytes", "床前")]
    assert meta["counts"]["skipped_examples"] == {"invalid_utf8": [f"{tmp_path / 'bin.parquet'}:2"]}


def test_json_arrays_in_any_layout(tmp_path, data_tok_dir, monkeypatch):
    monkeypatch.setattr(prepare, "_BLOCK", 7, raising=False)  # pieces cut inside strings, numbers, literals and escapes
    records = [{"text": f"record {i}: \"quoted\" \\ back, 床前 🙂", "n": [1.5e3, True, False, None, -12]}
               for i in range(20)] + CHAT_RECORDS[:2]
    cfg = dict(tokenizer=data_tok_dir, val_fraction=0.0, allow_mixed=True, stage="sft")
    run_prepare(tmp_path / "jsonl", input=write_jsonl(tmp_path / "a.jsonl", records), **cfg)
    layouts = {"one_line.json": json.dumps(records), "blank_first.json": "\n\n  " + json.dumps(records, indent=1),
               "crlf.json": json.dumps(records, indent=4).replace("\n", "\r\n") + "\r\n"}
    for name, text in layouts.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        meta = run_prepare(tmp_path / name.replace(".", "_"), input=tmp_path / name, **cfg)
        assert meta["counts"]["skipped"] == {} and meta["counts"]["kept"] == len(records), name
        assert documents(tmp_path / name.replace(".", "_")) == documents(tmp_path / "jsonl"), name
    # a lone surrogate is skipped as in jsonl, invalid UTF-8 too
    (tmp_path / "odd.json").write_bytes(b'[{"text": "ok"}, {"text": "half \\ud800 a pair"}, {"text": "\xff"}]')
    meta = run_prepare(tmp_path / "odd", input=tmp_path / "odd.json", **cfg)
    assert meta["counts"]["skipped"] == {"lone_surrogate": 1, "invalid_utf8": 1} and meta["counts"]["kept"] == 1
    # jsonl whose records are message lists, named .json, stays jsonl
    (tmp_path / "lists.json").write_text("\n".join(json.dumps(r) for r in [CHAT_RECORDS[3]] * 3) + "\n")
    assert run_prepare(tmp_path / "lists", input=tmp_path / "lists.json", **cfg)["counts"]["kept"] == 3


def test_broken_json_arrays_are_one_line_errors(tmp_path, data_tok_dir, capsys):
    cfg = dict(tokenizer=data_tok_dir, out_dir=tmp_path / "out")
    for text, says in [('[{"text": "a"}, {"text": "b"', "truncated"), ('[{"text": "a"} {"text": "b"}]', "expected"),
                       ('[{"text": "a"}, {"text": b}]', "not valid JSON"), ('[{"text": "a"}] [1]', "nothing")]:
        (tmp_path / "bad.json").write_text(text + "\n")
        err = fails(capsys, input=tmp_path / "bad.json", **cfg)
        assert str(tmp_path / "bad.json") in err and says in err, (text, err)


def test_special_token_strings_in_content_are_counted(tmp_path, data_tok_dir, capsys):
    records = [{"conversations": [msg("user", "say <|im_end|>"), msg("assistant", "no")]},
               {"conversations": [msg("user", "q"), msg("assistant", "<think>hm</think>7")]},  # a reply's tags: tokens
               {"conversations": [msg("user", "<think> typed"), msg("assistant", "ok")]},
               {"conversations": [msg("user", "plain"), msg("assistant", "a < b")]}]
    meta = run_prepare(tmp_path / "out", input=write_jsonl(tmp_path / "c.jsonl", records), tokenizer=data_tok_dir,
                       val_fraction=0.0)
    assert meta["counts"]["special_strings"] == 2
    assert "2 records hold special-token strings" in capsys.readouterr().out


def test_unsupported_formats_are_refused_before_any_work(tmp_path, data_tok_dir, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "hello"}])
    for name in ["data.zip", "notes.txt", "table.csv", "rows.parquet.gz", "data.jsonl.7z"]:
        (tmp_path / name).write_bytes(b'{"text": "x"}\n')
        err = fails(capsys, input=f"{good},{tmp_path / name}", out_dir=tmp_path / "out", tokenizer=data_tok_dir)
        assert f"'{tmp_path / name}': unsupported format" in err and ".jsonl, .json" in err
        assert not (tmp_path / "out").exists()  # nothing done: the output directory not even made


def test_a_line_over_max_line_bytes_is_skipped_and_counted(tmp_path, data_tok, data_tok_dir, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    records = [{"text": "short"}, {"text": "x" * 5000}, {"text": "after"}]
    cfg = dict(tokenizer=data_tok_dir, val_fraction=0.0, max_line_bytes=1000)
    expected = [(data_tok.encode(t) + [data_tok.eot_id]) for t in ("short", "after")]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "t.parquet")
    for path in (write_jsonl(tmp_path / "t.jsonl", records), tmp_path / "t.parquet"):
        meta = run_prepare(tmp_path / path.suffix, input=path, **cfg)
        assert meta["counts"]["skipped_examples"] == {"line_too_long": [f"{path}:2"]}
        assert [ids for ids, _ in documents(tmp_path / path.suffix)] == expected
    for layout in (None, 1):  # an array's element too, read past in pieces when it is more than a piece
        (tmp_path / "t.json").write_text(json.dumps(records, indent=layout))
        for block in (1 << 16, 100):
            monkeypatch.setattr(prepare, "_BLOCK", block)
            meta = run_prepare(tmp_path / "json", input=tmp_path / "t.json", **cfg)
            assert meta["counts"]["skipped_examples"] == {"line_too_long": [f"{tmp_path / 't.json'}:2"]}
            assert [ids for ids, _ in documents(tmp_path / "json")] == expected


def test_link_members_are_named_once(tmp_path, data_tok_dir, capsys):
    data = b'{"text": "in the archive"}\n'
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for name, kind in [("real.jsonl", tarfile.REGTYPE), ("sym.jsonl", tarfile.SYMTYPE),
                           ("hard.jsonl", tarfile.LNKTYPE), ("README", tarfile.REGTYPE)]:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "real.jsonl" if kind != tarfile.REGTYPE else ""
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    meta = run_prepare(tmp_path / "out", input=tmp_path / "a.tar", tokenizer=data_tok_dir, val_fraction=0.0)
    assert meta["counts"]["kept"] == 1
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 3 and all(n.count(str(tmp_path / "a.tar")) == 1 for n in notes)
    assert "'sym.jsonl' (a symbolic link to 'real.jsonl'" in notes[0] and "'hard.jsonl' (a hard link" in notes[1]
    assert "'README' (not .jsonl or .json)" in notes[2]


def test_an_existing_path_is_not_taken_as_a_glob(tmp_path, data_tok_dir):
    path = write_jsonl(tmp_path / "x[1].jsonl", [{"text": "hello"}])
    assert run_prepare(tmp_path / "out", input=path, tokenizer=data_tok_dir, val_fraction=0.0)["counts"]["kept"] == 1


def test_strict_names_the_first_bad_line(tmp_path, data_tok_dir, capsys):
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": "good"}, b"{not json", CHAT_RECORDS[0], {"text": ""}])
    err = fails(capsys, out_dir=tmp_path / "out", input=path, tokenizer=data_tok_dir, strict=True)
    assert f"{path}:2: invalid_json" in err


def test_workers_follow_the_decompressed_size(tmp_path, data_tok_dir, monkeypatch, data_corpus):
    monkeypatch.setattr(prepare, "_CHUNK_BYTES", 4096)
    data = b"".join(json.dumps({"text": f"{data_corpus[i % 6]} {i % 3}"}).encode() + b"\n" for i in range(1000))
    (tmp_path / "in.jsonl.zst").write_bytes(compress("zst", data))
    assert (tmp_path / "in.jsonl.zst").stat().st_size < 4096 < len(data) // 4  # small on disk, many chunks
    meta = run_prepare(tmp_path / "out", input=tmp_path / "in.jsonl.zst", tokenizer=data_tok_dir, workers=2)
    assert meta["timing"]["workers"] == 2


PIECES = ["床前明月光", "hello", " world", "🙂", "\n", "\t", "  ", "\"quoted\"", "back\\slash", "<|im_end|>", "<think>",
          "a < b", "\u00a0", "1.5e3", "null", "\u2063", "\r\n", "é", "{\"json\": [1]}"]


def random_text(rng):
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 8))) + rng.choice("xyz")


def random_record(rng, stage):
    """A record of `stage` in one of the shapes detect_record reads (dicts only: a Parquet row is one)."""
    t = lambda: random_text(rng)  # noqa: E731
    if stage == "pretrain":
        return {rng.choice(["text", "content", "completion"]): t()}
    if stage == "dpo":
        return {"prompt": t(), "chosen": t(), "rejected": t()}
    turns = [m for _ in range(rng.randint(1, 3)) for m in (msg("user", t()), msg("assistant", t()))]
    return rng.choice([
        {"conversations": turns},
        {"messages": [msg("system", t())] + turns},
        {"conversations": [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in turns]},
        {"conversations": turns[:-1] + [dict(turns[-1], reasoning_content=t())]},
        {"instruction": t(), "input": rng.choice(["", t()]), "output": t()},
        {"prompt": t(), "completion": t()},
    ])


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo"])
def test_every_format_gives_the_same_shards(tmp_path, data_tok_dir, monkeypatch, stage):
    """Random records written as jsonl, json (pretty and on one line), jsonl.gz, jsonl.zst and Parquet: the same
    prepared shards, val split included (small pieces and chunks, so that every boundary is crossed)."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    monkeypatch.setattr(prepare, "_BLOCK", 50)
    monkeypatch.setattr(prepare, "_CHUNK_BYTES", 2000)
    rng = random.Random(stage)
    records = [random_record(rng, stage) for _ in range(60)]
    data = b"".join(json.dumps(r, ensure_ascii=rng.random() < 0.5).encode() + b"\n" for r in records)
    files = {"a.jsonl": data, "a.jsonl.gz": compress("gz", data), "a.jsonl.zst": compress("zst", data),
             "pretty.json": json.dumps(records, indent=2, ensure_ascii=False).encode(),
             "line.json": json.dumps(records).encode()}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    pq.write_table(pa.Table.from_struct_array(pa.array(records)), tmp_path / "a.parquet")  # columns of all rows
    cfg = dict(tokenizer=data_tok_dir, val_fraction=0.3, stage=stage, shard_tokens=3000)
    run_prepare(tmp_path / "reference", input=tmp_path / "a.jsonl", **cfg)
    reference_files, reference_meta = snapshot(tmp_path / "reference")
    assert reference_meta["counts"]["kept"] == 60 and reference_meta["splits"]["val"]["documents"] > 0
    for name in list(files)[1:] + ["a.parquet"]:
        run_prepare(tmp_path / name.replace(".", "_"), input=tmp_path / name, workers=2, **cfg)
        other_files, other_meta = snapshot(tmp_path / name.replace(".", "_"))
        assert other_files == reference_files, name
        assert dict(other_meta, inputs=reference_meta["inputs"]) == reference_meta, name
