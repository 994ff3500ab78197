"""An exported model under lm-evaluation-harness's own command line (lm_eval --model hf, a local YAML task, no Hub):
the same accuracy, and the same log-likelihood of every choice, as eval.py gives on the run directory."""

import glob
import json
import os
import subprocess
import sys

import pytest

import eval as evalpy
import export
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # lm_eval's own command line


def test_lm_eval_command_line_on_the_export_equals_eval_py(made_run, tmp_path):
    run = made_run("pretrain")
    export.export(run, str(tmp_path / "hf"))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [os.path.join(os.path.dirname(sys.executable), "lm_eval"), "--model", "hf",
           "--model_args", f"pretrained={tmp_path / 'hf'}", "--include_path", "data/lm_eval", "--tasks", "demo_add",
           "--device", "cpu", "--batch_size", "8", "--output_path", str(tmp_path / "out"), "--log_samples"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    theirs = json.load(open(glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))[0]))["results"]["demo_add"]
    samples = [json.loads(line) for line in open(glob.glob(str(tmp_path / "out" / "*" / "samples_demo_add_*.jsonl"))[0])]

    figures, ours = evalpy.evaluate(run, "demo_add", os.path.join(ROOT, "data", "lm_eval"), device="cpu",
                                    dtype="float32")
    assert len(samples) == len(ours["samples"]["demo_add"]) == 40
    for metric in ("acc", "acc_norm"):
        assert theirs[f"{metric},none"] == figures["tasks"]["demo_add"]["metrics"][metric]["value"]
        assert theirs[f"{metric}_stderr,none"] == pytest.approx(figures["tasks"]["demo_add"]["metrics"][metric]["stderr"])
    mine = {s["doc_id"]: s for s in ours["samples"]["demo_add"]}
    for sample in samples:  # and choice by choice, the same log-likelihoods
        item = mine[sample["doc_id"]]
        assert sample["doc"]["choices"] == item["doc"]["choices"] and sample["target"] == str(item["target"])
        assert [float(r[0]) for r in item["filtered_resps"]] == pytest.approx(
            [float(r[0]) for r in sample["filtered_resps"]], abs=1e-4)
