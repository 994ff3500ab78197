"""The demo, shortened (demo.py --quick=True): every stage runs, and every figure of its report is computed in the run."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

import demo
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # demo.py --quick=True, every stage

TRAINED = ["pretrain", "sft", "sft_long", "distill", "dpo", "grpo", "rm", "grpo_rm", "student_sft", "student_kd",
           "tools"]
# a figure, with its sign where a minus stands alone before it (a reward model's scores are negative too)
NUMBER = re.compile(r"(?<![\w.-])((?:(?<![\w.])-)?\d[\d,]*(?:\.\d+)?(?:e[+-]\d+)?)(%|M)?(?!\w)")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out = root / "out"
    cmd = [sys.executable, "demo.py", "--quick=True", f"--out_dir={out}", f"--data_dir={root / 'data'}", "--workers=1"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    with open(out / "report.json", encoding="utf-8") as f:
        report = json.load(f)
    with open(out / "report.md", encoding="utf-8") as f:
        md = f.read()
    return str(out), p.stdout, report, md


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run_config(out, stage):
    with open(os.path.join(out, stage, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def test_every_stage_ran_in_order(quick_demo):
    out, stdout, report, md = quick_demo
    headers = [line for line in stdout.splitlines() if line.startswith("== ")]
    assert [h.split(":")[0] for h in headers] == ["== 1. prepare", "== 2. pretrain", "== 3. sft", "== 4. sft_long",
                                                "== 5. distill", "== 6. dpo", "== 7. grpo", "== 8. rm",
                                                "== 9. grpo_rm", "== 10. student_sft", "== 11. student_kd",
                                                "== 12. tools", "== 13. evaluate", "== 14. reward model",
                                                "== 15. export", "== 16. chat with the DPO model", "== report"]
    for stage in TRAINED:
        assert os.path.isfile(os.path.join(out, stage, "ckpt.pt")), stage
        assert read_jsonl(os.path.join(out, stage, "metrics.jsonl")), stage
    cfg = {stage: run_config(out, stage) for stage in TRAINED}
    assert cfg["pretrain"]["init_from"] == "scratch"
    for stage, parent in [("sft", "pretrain"), ("sft_long", "sft"), ("distill", "sft"), ("dpo", "sft"),
                          ("grpo", "distill"), ("rm", "sft"), ("grpo_rm", "sft"), ("tools", "sft")]:
        assert os.path.normpath(cfg[stage]["init_from"]) == os.path.join(out, parent)
    assert cfg["sft_long"]["block_size"] == 2 * cfg["sft"]["block_size"]
    assert cfg["sft_long"]["rope_scaling"]["type"] == "yarn"
    assert cfg["distill"]["think_tag_weight"] == 10 and cfg["dpo"]["stage"] == "dpo"
    # the students: the same smaller model from scratch, the same steps, alone and distilled from sft
    assert cfg["student_sft"]["init_from"] == cfg["student_kd"]["init_from"] == "scratch"
    assert os.path.normpath(cfg["student_kd"]["teacher"]) == os.path.join(out, "sft") and not cfg["student_sft"]["teacher"]
    assert cfg["student_kd"]["max_iters"] == cfg["student_sft"]["max_iters"]
    assert cfg["rm"]["data_dir"] == cfg["dpo"]["data_dir"] and cfg["grpo_rm"]["reward"] == f"rm:{os.path.join(out, 'rm')}"
    for stage in demo.CHAT_STAGES:
        assert len(read_jsonl(os.path.join(out, "eval", f"{stage}.jsonl"))) == report["tasks"]["n"] > 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(os.path.join(out, "hf")))
    with open(os.path.join(out, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "](loss.png)" in md and md in stdout  # linked, and printed at the end
    assert "train iter" in stdout and "eval  iter" in stdout  # train.py's progress lines were streamed


def test_report_md_is_rendered_from_report_json(quick_demo):
    _, _, report, md = quick_demo
    assert demo.render_report(report) == md


def json_values(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from json_values(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from json_values(v)
    else:
        yield obj


def test_every_number_in_the_report_is_a_figure_of_the_run(quick_demo):
    _, _, report, md = quick_demo
    values = list(json_values(report))
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    in_strings = {m.group(0) for v in values if isinstance(v, str) for m in NUMBER.finditer(v)}
    found = list(NUMBER.finditer(md))
    assert len(found) > 40  # the report really is full of figures
    for m in found:
        if m.group(0) in in_strings:  # part of a prompt, a reply, the commit, a version, a date
            continue
        text, suffix = m.group(1).replace(",", ""), m.group(2)
        value = float(text)
        mantissa, _, exponent = text.partition("e")
        decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
        tol = 0.5 * 10.0 ** (int(exponent or 0) - decimals)  # half a unit of the last digit shown
        scale = {"%": 0.01, "M": 1e6}.get(suffix, 1)
        assert any(abs(v - value * scale) <= tol * scale * (1 + 1e-9) + 1e-12 for v in numbers), \
            f"{m.group(0)!r} in report.md (…{md[max(0, m.start() - 60):m.end() + 20]!r}) is no figure of report.json"


def test_report_figures_agree_with_the_run_files(quick_demo):
    out, _, report, _ = quick_demo
    for stage in TRAINED:
        rows = read_jsonl(os.path.join(out, stage, "metrics.jsonl"))
        cfg = run_config(out, stage)
        s = report["stages"][stage]
        evals = [r for r in rows if "val_loss" in r]
        train = [r for r in rows if "loss" in r]
        assert s["val_loss"] == evals[-1]["val_loss"] and s["val_loss_start"] == evals[0]["val_loss"]
        assert s["steps"] == train[-1]["iter"] == cfg["max_iters"] and s["train_loss"] == train[-1]["loss"]
        if cfg["stage"] == "grpo":  # rows as long as prompt and completion: no fixed tokens per step; no val
            assert s["tokens"] is None and s["val_bpb"] is None  # cross-entropy
            continue
        if stage == "rm":  # a reward model models no text: no bits per byte
            assert s["val_bpb"] is None and evals[-1]["val_accuracy"] >= 0
            continue
        assert s["val_bpb"] == evals[-1]["val_bpb"] and s["val_bpb_start"] == evals[0]["val_bpb"] > 0
        per_row = 2 * (cfg["block_size"] + 1) if stage == "dpo" else cfg["block_size"]  # dpo: rows of whole pairs
        assert s["tokens"] == s["steps"] * cfg["batch_size"] * per_row * cfg["gradient_accumulation_steps"]
        assert min(r["tokens_per_s"] for r in train) <= s["tokens_per_s"] <= max(r["tokens_per_s"] for r in train)
    dpo_evals = [r for r in read_jsonl(os.path.join(out, "dpo", "metrics.jsonl")) if "val_loss" in r]
    for point, row in (("before", dpo_evals[0]), ("after", dpo_evals[-1])):
        assert report["dpo"][point]["accuracy"] == row["val_rewards/accuracies"]
        assert report["dpo"][point]["margin"] == row["val_rewards/margins"]
    assert report["dpo"]["before"]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    students = report["students"]
    kd_evals = [r for r in read_jsonl(os.path.join(out, "student_kd", "metrics.jsonl")) if "val_loss" in r]
    assert (students["val_kd_start"], students["val_kd"]) == (kd_evals[0]["val_kd"], kd_evals[-1]["val_kd"])
    assert students["val_teacher_ce"] == kd_evals[-1]["val_teacher_ce"]
    for name, m in students["models"].items():
        assert m["val_loss"] == report["stages"][name]["val_loss"] and m["steps"] == report["stages"][name]["steps"]
        assert (m["correct"], m["n"]) == (report["tasks"]["models"][name]["correct"], report["tasks"]["n"])
    assert report["export"]["max_abs_diff"] <= 1e-4
    assert report["export"]["greedy_equal"] == report["export"]["template_ids_equal"] == report["export"]["prompts"]
    assert set(report["wall_s"]) == {"prepare", *TRAINED, "evaluate", "rm_eval", "export", "chat", "total"}
    pairs, replies = report["reward_model"]["pairs"], report["reward_model"]["replies"]
    assert pairs["rm"]["n"] == pairs["dpo"]["n"] == 150  # every held-out pair, once
    assert replies["before"]["n"] == replies["after"]["n"] == demo.QUICK_RM_PROMPTS


def well_formed_think(reply):
    """<think>, some reasoning, </think>, an answer: one block, nothing empty."""
    m = re.fullmatch(r"\s*<think>((?:(?!</?think>).)*)</think>((?:(?!</?think>).)*)", reply, re.S)
    return bool(m) and bool(m.group(1).strip()) and bool(m.group(2).strip())


def test_task_scores_recomputed_from_the_answers(quick_demo):
    """Scored again here, independently, from every answer the demo wrote down."""
    out, _, report, _ = quick_demo
    tasks = {t["prompt"]: t for t in read_jsonl(os.path.join(ROOT, "data", "demo", "tasks_val.jsonl"))}
    for stage in demo.CHAT_STAGES:
        rows = read_jsonl(os.path.join(out, "eval", f"{stage}.jsonl"))
        correct = think = 0
        for r in rows:
            task = tasks[r["prompt"]]  # a held-out prompt, with the expected answer of the data file
            answer = r["reply"].split("</think>")[-1].strip()
            correct += (task["answer"] in answer) if task["task"] == "identity" else (answer == task["answer"])
            think += well_formed_think(r["reply"])
        m = report["tasks"]["models"][stage]
        assert (m["correct"], m["n"]) == (correct, len(rows)) and m["accuracy"] == correct / len(rows)
        assert m["think_well_formed"] == think
    sft = read_jsonl(os.path.join(out, "eval", "sft.jsonl"))
    identity = [r for r in sft if r["task"] == "identity"]
    assert report["identity"]["reply"] == identity[0]["reply"] and report["identity"]["n"] == len(identity)
    assert report["distill"]["think_share"] == report["tasks"]["models"]["distill"]["think_well_formed"] / len(sft)


def test_gpu_preset_trains_a_bigger_model_with_compile():
    c = {"out_dir": "out/demo", "quick": False}
    cpu = demo.train_command(c, "pretrain", "config/pretrain_demo.py", None, "data/demo_pretrain", "cpu")
    gpu = demo.train_command(c, "pretrain", "config/pretrain_demo.py", None, "data/demo_pretrain", "gpu")
    assert "config/model_tiny.py" in cpu and "--compile=True" not in cpu
    assert "config/model_26m.py" in gpu and "--compile=True" in gpu
    sft = demo.train_command(c, "sft", "config/sft_demo.py", "pretrain", "data/demo_sft", "gpu")
    assert not any(a.startswith("config/model_") for a in sft) and "--init_from=out/demo/pretrain" in sft


def test_tool_use_is_scored_on_the_held_out_additions(quick_demo):
    out, _, report, md = quick_demo
    rows, t = read_jsonl(os.path.join(out, "eval", "tools.jsonl")), report["tools"]
    assert rows and all(r["task"] == "add" for r in rows)
    assert (t["with_tool"]["correct"], t["with_tool"]["n"]) == (sum(r["with_tool"] for r in rows), len(rows))
    assert t["without_tool"]["correct"] == sum(r["without_tool"] for r in rows)
    assert t["called"] == sum(r["calls"] > 0 for r in rows)
    assert t["sft"] == report["tasks"]["models"]["sft"]["by_task"]["add"]  # the SFT model's score, same prompts
    assert "## Tool use" in md and t["example"]["prompt"] in md



def test_grpo_is_scored_against_the_prompt_independent_baselines(quick_demo):
    """GRPO and its start on the held-out counting prompts, each once, recomputed from the answers written down;
    the baselines from the train answers (every counting record of the reasoning set, system message or not)."""
    out, _, report, md = quick_demo
    h = report["grpo"]["held_out"]
    tasks = read_jsonl(os.path.join(ROOT, "data", "demo", "grpo_val.jsonl"))[:demo.QUICK_COUNT]
    for name, key in (("distill", "start"), ("grpo", "grpo")):
        rows = read_jsonl(os.path.join(out, "eval", f"count_{name}.jsonl"))
        assert [(r["prompt"], r["answer"]) for r in rows] == [(t["prompt"], t["answer"]) for t in tasks]
        greedy = [r["greedy_answer"] == r["answer"] for r in rows]
        mean = [sum(a == r["answer"] for a in r["sampled_answers"]) / h["group"] for r in rows]
        assert all(len(r["sampled_answers"]) == h["group"] for r in rows)
        assert h["figures"]["greedy"][key]["mean"] == pytest.approx(sum(greedy) / len(rows))
        assert h["figures"]["mean"][key]["mean"] == pytest.approx(sum(mean) / len(rows))
    train = [r for r in read_jsonl(os.path.join(ROOT, "data", "demo", "reason_train.jsonl"))
             if re.search(r"How many characters|Count the characters|length of|有几个字符|有多少个字符|的长度是多少",
                          next(m["content"] for m in r["conversations"] if m["role"] == "user"))]
    assert h["train_answers"] == len(train) and any(r["conversations"][0]["role"] == "system" for r in train)
    answers = [r["conversations"][-1]["content"] for r in train]
    top = max(sorted(set(answers)), key=answers.count)
    assert h["most_frequent"] == top
    assert h["figures"]["greedy"]["prior"]["mean"] == pytest.approx(sum(t["answer"] == top for t in tasks) / len(tasks))
    assert h["figures"]["mean"]["prior"]["mean"] == pytest.approx(
        sum(answers.count(t["answer"]) / len(answers) for t in tasks) / len(tasks))
    assert "the prompt ignored" in md and report["verdicts"]["grpo"] in md
