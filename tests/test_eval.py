"""eval.py: our model under lm-evaluation-harness gives what lm_eval's hf backend gives on the exported model (every
item's log-likelihood to 1e-4, the same metrics, the same generated text), for a LoRA run as for its merged export;
batch size changes nothing; a task without its data offline is one line."""

import json
import os
import subprocess
import sys

import pytest
import torch

import eval as evalpy
import export
from llm_trainer.core.checkpoint import lora_base, save_checkpoint
from model import ModelConfig, Transformer
from tests.helpers import TINY, metrics, run_train, train_in_process, train_losses, val_losses

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow  # lm-evaluation-harness on both sides, eval.py and torchrun in subprocesses
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INCLUDE = os.path.join(ROOT, "data", "lm_eval")

# a loglikelihood_rolling task (texts longer than the tiny model's 256-token context: several windows each) and a
# generative task with stop strings, written next to the test data
TEXT_TASK = """task: demo_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
CONTINUE_TASK = """task: demo_continue
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: answer
generation_kwargs:
  until: [" ", "\\n"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    with open(os.path.join(ROOT, "data", "demo", "pretrain.jsonl"), encoding="utf-8") as f:
        docs = [json.loads(next(f))["text"] for _ in range(60)]
    with open(root / "texts.jsonl", "w", encoding="utf-8") as f:
        for i in range(0, 60, 5):  # five documents each: 1-3 windows of 256 tokens
            f.write(json.dumps({"text": "\n".join(docs[i:i + 5])}, ensure_ascii=False) + "\n")
    (root / "demo_text.yaml").write_text(TEXT_TASK.format(data=root / "texts.jsonl"), encoding="utf-8")
    tasks_val = os.path.join(ROOT, "data", "demo", "tasks_val.jsonl")
    (root / "demo_continue.yaml").write_text(CONTINUE_TASK.format(data=tasks_val), encoding="utf-8")
    for name in ("demo_add.yaml", "demo_add.py", "demo_tasks.yaml", "demo_tasks.py"):
        (root / name).write_text(open(os.path.join(INCLUDE, name), encoding="utf-8").read(), encoding="utf-8")
    return str(root)


@pytest.fixture(scope="module")
def runs(made_run, tmp_path_factory):
    """A base run and a chat run, each with its export."""
    root = tmp_path_factory.mktemp("eval_runs")
    out = {}
    for stage in ("pretrain", "sft"):
        run = made_run(stage)
        export.export(run, str(root / f"{stage}_hf"))
        out[stage] = (run, str(root / f"{stage}_hf"))
    return out


def evaluate(lm, names, include, chat=False, limit=0):
    manager = evalpy.task_manager(include, names)
    return evalpy.run_tasks(lm, evalpy.load_tasks(names, manager), manager, limit=limit, chat=chat)


def hf_backend(hf_dir, batch_size=8):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=hf_dir, device="cpu", batch_size=batch_size, dtype="float32")


def ours(path, batch_size=16):
    return evalpy.load_lm(path, batch_size=batch_size, device="cpu", dtype="float32")[0]


def by_doc(results, task):
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def assert_same(a, b, metrics, loglik_tol=1e-4):
    """The metrics equal exactly; every item's responses: log-likelihoods within loglik_tol (and the same greedy
    flags), generated strings equal."""
    for task, names in metrics.items():
        for name in names:
            assert a["results"][task][f"{name},none"] == b["results"][task][f"{name},none"], (task, name)
        sa, sb = by_doc(a, task), by_doc(b, task)
        assert [s["doc_id"] for s in sa] == [s["doc_id"] for s in sb] and sa
        for x, y in zip(sa, sb):
            assert x["arguments"] == y["arguments"]
            for rx, ry in zip(x["filtered_resps"], y["filtered_resps"]):
                if isinstance(rx, str):
                    assert rx == ry, (task, x["doc_id"])
                elif isinstance(rx, (tuple, list)):  # (log-likelihood, is greedy): a float32 sum, rounded at 1e-7
                    assert rx[0] == pytest.approx(ry[0], abs=loglik_tol, rel=1e-6) and bool(rx[1]) == bool(ry[1])
                else:  # a rolling log-likelihood: the sum over a thousand tokens or more, which the hf backend
                    # adds up in float32 (it rounds at 1e-7 of the total)
                    assert rx == pytest.approx(ry, abs=loglik_tol, rel=1e-6)


def test_multiple_choice_and_rolling_equal_the_hf_backend(runs, tasks_dir):
    run, hf = runs["pretrain"]
    names = ["demo_add", "demo_text"]
    a, b = evaluate(ours(run), names, tasks_dir), evaluate(hf_backend(hf), names, tasks_dir)
    assert_same(a, b, {"demo_add": ["acc", "acc_norm"], "demo_text": []})
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert a["results"]["demo_text"][f"{metric},none"] == pytest.approx(b["results"]["demo_text"][f"{metric},none"],
                                                                            rel=1e-5)
    windows = [len(s["doc"]["text"]) for s in by_doc(a, "demo_text")]
    assert max(windows) > 3 * 256  # texts that need several windows of the 256-token context
    # lm_eval's environment report (subprocesses, ~0.7 s a call) is skipped inside run_tasks only
    from lm_eval import evaluator
    from lm_eval.loggers.utils import add_env_info

    assert "pretty_env_info" not in a and evaluator.add_env_info is add_env_info


def test_generation_with_stop_strings_and_chat_template_equals_the_hf_backend(runs, tasks_dir):
    run, hf = runs["pretrain"]
    a, b = (evaluate(lm, ["demo_continue"], tasks_dir, limit=24) for lm in (ours(run), hf_backend(hf)))
    assert_same(a, b, {"demo_continue": ["exact_match"]})
    texts = [s["filtered_resps"][0] for s in by_doc(a, "demo_continue")]
    assert any(texts) and not any(" " in t or "\n" in t for t in texts)
    run, hf = runs["sft"]  # a chat model: the prompt in the chat template, generation up to <|im_end|>
    a, b = (evaluate(lm, ["demo_tasks"], tasks_dir, chat=True, limit=10) for lm in (ours(run), hf_backend(hf)))
    assert_same(a, b, {"demo_tasks": ["exact_match", "think_well_formed"]})
    assert by_doc(a, "demo_tasks")[0]["arguments"][0][0].startswith("<|im_start|>user\n")


def make_lora_run(base, path):
    """A LoRA run directory as train.py saves one: adapters only (off zero), the base named by its sha256."""
    from llm_trainer.core.checkpoint import load_model

    plain, _ = load_model(base)
    cfg = ModelConfig(**{**plain.mcfg.to_dict(), "lora_rank": 4, "lora_alpha": 8.0, "lora_targets": ("q", "v", "down")})
    model = Transformer(cfg)
    model.load_state_dict(plain.state_dict(), strict=False)
    torch.manual_seed(1)
    adapters = {k: torch.randn_like(v) * 0.3 for k, v in model.state_dict().items() if ".lora_" in k}
    os.makedirs(path, exist_ok=True)
    save_checkpoint(str(path), {"model": adapters, "model_config": cfg.to_dict(), "stage": "sft", "iter": 1,
                                "config": {"block_size": 256, "stage": "sft"}, "lora_base": lora_base(base)})
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if os.path.exists(os.path.join(base, name)):
            with open(os.path.join(base, name), "rb") as src, open(os.path.join(path, name), "wb") as dst:
                dst.write(src.read())
    return str(path)


def test_a_lora_run_unmerged_equals_its_merged_export(runs, tasks_dir, tmp_path):
    base, base_hf = runs["pretrain"]
    lora = make_lora_run(base, tmp_path / "lora")
    export.export(lora, str(tmp_path / "merged"))
    names = ["demo_add", "demo_continue"]
    a = evaluate(ours(lora), names, tasks_dir, limit=24)
    b = evaluate(hf_backend(str(tmp_path / "merged")), names, tasks_dir, limit=24)
    assert_same(a, b, {"demo_add": ["acc", "acc_norm"], "demo_continue": ["exact_match"]})
    plain = evaluate(hf_backend(base_hf), ["demo_add"], tasks_dir, limit=24)
    assert by_doc(a, "demo_add")[0]["filtered_resps"] != by_doc(plain, "demo_add")[0]["filtered_resps"]  # adapted


def test_batch_size_1_equals_16(runs, tasks_dir):
    run, _ = runs["pretrain"]
    names = ["demo_add", "demo_text", "demo_continue"]
    a, b = (evaluate(ours(run, batch_size=n), names, tasks_dir, limit=24) for n in (1, 16))
    assert_same(a, b, {"demo_add": ["acc", "acc_norm"], "demo_text": ["word_perplexity"],
                       "demo_continue": ["exact_match"]}, loglik_tol=1e-5)


@pytest.mark.parametrize("layout", ["short", "long_row", "cut"])
def test_shared_context_rows_score_each_choice_as_alone(runs, layout):
    """An item's choices in one row after their context give the log-likelihoods of each choice computed alone;
    also when the row is longer than the model's context (each choice alone fits it), and when context + choice
    is cut to the model's context (choices as long share the cut context)."""
    run, _ = runs["pretrain"]
    lm = ours(run)
    ctx, conts = [0, 11, 12, 13, 14], [[20, 21, 22], [30], [40, 41]]
    if layout == "long_row":
        ctx, conts = [0] + [11 + i % 300 for i in range(149)], [[20 + (i * k) % 350 for i in range(100)] for k in (1, 3, 7)]
        assert evalpy.row_length((ctx, [(0, c) for c in conts])) > lm.max_length
    if layout == "cut":
        ctx, conts = [0] + [11 + i % 300 for i in range(lm.max_length)], [[20 + (i * k) % 350 for i in range(9)]
                                                                            for k in (1, 3, 7)]
    together = lm._loglikelihood_tokens([(None, ctx, c) for c in conts])
    alone = [lm._loglikelihood_tokens([(None, ctx, c)])[0] for c in conts]
    rows = evalpy.shared_context_rows([(ctx, c) for c in conts], lm.max_length)
    assert len(rows) == 1 and len(rows[0][1]) == 3  # really one row
    for (x, gx), (y, gy) in zip(together, alone):
        assert x == pytest.approx(y, abs=1e-5, rel=1e-7) and gx == gy  # float32 sums of 100 tokens: 1e-7
    with torch.no_grad():  # and against a plain forward of context + choice, cut as lm_eval cuts it
        for c, (x, _) in zip(conts, together):
            seen = (ctx + c)[-(lm.max_length + 1):-len(c)]
            logp = torch.log_softmax(lm.model(torch.tensor([seen + c[:-1]])).float(), -1)[0]
            assert x == pytest.approx(sum(float(logp[len(seen) - 1 + j, t]) for j, t in enumerate(c)), abs=1e-5,
                                      rel=1e-7)


def test_a_task_without_its_data_offline_is_one_line_exit_2(runs, tmp_path):
    run, _ = runs["pretrain"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "eval.py", f"--out_dir={run}", "--tasks=hellaswag"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "task hellaswag: its data set (Rowan/hellaswag)" in errors[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_in_training_evaluation_leaves_training_bit_identical(demo_pretrain, tmp_path):
    """eval_tasks: figures in the log at every eval_interval, those of eval.py on the weights of that step; the
    training losses (with dropout: the model's mode is put back) exactly those of a run without them; two ranks
    share the items and log what one process does on the same weights."""
    args = [f"--data_dir={demo_pretrain}", "--max_iters=6", "--eval_interval=3", "--dropout=0.1",
            "--learning_rate=1e-2", "--device=cpu", *TINY, "--gradient_accumulation_steps=2"]
    tasks = ["--eval_tasks=demo_add", f"--eval_tasks_include={INCLUDE}", "--eval_tasks_limit=12"]
    plain, scored, ranks = str(tmp_path / "plain"), str(tmp_path / "scored"), str(tmp_path / "ranks")
    train_in_process(args + [f"--out_dir={plain}"])
    train_in_process(args + [f"--out_dir={scored}", *tasks])
    assert train_losses(plain) == train_losses(scored) and val_losses(plain) == val_losses(scored)
    rows = [r for r in metrics(scored) if "tasks/demo_add/acc" in r]
    assert [r["iter"] for r in rows] == [0, 3, 6] and all("val_loss" in r for r in rows)
    fig, _ = evalpy.evaluate(scored, "demo_add", INCLUDE, limit=12, device="cpu", dtype="float32")
    final = fig["tasks"]["demo_add"]["metrics"]
    assert (rows[-1]["tasks/demo_add/acc"], rows[-1]["tasks/demo_add/acc_norm_se"]) == (
        final["acc"]["value"], final["acc_norm"]["stderr"])
    run_train(args + [f"--out_dir={ranks}", *tasks], nproc=2)
    two = [r for r in metrics(ranks) if "tasks/demo_add/acc" in r]
    assert {k: v for k, v in two[0].items() if k.startswith("tasks/")} == {
        k: v for k, v in rows[0].items() if k.startswith("tasks/")}  # the same start, the items split over 2 ranks
    fig, _ = evalpy.evaluate(ranks, "demo_add", INCLUDE, limit=12, device="cpu", dtype="float32")
    assert two[-1]["tasks/demo_add/acc_norm"] == fig["tasks"]["demo_add"]["metrics"]["acc_norm"]["value"]
