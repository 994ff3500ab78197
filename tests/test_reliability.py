"""Fault injection: crashes, preemption, interrupted prepare, corrupt data, bad input, bad config,
numerical faults, a full disk and malicious checkpoints. docs/RELIABILITY.md maps each guarantee to
the test here that proves it; tests/soak/soak_resume.py is the long version of the crash test."""

import ast
import builtins
import errno
import glob
import io
import json
import os
import random
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_trainer.core import checkpoint
from llm_trainer.core import files
import prepare
import sample
from llm_trainer.data import shards
import train
from model import ModelConfig, Transformer, to_hf_state_dict
from tests.helpers import (DEMO, ENV, ROOT, TINY, all_checkpoints_load, assert_same_state, build_run, metrics, records,
                           run_train, spawn, state_of, torchrun, train_in_process, wait_for)


def run_script(script, args, monkeypatch, capsys):
    """Run script as `python script args` in this process (its __main__ block included); return (exit code,
    stdout, stderr). Signal handlers it installs are not kept."""
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


# -----------------------------------------------------------------------------
# 1. crash anywhere


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_bit_for_bit(demo_pretrain, tmp_path):
    """5 SIGKILLs of train.py processes at seeded random moments, half of them inside a checkpoint write
    (checkpoint_interval=1): after each, every checkpoint loads; resumed to the end (here), losses and weights equal
    an uninterrupted run's (here)."""
    args = [f"--data_dir={demo_pretrain}", "--max_iters=36", "--eval_interval=12", "--dropout=0.1", *TINY]
    ref = str(tmp_path / "ref")
    train_in_process([*args, f"--out_dir={ref}"])
    out = str(tmp_path / "killed")
    rng = random.Random(8)
    torn_writes = 0
    for k in range(5):
        proc = spawn([sys.executable, "train.py", *args, f"--out_dir={out}", "--init_from=resume",
                      "--checkpoint_interval=1", "--keep_last=2"])
        if k % 2:  # just after a "train iter" line: the checkpoint of that iteration is being written
            wait_for(proc, "train iter", rng.randint(1, 3))
            time.sleep(rng.uniform(0, 0.004))
        else:  # anywhere in the first few steps
            wait_for(proc, "train iter")
            time.sleep(rng.uniform(0, 0.3))
        proc.kill()
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL, f"kill {k} came after the run finished"
        torn_writes += os.path.exists(os.path.join(out, "ckpt.pt.tmp"))
        saved = all_checkpoints_load(out)  # zero unreadable checkpoints (none at all if killed before the first)
        assert checkpoint.resume_checkpoint_path(out) == (os.path.join(out, "ckpt.pt") if saved else None)
        assert not saved or saved["ckpt.pt"] == max(saved.values())
    train_in_process([*args, f"--out_dir={out}", "--init_from=resume"])
    want, got = records(ref), records(out)
    assert got.keys() == want.keys() and all(got[k] == want[k] for k in want)  # every loss, lr and norm, bit for bit
    assert_same_state(state_of(ref), state_of(out))
    print(f"{torn_writes} of 5 kills landed inside a checkpoint write")


SAVE_CRASH_POINTS = {  # where the write dies -> the iteration ckpt.pt must hold afterwards
    "torch.save half written": 2, "before fsync of the file": 2, "before linking the old checkpoint": 2,
    "before the rename": 2, "after the rename": 3, "removing a stale checkpoint": 3,
}


def _die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def _half_save(obj, f):
    buf = io.BytesIO()
    torch.serialization.save(obj, buf)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    f.flush()
    _die()


def _wait_child(pid, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the forked child hung")


def _state(it):
    return {"model": {"w": torch.full((50_000,), float(it))}, "model_config": {}, "iter": it}


@pytest.mark.parametrize("point", SAVE_CRASH_POINTS)
def test_kill_at_each_step_of_a_checkpoint_write(tmp_path, point):
    """A process killed at each step of save_checkpoint leaves a loadable ckpt.pt (the old or the new one), and
    the next save cleans up after it."""
    out = str(tmp_path)
    checkpoint.save_checkpoint(out, _state(1), keep_last=1)
    checkpoint.save_checkpoint(out, _state(2), keep_last=1)
    new = _state(3)  # made here: a forked child must not start torch's thread pool
    pid = os.fork()
    if pid == 0:  # the child dies at `point`; nothing it patches reaches the parent
        try:
            if point == "torch.save half written":
                torch.save = _half_save
            elif point == "before fsync of the file":
                os.fsync = _die
            elif point == "before linking the old checkpoint":
                os.link = _die
            elif point == "before the rename":
                os.replace = _die
            elif point == "after the rename":
                files.fsync_dir = _die
            else:
                os.remove = _die
            checkpoint.save_checkpoint(out, new, keep_last=1)
        finally:
            os._exit(3)  # only if the crash point was never reached
    status = _wait_child(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, point
    saved = all_checkpoints_load(out)
    assert saved["ckpt.pt"] == SAVE_CRASH_POINTS[point], saved
    assert checkpoint.resume_checkpoint_path(out) == os.path.join(out, "ckpt.pt")
    checkpoint.save_checkpoint(out, _state(4), keep_last=1)
    saved = all_checkpoints_load(out)
    assert saved["ckpt.pt"] == 4 and len(saved) == 2 and not os.path.exists(os.path.join(out, "ckpt.pt.tmp")), saved


def test_resume_survives_a_torn_metrics_line_and_logs_each_eval_once(demo_pretrain, tmp_path):
    """A metrics.jsonl line cut short (power loss or a full disk mid-write) must not stop the resume, and the
    resumed run must not log the evaluation at its first iteration twice."""
    out = str(tmp_path / "run")
    args = [f"--data_dir={demo_pretrain}", f"--out_dir={out}", "--eval_interval=4", *TINY]
    train_in_process([*args, "--max_iters=4"])
    with open(os.path.join(out, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write('{"iter": 5, "loss": 6.9')
    train_in_process([*args, "--max_iters=8", "--init_from=resume"])
    keys = [(r["iter"], "val_loss" in r) for r in metrics(out)]
    assert len(keys) == len(set(keys)), keys


def test_a_new_run_into_another_runs_out_dir_is_refused_or_overwritten(demo_pretrain, tmp_path):
    """A run from scratch into an out_dir that holds a 6-step run's checkpoints is refused (it used to rotate the
    old run's ckpt_00000005.pt in and its own out); overwrite=True deletes them first, so that a resume after
    ckpt.pt is damaged takes the new run's older checkpoint, not the other run's newer one."""
    out = str(tmp_path / "run")
    args = [f"--data_dir={demo_pretrain}", f"--out_dir={out}", "--eval_interval=100", "--checkpoint_interval=1",
            "--keep_last=2", *TINY]
    train_in_process([*args, "--max_iters=6"])
    p = train_in_process([*args, "--max_iters=3"], check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "holds the checkpoints of another run" in p.stderr and "--overwrite=True" in p.stderr
    assert all_checkpoints_load(out) == {"ckpt.pt": 6, "ckpt_00000005.pt": 5, "ckpt_00000004.pt": 4}
    train_in_process([*args, "--max_iters=3", "--overwrite=True"])
    assert all_checkpoints_load(out) == {"ckpt.pt": 3, "ckpt_00000002.pt": 2, "ckpt_00000001.pt": 1}
    with open(os.path.join(out, "ckpt.pt"), "wb") as f:
        f.write(b"torn")
    p = train_in_process([*args, "--max_iters=3", "--init_from=resume"])
    assert "resuming at step 2" in p.stdout


def test_overwrite_deletes_nothing_when_the_run_is_refused(demo_pretrain, demo_sft, tmp_path):
    """overwrite=True deletes another run's checkpoints only once the new run has passed its checks: a run refused
    for its data, or one that would start from the very checkpoints it deletes, leaves them all in place."""
    out = str(tmp_path / "run")
    train_in_process([f"--data_dir={demo_pretrain}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=100", *TINY])
    before = all_checkpoints_load(out)
    for extra in ([f"--data_dir={demo_sft}", "--stage=dpo"],
                  [f"--data_dir={demo_sft}", "--stage=sft", f"--init_from={out}"]):
        p = train_in_process([*extra, f"--out_dir={out}", "--max_iters=2", "--overwrite=True", *TINY], check=False)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert all_checkpoints_load(out) == before
    assert "is the out_dir whose checkpoints --overwrite=True would delete" in p.stderr


def test_rotation_removes_only_this_runs_checkpoints(tmp_path):
    out = str(tmp_path)
    torch.save({**_state(12), "run_id": "another"}, os.path.join(out, "ckpt_00000012.pt"))
    for it in range(1, 5):
        checkpoint.save_checkpoint(out, {**_state(it), "run_id": "this"}, keep_last=1)
    assert all_checkpoints_load(out) == {"ckpt.pt": 4, "ckpt_00000003.pt": 3, "ckpt_00000012.pt": 12}


# -----------------------------------------------------------------------------
# 2. preemption


@pytest.mark.slow
def test_sigint_saves_and_exits_zero(demo_pretrain, tmp_path):
    out = str(tmp_path / "run")
    proc = spawn([sys.executable, "train.py", f"--data_dir={demo_pretrain}", f"--out_dir={out}", "--max_iters=100000",
                  "--eval_interval=100000", *TINY])
    wait_for(proc, "train iter", 2)
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and "signal SIGINT" in rest, rest
    last = max(r["iter"] for r in metrics(out))
    assert state_of(out)["iter"] == last >= 2  # the step under way was finished, saved, and nothing after it


@pytest.mark.slow
def test_torchrun_sigterm_stops_every_rank_and_resumes_exactly(demo_pretrain, tmp_path):
    """SIGTERM to the torchrun agent, which forwards it to both workers: every rank stops after the same step,
    rank 0 saves it, and the resumed run ends bit for bit where an uninterrupted torchrun run ends."""
    args = [f"--data_dir={demo_pretrain}", "--max_iters=8", "--eval_interval=4", "--device=cpu",
            "--gradient_accumulation_steps=2", "--dropout=0.1", *TINY]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "run")
    run_train([*args, f"--out_dir={ref}"], nproc=2)
    proc = spawn(torchrun([*args, f"--out_dir={out}"]))
    wait_for(proc, "train iter", 2)
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    # torchrun itself exits 1 (it re-raises the signal it got); the workers finished their step and exited 0
    assert rest.count("stopped by signal") == 2 and 'train.py", line' not in rest, rest
    stopped = state_of(out)["iter"]
    assert stopped == max(r["iter"] for r in metrics(out)) and 2 <= stopped < 8
    before_stop = {k: v for k, v in records(ref).items() if k[0] < stopped or k == (stopped, "train")}
    assert records(out) == before_stop  # the eval due at `stopped` comes with the resume
    run_train([*args, f"--out_dir={out}", "--init_from=resume"], nproc=2)
    assert records(out) == records(ref)
    assert_same_state(state_of(ref), state_of(out))


# -----------------------------------------------------------------------------
# 3. interrupted prepare


def snapshot(out_dir):
    """Every byte of a prepared directory; meta.json without its timing."""
    files = {p.name: p.read_bytes() for p in sorted(Path(out_dir).iterdir()) if p.name != "meta.json"}
    meta = json.loads((Path(out_dir) / "meta.json").read_text())
    meta.pop("timing")
    return files, meta


@pytest.mark.slow
def test_prepare_killed_at_random_moments_is_refused_then_completed(tmp_path, monkeypatch, capsys):
    """prepare.py (2 workers, tokenizer trained here) SIGKILLed 3 times at seeded random moments, each over the
    debris of the one before: train.py refuses the directory every time; a last run completes it, identical to an
    uninterrupted prepare."""
    cfg = [f"--input={DEMO}/pretrain.jsonl", "--tokenizer=train", "--vocab_size=512", "--shard_tokens=50000",
           "--workers=2", "--val_fraction=0.05"]
    t0 = time.time()
    subprocess.run([sys.executable, "prepare.py", *cfg, f"--out_dir={tmp_path / 'ref'}"], cwd=ROOT, env=ENV,
                   check=True, capture_output=True)
    duration = time.time() - t0
    out = tmp_path / "out"
    out.mkdir()
    rng = random.Random(3)
    interrupted = 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "prepare.py", *cfg, f"--out_dir={out}"], cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(rng.uniform(0.25, 0.9) * duration)
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its worker processes
        proc.wait()
        if (out / "meta.json").exists():  # it finished first: then it must be complete and right
            assert snapshot(out) == snapshot(tmp_path / "ref")
            continue
        interrupted += 1
        code, _, err = run_script("train.py", [f"--data_dir={out}", f"--out_dir={tmp_path / 'run'}", *TINY],
                                  monkeypatch, capsys)
        assert code == 2 and "incomplete (no meta.json)" in err and str(out) in err, err
    assert interrupted >= 2, "the kills came too late to interrupt prepare.py"
    assert not (tmp_path / "run").exists()
    prepare.main([*cfg, f"--out_dir={out}"])
    assert snapshot(out) == snapshot(tmp_path / "ref")


# -----------------------------------------------------------------------------
# 4. corrupt data


def _truncate(d):
    path = d / "train_00000.bin"
    path.write_bytes(path.read_bytes()[:-2])
    return path


def _flip_byte(d):
    path = d / "val_00000.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return path


def _remove(name):
    def corrupt(d):
        os.remove(d / name)
        return d / name
    return corrupt


def _shard_of_another_dataset(d, other):
    shutil.copyfile(os.path.join(other, "train_00000.bin"), d / "train_00000.bin")
    return d / "train_00000.bin"


def _id_out_of_vocab(d):
    """A .bin whose checksum matches meta.json but which holds an id >= vocab_size (a buggy external tool)."""
    meta = json.loads((d / "meta.json").read_text())
    path = d / "train_00000.bin"
    ids = np.fromfile(path, dtype=meta["dtype"])
    ids[1234] = meta["vocab_size"] + 7
    ids.tofile(path)
    meta["splits"]["train"]["shards"][0]["sha256"]["bin"] = files.sha256_file(path)
    (d / "meta.json").write_text(json.dumps(meta))
    return path


CORRUPTIONS = {
    "truncated .bin": (_truncate, "bytes, meta.json says"),
    "flipped byte": (_flip_byte, "sha256"),
    "missing .mask": (_remove("train_00000.mask"), "is missing"),
    "missing .idx": (_remove("val_00000.idx"), "is missing"),
    "shard from another dataset": (_shard_of_another_dataset, "train_00000.bin"),
    "token id >= vocab_size": (_id_out_of_vocab, ">= vocab_size"),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_data_is_refused_before_training(kind, demo_pretrain, demo_sft, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    shutil.copytree(demo_pretrain, data)
    corrupt, message = CORRUPTIONS[kind]
    path = corrupt(data, demo_sft) if kind == "shard from another dataset" else corrupt(data)
    code, _, err = run_script("train.py", [f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}", *TINY],
                              monkeypatch, capsys)
    assert code == 2 and message in err and str(path) in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def _checkpoint_dir(path, vocab_size, tokenizer_sha256):
    """A run directory holding a tiny model trained (in name) on data with that tokenizer."""
    cfg = ModelConfig(vocab_size=vocab_size, dim=32, n_layers=1, n_heads=2, max_seq_len=64)
    os.makedirs(path)
    data = {"tokenizer_sha256": tokenizer_sha256, "vocab_size": vocab_size} if tokenizer_sha256 else {}
    checkpoint.save_checkpoint(str(path), {"model": Transformer(cfg).state_dict(), "model_config": cfg.to_dict(),
                                           "iter": 10, "stage": "pretrain", "data": data})
    return path


def test_data_from_another_tokenizer_is_refused(demo_pretrain, tmp_path, monkeypatch, capsys):
    meta = shards.load_meta(demo_pretrain)
    run = _checkpoint_dir(tmp_path / "other", meta["vocab_size"], "0" * 64)  # same size, another tokenizer
    code, _, err = run_script("train.py", [f"--data_dir={demo_pretrain}", f"--out_dir={tmp_path / 'run'}",
                                           f"--init_from={run}", *TINY], monkeypatch, capsys)
    assert code == 2 and "different tokenizer" in err and str(demo_pretrain) in err and str(run) in err, err
    small = _checkpoint_dir(tmp_path / "small", 300, None)  # no tokenizer identity (e.g. an HF import): the size
    code, _, err = run_script("train.py", [f"--data_dir={demo_pretrain}", f"--out_dir={tmp_path / 'run'}",
                                           f"--init_from={small}", *TINY], monkeypatch, capsys)
    assert code == 2 and "does not cover" in err and str(demo_pretrain) in err, err
    assert not (tmp_path / "run").exists()


# -----------------------------------------------------------------------------
# 5. bad input to prepare


def msg(role, content):
    return {"role": role, "content": content}


BAD_RECORDS = {  # reason -> one raw line
    "invalid_json": b'{"text": "unterminated',
    "invalid_utf8": '{"text": "中文 in GBK"}'.encode("gbk"),
    "unknown_shape": json.dumps({"foo": "bar"}).encode(),
    "empty_content": json.dumps({"text": "  "}).encode(),
    "non_string_content": json.dumps({"text": ["a", "list"]}).encode(),
    "lone_surrogate": b'{"text": "half a pair \\ud800 here"}',
    "bad_message": json.dumps({"conversations": [msg("user", "hi"), "not a message"]}).encode(),
    "unknown_role": json.dumps({"conversations": [msg("wizard", "x"), msg("assistant", "y")]}).encode(),
    "empty_conversation": json.dumps({"messages": []}).encode(),
    "no_assistant": json.dumps({"conversations": [msg("user", "anyone?")]}).encode(),
    "pair_prompt_mismatch": json.dumps({"chosen": [msg("user", "a"), msg("assistant", "b")],
                                        "rejected": [msg("user", "c"), msg("assistant", "d")]}).encode(),
}


def test_every_bad_record_is_counted_never_dropped(tmp_path, demo_pretrain, capsys):
    """Every bad-record class, a latin-1 line and a GBK line among UTF-8 ones, a BOM, CRLF line ends, blank
    lines: records read == kept + skipped, each reason counted with its file:line."""
    good = [json.dumps({"text": f"好的 record {i} ✓"}, ensure_ascii=False).encode() for i in range(4)]
    lines = [b"\xef\xbb\xbf" + good[0], *BAD_RECORDS.values(), good[1] + b"\r", b"", b"   ",
             '{"text": "caf\u00e9 in latin-1"}'.encode("latin-1"), good[2], good[3]]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    meta = prepare.main([f"--input={path}", f"--out_dir={tmp_path / 'out'}", f"--tokenizer={demo_pretrain}",
                         "--workers=1", "--val_fraction=0"])
    counts = meta["counts"]
    expected = {**{reason: 1 for reason in BAD_RECORDS}, "invalid_utf8": 2}
    assert counts["skipped"] == expected
    assert counts["records"] == counts["kept"] + sum(counts["skipped"].values()) == 4 + 12
    assert counts["skipped_examples"]["invalid_utf8"] == [f"{path}:3", f"{path}:16"]
    summary = capsys.readouterr().out
    for reason in expected:
        assert reason in summary
    docs = shards.open_split(tmp_path / "out", "train", verify=True)
    assert docs.num_docs == 4


def test_input_of_only_bad_lines_is_one_clear_error(tmp_path, demo_pretrain, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(BAD_RECORDS.values()) + b"\n")
    with pytest.raises(SystemExit) as e:
        prepare.main([f"--input={path}", f"--out_dir={tmp_path / 'out'}", f"--tokenizer={demo_pretrain}",
                      "--workers=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "no usable record" in err[0], err
    for i, reason in enumerate(BAD_RECORDS, 1):  # the reasons summary: each one, with where it first occurs
        assert f"{reason} (first at {path}:{i})" in err[0]
    assert not (tmp_path / "out" / "meta.json").exists()


def _max_rss_mb(cmd):
    """Peak resident memory of cmd (and its children), in a fresh parent so earlier children do not count."""
    probe = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True); "
             "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[0]), int(out[1])


@pytest.mark.slow
def test_50mb_single_lines_are_counted_in_bounded_memory(tmp_path, demo_pretrain):
    """A 50 MB line of valid JSON of an unknown shape and a 50 MB line of broken JSON: two skipped records,
    no crash, and memory a small multiple of the line, not of the file; under the default max_line_bytes (16 MB)
    neither line is held at all."""
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "a good record"}\n')
        f.write(b'{"blob": "' + b"x" * (50 << 20) + b'"}\n')
        f.write(b'{"text": "' + b"y " * (25 << 20) + b"\n")
        f.write(b'{"text": "another good record"}\n')
    small = tmp_path / "small.jsonl"
    small.write_bytes(b'{"text": "a good record"}\n')
    common = [sys.executable, "prepare.py", f"--tokenizer={demo_pretrain}", "--workers=1", "--val_fraction=0"]
    _, baseline = _max_rss_mb([*common, f"--input={small}", f"--out_dir={tmp_path / 'small'}"])
    code, peak = _max_rss_mb([*common, f"--input={path}", f"--out_dir={tmp_path / 'big'}",
                              "--max_line_bytes=60000000"])
    assert code == 0
    counts = json.loads((tmp_path / "big" / "meta.json").read_text())["counts"]
    assert counts["records"] == 4 and counts["kept"] == 2
    assert counts["skipped"] == {"unknown_shape": 1, "invalid_json": 1}
    assert peak < baseline + 4 * 50, (baseline, peak)  # MB
    code, peak = _max_rss_mb([*common, f"--input={path}", f"--out_dir={tmp_path / 'capped'}"])
    counts = json.loads((tmp_path / "capped" / "meta.json").read_text())["counts"]
    assert code == 0 and counts["kept"] == 2 and counts["skipped"] == {"line_too_long": 2}
    assert peak < baseline + 50, (baseline, peak)  # less than one line


# -----------------------------------------------------------------------------
# 6. bad config


def _config_file(tmp_path, text):
    path = tmp_path / "bad_config.py"
    path.write_text(text)
    return str(path)


def case(args, message, name, *marks):
    return pytest.param(args, message, marks=marks, id=name)


BAD_CONFIGS = [  # (arguments, part of the one error line); "file:..." is the text of a config file
    case(["--warmup_itres=10"], "unknown config key 'warmup_itres' (did you mean warmup_iters", "unknown key"),
    case(["--dropout=a lot"], "config key 'dropout' expects float", "wrong type"),
    case(["file:lerning_rate = 1e-3\n"], "unknown config key 'lerning_rate' in config file", "unknown key in file"),
    case(["file:batch_size = '8'\n"], "expects int", "wrong type in file"),
    case(["--gradient_accumulation_steps=0"], "must be >= 1", "no micro-steps"),
    case(["--dtype=float8"], "dtype must be", "unknown dtype"),
    case(["--fsdp=True"], "torchrun", "fsdp without torchrun"),
    case(["--block_size=128", "--rope_scaling={'type': 'yarn', 'factor': 2.0, 'original_max_seq_len': 32}"],
         "larger than rope_scaling allows", "block_size beyond rope_scaling"),
    case(["--eval_interval=0"], "eval_interval", "eval_interval 0"),
    case(["--log_interval=0"], "log_interval", "log_interval 0"),
    case(["--n_kv_heads=3"], "n_kv_heads", "n_heads not a multiple of n_kv_heads"),
    case(["--rope_scaling={'type': 'linear', 'factor': 1.0, 'original_max_seq_len': 64}"], "factor",
         "rope_scaling factor 1"),
    case(["--learning_rate=-0.001"], "learning_rate", "negative learning_rate"),
    case(["--device=cuda"], "cuda", "cuda without a GPU",
         pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    case(["file:batch_size = (\n"], "bad_config.py", "syntax error in file"),
    case(["--compile_mode=fast"], "compile_mode must be one of", "unknown compile_mode"),
]


@pytest.mark.parametrize("args, message", BAD_CONFIGS)
def test_bad_config_is_one_line_exit_2_before_any_work(args, message, demo_pretrain, tmp_path, monkeypatch, capsys):
    args = [_config_file(tmp_path, a[5:]) if a.startswith("file:") else a for a in args]
    out = tmp_path / "run"
    code, _, err = run_script("train.py", [f"--data_dir={demo_pretrain}", f"--out_dir={out}", *TINY, *args],
                              monkeypatch, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # nothing written: no out_dir, no checkpoint


@pytest.fixture
def saved_run(demo_sft, tmp_path):
    """(out_dir, settings) of an in-process sft run checkpointed at iteration 1."""
    settings = dict(eval_iters=0, pack=True, seed=1337, batch_size=4)
    out = str(tmp_path / "run")
    os.makedirs(out)
    run = build_run(demo_sft, out, **settings)
    train.train_step(run, 0)
    checkpoint.save_run(run, 1)
    return out, settings


@pytest.mark.parametrize("key, value", [("seed", 7), ("batch_size", 2), ("gradient_accumulation_steps", 2),
                                        ("block_size", 48), ("pack", False), ("dropout", 0.1), ("dim", 64)])
def test_a_resume_that_changes_what_decides_the_run_is_refused(key, value, saved_run, demo_sft, capsys):
    out, settings = saved_run
    with pytest.raises(SystemExit) as e:
        build_run(demo_sft, out, **{**settings, key: value, "init_from": "resume"})
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    trained = state_of(out)["config"][key]
    assert err.startswith(f"error: {key}: ") and f"{key}={trained!r}, not {value!r}" in err, err


def test_a_resume_with_other_lora_settings_or_other_data_is_refused(saved_run, demo_sft, tmp_path, capsys):
    """The issue's case: lora_alpha 8 resumed with 64 went on silently, val loss 0.75 -> 2.31."""
    base, settings = saved_run
    lora = str(tmp_path / "lora")
    os.makedirs(lora)
    run = build_run(demo_sft, lora, **settings, init_from=base, lora_rank=4, lora_alpha=8.0)
    checkpoint.save_run(run, 1)
    with pytest.raises(SystemExit):
        build_run(demo_sft, lora, **settings, init_from="resume", lora_rank=4, lora_alpha=64.0)
    assert "lora_alpha: the checkpoint in" in capsys.readouterr().err
    # the data: moved is fine (data_dir may change), prepared again differently is not
    moved = str(tmp_path / "moved")
    shutil.copytree(demo_sft, moved)
    assert build_run(moved, base, **settings, init_from="resume").start_iter == 1
    meta = json.loads(Path(moved, "meta.json").read_text())
    meta["splits"]["train"]["shards"][0]["sha256"]["bin"] = "0" * 64
    Path(moved, "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit):
        build_run(moved, base, **settings, init_from="resume")
    assert "data_dir: " in capsys.readouterr().err


def test_a_resume_may_change_what_does_not_decide_the_run(saved_run, demo_sft):
    out, settings = saved_run
    free = dict(max_iters=50, eval_interval=7, log_interval=3, learning_rate=1e-4, keep_last=3, grad_clip=0.5)
    assert build_run(demo_sft, out, **settings, **free, init_from="resume").start_iter == 1


def test_readme_lists_the_settings_fixed_on_resume():
    text = Path(ROOT, "README.md").read_text(encoding="utf-8")
    fixed = text.split("\n- fixed: ", 1)[1].split("\n- free: ", 1)[0]
    assert set(re.findall(r"`(\w+)`", fixed)) == train.RESUME_FIXED


@pytest.mark.slow
def test_torchrun_with_indivisible_accumulation_fails_on_every_rank(demo_pretrain, tmp_path):
    out = tmp_path / "run"
    p = run_train([f"--data_dir={demo_pretrain}", f"--out_dir={out}", "--device=cpu",
                   "--gradient_accumulation_steps=3", *TINY], nproc=2, check=False, timeout=120)
    message = "gradient_accumulation_steps (3) must be divisible by the number of processes (2)"
    # each rank refuses on its own; torchrun stops a rank still on its way there (or still exiting) once one fails
    stopped = "Signal 15 (SIGTERM) received" in p.stderr
    assert p.returncode != 0 and p.stderr.count(message) in ((1, 2) if stopped else (2,)), p.stderr
    assert 'train.py", line' not in p.stderr and not out.exists()


# -----------------------------------------------------------------------------
# 7. numerical faults


@pytest.mark.parametrize("fault", ["nan loss", "inf gradient"])
def test_one_nonfinite_step_is_exactly_a_skipped_update(fault, demo_pretrain, tmp_path, monkeypatch):
    """Steps 0-4 with a fault at step 2 end with the very weights and optimizer state of steps 0, 1, 3, 4."""
    common = dict(stage="pretrain", dropout=0.1, grad_clip=1.0, warmup_iters=2, dim=64, n_heads=4, block_size=64)
    if fault == "nan loss":
        monkeypatch.setenv("TRAIN_FAULTS", '{"nonfinite_iters": [2]}')
    faulty = build_run(demo_pretrain, str(tmp_path), **common)
    monkeypatch.delenv("TRAIN_FAULTS", raising=False)
    clean = build_run(demo_pretrain, str(tmp_path), **common)
    step = {"it": None}
    if fault == "inf gradient":  # the loss stays finite; one weight's gradient overflows
        weight = faulty.raw_model.model.layers[0].mlp.down_proj.weight
        weight.register_hook(lambda g: g * float("inf") if step["it"] == 2 else g)
    finite = []
    for it in range(5):
        step["it"] = it
        finite.append(train.train_step(faulty, it)["finite"])
    assert finite == [True, True, False, True, True]
    for it in (0, 1, 3, 4):
        assert train.train_step(clean, it)["finite"]
    a, b = faulty.raw_model.state_dict(), clean.raw_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert_same_state({"model": a, "optimizer": faulty.optimizer.state_dict()},
                      {"model": b, "optimizer": clean.optimizer.state_dict()})


@pytest.mark.parametrize("stage", ["pretrain", "grpo"])
def test_float16_goes_on_after_a_skipped_step(stage, demo_pretrain, toy_grpo, tmp_path, monkeypatch):
    """float16's loss scaler (what dtype=auto picks on GPUs without bfloat16; CPU autocast runs it too): a
    non-finite step, or a non-finite first of two grpo_epochs updates, is skipped and lowers the scale, and the
    next updates apply (the scaler used to raise in the next unscale_)."""
    data, extra = demo_pretrain, dict(stage="pretrain")
    if stage == "grpo":
        data, reward = toy_grpo
        extra = dict(stage="grpo", reward=reward, batch_size=2, grpo_group=2, max_new_tokens=4, grpo_epochs=2,
                     learning_rate=1e-2)
    monkeypatch.setenv("TRAIN_FAULTS", '{"nonfinite_iters": [1]}')
    run = build_run(data, str(tmp_path), dtype="float16", device="cpu", **extra)
    before = {k: v.clone() for k, v in run.raw_model.state_dict().items()}
    scales, finite = [], []
    for it in range(3):
        scales.append(run.scaler.get_scale())
        finite.append(train.train_step(run, it)["finite"])
    assert finite == [True, False, True]
    assert run.scaler.get_scale() < scales[1] <= scales[0]  # the skipped step lowered the scale
    assert any(not torch.equal(v, before[k]) for k, v in run.raw_model.state_dict().items())


def test_a_float32_checkpoint_resumes_in_float16(demo_pretrain, tmp_path):
    run = build_run(demo_pretrain, str(tmp_path), stage="pretrain", dtype="float32", device="cpu")
    train.train_step(run, 0)
    checkpoint.save_run(run, 1)
    resumed = build_run(demo_pretrain, str(tmp_path), stage="pretrain", dtype="float16", device="cpu",
                        init_from="resume")
    assert resumed.start_iter == 1 and resumed.scaler.is_enabled()
    assert resumed.scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()  # a fresh scaler
    assert train.train_step(resumed, 1)["finite"]


# -----------------------------------------------------------------------------
# 8. disk full, unwritable out_dir


class _FullDisk(io.FileIO):
    """A file on a disk with `room` bytes left."""

    room = 0

    def write(self, b):
        if len(b) > _FullDisk.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _FullDisk.room -= len(b)
        return super().write(b)


def _full_disk_open(room):
    def fake_open(path, mode="r", *args, **kwargs):
        if str(path).endswith(".tmp") and "w" in mode:
            _FullDisk.room = room
            return _FullDisk(path, "wb")
        return builtins.open(path, mode, *args, **kwargs)
    return fake_open


@pytest.mark.parametrize("room", [0, 100_000])
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(room, tmp_path, monkeypatch, demo_pretrain, capsys):
    out = tmp_path / "run"
    out.mkdir()
    run = build_run(demo_pretrain, str(out), stage="pretrain")  # (a new run: before out_dir holds checkpoints)
    checkpoint.save_checkpoint(str(out), _state(1), keep_last=1)
    checkpoint.save_checkpoint(str(out), _state(2), keep_last=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(files, "open", _full_disk_open(room), raising=False)
    with pytest.raises(OSError) as e:
        checkpoint.save_checkpoint(str(out), _state(3), keep_last=1)
    assert "No space left on device" in str(e.value) and "previous checkpoint is unchanged" in str(e.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no .tmp left, nothing else touched
    # through train.py: one clear line, exit 2
    with pytest.raises(SystemExit) as e:
        checkpoint.save_run(run, 3)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "No space left on device" in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_out_dir_that_is_a_file_is_a_clear_error(demo_pretrain, tmp_path, monkeypatch, capsys):
    out = tmp_path / "a_file"
    out.write_text("not a directory")
    code, _, err = run_script("train.py", [f"--data_dir={demo_pretrain}", f"--out_dir={out}", *TINY], monkeypatch,
                              capsys)
    assert code == 2 and str(out) in err and len(err.strip().splitlines()) == 1, err


# -----------------------------------------------------------------------------
# 9. security


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_pickle_checkpoint_is_refused_everywhere(demo_pretrain, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "code_ran"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": {}, "model_config": {}, "iter": 1, "x": _Payload(marker)}, run / "ckpt.pt")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(demo_pretrain, name), run / name)
    common = [f"--data_dir={demo_pretrain}", *TINY]
    resumed = run_script("train.py", [*common, f"--out_dir={run}", "--init_from=resume"], monkeypatch, capsys)
    continued = run_script("train.py", [*common, f"--out_dir={tmp_path / 'next'}", f"--init_from={run}"],
                           monkeypatch, capsys)
    for code, _, err in (resumed, continued):
        assert code == 2 and "refusing to load" in err and "GLOBAL posix.system" in err, err
    with pytest.raises(SystemExit) as e:
        checkpoint.load_model(str(run))  # what sample.py and export.py load with
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        sample.main([f"--out_dir={run}", "--prompt=hi"])
    assert e.value.code == 2 and "refusing to load" in capsys.readouterr().err
    assert not (tmp_path / "next").exists()
    # beside a readable older checkpoint, resume takes that one (with a warning) and still runs nothing
    torch.save(_state(5), run / "ckpt_00000005.pt")
    assert checkpoint.resume_checkpoint_path(str(run)) == str(run / "ckpt_00000005.pt")
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists()


def test_hf_import_reads_safetensors_only(tmp_path, capsys):
    from safetensors.torch import save_file

    marker = tmp_path / "code_ran"
    cfg = ModelConfig(vocab_size=128, dim=32, n_layers=1, n_heads=2, max_seq_len=64)
    model = Transformer(cfg)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(checkpoint.hf_config_dict(cfg)))
    torch.save({"x": _Payload(marker)}, hf / "pytorch_model.bin")
    with pytest.raises(SystemExit) as e:  # pickled weights only: refused, not unpickled
        checkpoint.load_model(str(hf))
    assert e.value.code == 2 and "safetensors" in capsys.readouterr().err
    save_file({k: v.clone() for k, v in to_hf_state_dict(model).items()}, hf / "model.safetensors")
    loaded, info = checkpoint.load_model(str(hf))  # safetensors beside the pickle: the pickle is never opened
    assert info["kind"] == "hf"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert not marker.exists()


def _project_sources():
    """The code that runs when someone uses the project (tests may build malicious files on purpose)."""
    sources = sorted(Path(p) for pattern in ("*.py", "llm_trainer/**/*.py", "config/*.py", "data/demo/*.py")
                     for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))
    assert any(p.parts[-3:] == ("llm_trainer", "core", "checkpoint.py") for p in sources)  # the package is scanned
    return sources


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f"{getattr(f.value, 'id', '?')}.{f.attr}" if isinstance(
                f, ast.Attribute) else "?"
            yield name, {k.arg: k.value for k in node.keywords}, node


def test_no_project_code_unpickles_downloads_or_executes_data():
    """torch.load only with weights_only=True, from_pretrained only with local_files_only=True; no pickle or
    marshal, eval, trust_remote_code, shell=True or network clients; exec only where configurator.py runs the
    config files a user names (a config file is code, like a script)."""
    problems = []
    for path in _project_sources():
        source = path.read_text(encoding="utf-8")
        where = path.relative_to(ROOT)
        for name, kw, node in _calls(ast.parse(source)):
            line = f"{where}:{node.lineno}"
            for call, key in (("torch.load", "weights_only"), (".from_pretrained", "local_files_only")):
                if name.endswith(call) and not (isinstance(kw.get(key), ast.Constant) and kw[key].value is True):
                    problems.append(f"{line}: {name} without {key}=True")
            if name in ("eval", "exec", "compile", "__import__") and not (name in ("exec", "compile") and
                                                                           str(where) == "configurator.py"):
                problems.append(f"{line}: {name}()")
            if name.startswith(("pickle.", "marshal.", "dill.", "cloudpickle.")) or name.endswith(".load_pickle"):
                problems.append(f"{line}: {name}()")
            for key in ("trust_remote_code", "shell", "allow_pickle"):
                if isinstance(kw.get(key), ast.Constant) and kw[key].value is True:
                    problems.append(f"{line}: {key}=True")
        for banned in ("import requests", "import urllib", "from urllib", "import http.client", "hf_hub_download",
                       "snapshot_download"):
            if banned in source:
                problems.append(f"{where}: {banned}")
    assert not problems, "\n".join(problems)
