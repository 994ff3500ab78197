"""An exported model under lm-evaluation-harness (its command line, a local YAML task, no Hub): the same accuracy,
and the same log-likelihood of every choice, as scoring.py computes with our model."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

import export
import scoring
from checkpoint import load_model
from tests.test_export import make_run_dir
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_add_items():
    """The task's items as its process_docs makes them, read from the same jsonl."""
    spec = importlib.util.spec_from_file_location("demo_add", os.path.join(ROOT, "data", "lm_eval", "demo_add.py"))
    demo_add = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_add)
    items = []
    with open(os.path.join(ROOT, "data", "demo", "tasks_val.jsonl"), encoding="utf-8") as f:
        for doc in map(json.loads, f):
            if doc["task"] == "add":
                choices, gold = demo_add.choices_for(doc["answer"])
                items.append({"context": doc["prompt"] + "\nAnswer:", "choices": choices, "gold": gold})
    return items


def test_lm_eval_accuracy_equals_ours(tmp_path):
    run = make_run_dir(tmp_path / "run", stage="pretrain")
    export.export(run, str(tmp_path / "hf"))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [os.path.join(os.path.dirname(sys.executable), "lm_eval"), "--model", "hf",
           "--model_args", f"pretrained={tmp_path / 'hf'}", "--include_path", "data/lm_eval", "--tasks", "demo_add",
           "--device", "cpu", "--batch_size", "8", "--output_path", str(tmp_path / "out"), "--log_samples"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.load(open(glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))[0]))["results"]["demo_add"]
    samples = [json.loads(line) for line in open(glob.glob(str(tmp_path / "out" / "*" / "samples_demo_add_*.jsonl"))[0])]

    items = demo_add_items()
    assert len(samples) == len(items) == 40
    model, _ = load_model(run)
    tok = load_tokenizer(run)
    ours = scoring.multiple_choice(model, tok, items)
    assert results["acc,none"] == ours["acc"] and results["acc_norm,none"] == ours["acc_norm"]
    for sample in sorted(samples, key=lambda s: s["doc_id"]):  # and choice by choice, the same log-likelihoods
        item = items[sample["doc_id"]]
        assert sample["doc"]["choices"] == item["choices"] and int(sample["target"]) == item["gold"]
        theirs = [float(r[0]) for r in sample["filtered_resps"]]
        assert scoring.choice_logprobs(model, tok, item["context"], item["choices"]) == pytest.approx(theirs, abs=1e-4)
