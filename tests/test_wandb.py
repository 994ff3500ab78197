"""wandb_log=True with no login and no network: an offline run holding the logged figures (read back with wandb's
own reader), and a wandb that cannot start never stops training."""

import glob
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import TINY, run_train

pytestmark = pytest.mark.slow  # train.py and wandb in subprocesses, as a user runs them

WANDB = os.path.join(os.path.dirname(sys.executable), "wandb")


def no_login_env(tmp_path, **extra):
    """No API key, a home without ~/.netrc: a machine that never logged in."""
    (tmp_path / "home").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "HOME": str(tmp_path / "home"), **extra}


def records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_offline_run_holds_the_logged_figures(demo_pretrain, tmp_path):
    out = tmp_path / "run"
    run_train([f"--data_dir={demo_pretrain}", f"--out_dir={out}", *TINY, "--max_iters=6", "--eval_interval=3",
               "--wandb_log=True", "--wandb_run_name=tiny"], env=no_login_env(tmp_path))
    [log] = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    p = subprocess.run([WANDB, "leet", "inspect", log, "--json"], capture_output=True, text=True, timeout=120,
                       env=no_login_env(tmp_path))
    assert p.returncode == 0, p.stderr
    history = [r["history"]["item"] for r in map(json.loads, p.stdout.splitlines()) if r.get("type") == "history"]
    ours = {}  # wandb keeps one row per step: the step's training line and the evaluation after it together
    for record in records(out / "metrics.jsonl"):
        ours.setdefault(record["iter"], {}).update(record)
    assert [h["iter"] for h in history] == sorted(ours) == list(range(7))
    for theirs in history:
        assert {k: theirs[k] for k in ours[theirs["iter"]]} == ours[theirs["iter"]]
    assert [h["iter"] for h in history if "val_loss" in h and "val_bpb" in h] == [0, 3, 6]
    assert all("loss" in h for h in history[1:])


def test_wandb_that_cannot_start_does_not_stop_training(demo_pretrain, tmp_path):
    out = tmp_path / "run"
    p = run_train([f"--data_dir={demo_pretrain}", f"--out_dir={out}", *TINY, "--max_iters=2", "--wandb_log=True"],
                  env=no_login_env(tmp_path, WANDB_MODE="no-such-mode"))
    assert "warning: wandb could not start" in p.stdout and "training goes on" in p.stdout
    assert [r["iter"] for r in records(out / "metrics.jsonl") if "loss" in r] == [1, 2]
