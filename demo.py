"""
The whole pipeline on the embedded demo data (data/demo), in one command, ending in a report card.

    python demo.py                   # `make demo` runs this inside .venv
    python demo.py --quick=True      # the same stages in a couple of minutes (tests/test_demo.py runs it)

Stages, each announced by a header and followed by its own progress output:

    prepare   train a byte-level BPE tokenizer on pretrain.jsonl, tokenize the chat sets with it
    pretrain  config/pretrain_demo.py   a tiny LLaMA from scratch on the fortunes corpus
    sft       config/sft_demo.py        chat data, from pretrain
    sft_long  config/sft_long_demo.py   twice the block size with YaRN RoPE scaling, from sft
    distill   config/distill_demo.py    <think>...</think> answers, the tags weighted 10x, from sft
    dpo       config/dpo_demo.py        chosen/rejected pairs, from sft (why: see the config)
    grpo      config/grpo_demo.py       reinforcement learning on the counting prompts, reward: the exact answer,
                                        from distill
    rm        config/rm_demo.py         a reward model on the DPO pairs (the set prepared for dpo), from sft
    grpo_rm   config/grpo_rm_demo.py    GRPO against that reward model on the pairs' prompts alone, from sft
    students  config/student_demo.py    a model a quarter the size, from scratch on the chat set, the same steps
                                        twice: alone, and distilled from sft's logits (teacher=sft)
    tools     config/tools_demo.py      conversations that call the calculator for additions, from sft
    evaluate  greedy answers of every chat model to the held-out tasks (data/demo/tasks_val.jsonl), the
              pass@grpo_group of GRPO's start model, and the tools model's held-out additions with the calculator
              and without it
    reward model  the held-out pairs ranked by the reward model and by the DPO model's implicit reward; the
              held-out prompts' greedy replies of grpo_rm and its start, scored by the reward model
    export    the DPO model to a transformers directory; logits and greedy text compared with transformers
    chat      a few prompts to the final model, printed as it streams

It writes, under out_dir: one run directory per stage, hf/ (the export), eval/<stage>.jsonl
(every held-out answer and its score), loss.png, report.json (every figure of the report)
and report.md, which it prints. Prepared data goes to <data_dir>/demo_<set>.

On a GPU (torch.cuda.is_available()) it trains a bigger model (config/model_26m.py) in
bfloat16 with torch.compile; `--preset=cpu` keeps the CPU settings.
"""

import ast
import contextlib
import datetime
import importlib.util
import collections
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time

import torch

import configurator
from llm_trainer import stages
from llm_trainer.core.files import write_json

# -----------------------------------------------------------------------------
# options (--key=value)
out_dir = "out/demo"  # run directories, export, report
data_dir = "data"  # prepared sets go to <data_dir>/demo_pretrain, demo_sft, ...
quick = False  # a shortened run: smaller model and vocabulary, a few dozen steps per stage, fewer prompts
preset = "auto"  # auto (gpu when torch sees a CUDA device) | cpu | gpu
max_prompts = 0  # held-out prompts scored per model, the first of tasks_val.jsonl (0: all 150; quick: 10), and as
# many of demo_add's 40 sums
workers = 0  # prepare.py tokenizing processes (0: all cores)
# -----------------------------------------------------------------------------
_DEFAULTS = configurator.defaults(globals())

DEMO = "data/demo"
LM_EVAL_TASKS = "data/lm_eval"  # the demo's held-out tasks for lm-evaluation-harness: demo_tasks, demo_add
ROOT = os.path.dirname(os.path.abspath(__file__))

# stage, its config file, the stage whose run it starts from, the prepared set it trains on
STAGES = [
    ("pretrain", "config/pretrain_demo.py", None, "pretrain"),
    ("sft", "config/sft_demo.py", "pretrain", "sft"),
    ("sft_long", "config/sft_long_demo.py", "sft", "sft_long"),
    ("distill", "config/distill_demo.py", "sft", "reason"),
    ("dpo", "config/dpo_demo.py", "sft", "dpo"),
    ("grpo", "config/grpo_demo.py", "distill", "grpo"),
    ("rm", "config/rm_demo.py", "sft", "dpo"),
    ("grpo_rm", "config/grpo_rm_demo.py", "sft", "prompts"),
    ("student_sft", "config/student_demo.py", None, "sft"),
    ("student_kd", "config/student_demo.py", None, "sft"),
    ("tools", "config/tools_demo.py", "sft", "tools"),
]
CONFIG_OF = {stage: config_file for stage, config_file, _, _ in STAGES}
TEACHER_OF = {"student_kd": "sft"}  # logit distillation: the run whose model teaches the stage
CHAT_STAGES = ["sft", "sft_long", "distill", "dpo", "grpo", "student_sft", "student_kd"]  # scored on the held-out tasks
# prepared chat set -> the demo files it reads (<stem>_train.jsonl, <stem>_val.jsonl) and the stage whose config
# decides its max_len; the count files are written by count_prompts
CHAT_SETS = {"sft": ("sft", "sft"), "sft_long": ("sft", "sft_long"), "reason": ("reason", "distill"),
             "dpo": ("dpo", "dpo"), "grpo": ("count", "grpo"), "tools": ("tool", "tools"),
             "prompts": ("prompts", "grpo_rm")}
# the counting prompts of the reasoning set (make_chat.py's templates), GRPO's task
COUNT_PROMPT = re.compile(r"How many characters are in|Count the characters in|What is the length of|有几个字符|"
                          r"有多少个字符|的长度是多少")

MODEL_PRESET = {"cpu": "config/model_tiny.py", "gpu": "config/model_26m.py"}
GPU_FLAGS = ["--compile=True"]  # dtype=auto is already bfloat16 on a GPU that supports it
GPU_LR_SCALE = 1 / 3  # a 26M model wants a smaller step than the ~1M one the configs are tuned for (not yet
# tuned on a GPU: a conservative guess)

QUICK_MODEL = ["--dim=64", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2"]
QUICK_ITERS = {"pretrain": 30, "sft": 20, "sft_long": 4, "distill": 10, "dpo": 6, "grpo": 3, "rm": 6, "grpo_rm": 3,
               "student_sft": 6, "student_kd": 6, "tools": 4}
QUICK_FLAGS = ["--batch_size=8", "--eval_iters=2"]
QUICK_STAGE_FLAGS = {"grpo": ["--batch_size=4", "--grpo_group=2", "--max_new_tokens=16", "--eval_iters=1"],
                     "grpo_rm": ["--batch_size=4", "--grpo_group=2", "--max_new_tokens=8", "--eval_iters=1"]}
QUICK_RM_PROMPTS = 16  # held-out prompts scored before and after grpo_rm in a quick run (else all 150)
QUICK_PREPARE = ["--vocab_size=1024", "--tokenizer_sample_bytes=500000"]
QUICK_PROMPTS = 10
QUICK_COUNT = 16  # held-out counting prompts of grpo_val.jsonl that score GRPO and its start in a quick run (else 300)
QUICK_NEW_TOKENS = 24
QUICK_CHATS = 2

MAX_NEW_TOKENS = {"distill": 128, "grpo": 128}  # room for the reasoning; the others answer in a few tokens
TOOL_STEPS = 2  # the tools model's replies whose calls are run, at most, before its answer
DEFAULT_NEW_TOKENS = 48
PARITY_SEQUENCES = 8  # held-out conversations whose logits are compared with transformers

# the closing chat: each item is one conversation, its user turns in order
CHAT = [
    ["Who are you?"],
    ["你是谁？"],
    ["What is 25 + 17?", "再加上10呢？"],
    ['Reverse the word "hello".'],
    ["床前明月光，下一句是？"],
]


# -----------------------------------------------------------------------------
# helpers


def header(title):
    line = "=" * 100
    print(f"\n{line}\n== {title}\n{line}", flush=True)


def config_value(path, key):
    """The literal a demo config file assigns to `key` (read, not executed)."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    values = [ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
              and any(isinstance(t, ast.Name) and t.id == key for t in node.targets)]
    if not values:
        raise KeyError(f"{path} sets no {key}")
    return values[-1]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def git_commit():
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        commit = run("rev-parse", "--short=12", "HEAD").strip()
        dirty = bool(run("status", "--porcelain", "--untracked-files=no").strip())
        return commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


@contextlib.contextmanager
def timed(wall, name):
    """Record the wall seconds of the block in wall[name]."""
    t0 = time.perf_counter()
    yield
    wall[name] = time.perf_counter() - t0


# -----------------------------------------------------------------------------
# 1. prepare


def prepare_all(cfg, sets):
    """Tokenizer + pretraining shards, then every chat set tokenized with that tokenizer."""
    import prepare

    args = ["config/prepare_demo.py", f"--out_dir={sets['pretrain']}", f"--workers={cfg['workers']}"]
    if cfg["quick"]:
        args += QUICK_PREPARE
    metas = {"pretrain": prepare.main(args)}
    for name, (stem, stage) in CHAT_SETS.items():
        config_file, extra, where = CONFIG_OF[stage], [], DEMO
        max_len = config_value(config_file, "block_size")
        if stage == "grpo":  # prompts with their answers; a prompt leaves room for the completion
            where, extra = count_prompts(cfg["data_dir"]), ["--stage=grpo"]
            max_len -= config_value(config_file, "max_new_tokens")
        if stage == "grpo_rm":  # prompts alone, for a reward model
            where, extra = preference_prompts(cfg["data_dir"]), ["--stage=grpo"]
            max_len -= config_value(config_file, "max_new_tokens")
        print(f"\n-- {name}: {stem}_train.jsonl (+ {stem}_val.jsonl held out), max_len {max_len}", flush=True)
        metas[name] = prepare.main([
            f"--input={where}/{stem}_train.jsonl", f"--val_input={where}/{stem}_val.jsonl",
            f"--out_dir={sets[name]}", f"--tokenizer={sets['pretrain']}", f"--max_len={max_len}",
            f"--workers={cfg['workers']}", *extra])
    return metas


def count_prompts(data_dir):
    """count_train.jsonl and count_val.jsonl in data_dir/demo_count: the reasoning set's counting records (those with
    a system message too: the prompt is the first user turn), and the held-out counting prompts of grpo_val.jsonl."""
    out = os.path.join(data_dir, "demo_count")
    os.makedirs(out, exist_ok=True)
    counting = [r for r in read_jsonl(f"{DEMO}/reason_train.jsonl")
                if COUNT_PROMPT.search(next(m["content"] for m in r["conversations"] if m["role"] == "user"))]
    for split, records in (("train", counting), ("val", read_jsonl(f"{DEMO}/grpo_val.jsonl"))):
        with open(os.path.join(out, f"count_{split}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return out


def preference_prompts(data_dir):
    """prompts_train.jsonl and prompts_val.jsonl in data_dir/demo_prompts: the prompts of the DPO pairs, each once,
    alone ({"prompt"}: no reference answer), for GRPO against the reward model."""
    out = os.path.join(data_dir, "demo_prompts")
    os.makedirs(out, exist_ok=True)
    for split in ("train", "val"):
        prompts = dict.fromkeys(r["prompt"] if "prompt" in r else r["chosen"][-2]["content"]
                                for r in read_jsonl(f"{DEMO}/dpo_{split}.jsonl"))
        with open(os.path.join(out, f"prompts_{split}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts)
    return out


# -----------------------------------------------------------------------------
# 2. training: train.py as a subprocess (it exits on errors and handles signals), its output streamed


def train_command(cfg, stage, config_file, init_stage, data, device_kind, device="cpu"):
    cmd = [sys.executable, "train.py"]
    if init_stage is None:  # the model's shape: only a run from scratch reads it (a student's config sets its own)
        cmd.append(MODEL_PRESET[device_kind])
    # a demo starts over: the checkpoints a previous demo left in the stage's run directory are replaced
    cmd += [config_file, f"--data_dir={data}", f"--out_dir={run_dir(cfg, stage)}", f"--device={device}", "--overwrite=True"]
    if init_stage is not None:
        cmd.append(f"--init_from={run_dir(cfg, init_stage)}")
    if stage in TEACHER_OF:
        cmd.append(f"--teacher={run_dir(cfg, TEACHER_OF[stage])}")
    if stage == "grpo_rm":  # the reward model this demo trained
        cmd.append(f"--reward=rm:{run_dir(cfg, 'rm')}")
    if device_kind == "gpu":
        lr = config_value(config_file, "learning_rate") * GPU_LR_SCALE
        cmd += GPU_FLAGS + [f"--learning_rate={lr:.3g}", f"--min_lr={lr / 10:.3g}"]
    if cfg["quick"]:
        n = QUICK_ITERS[stage]
        cmd += QUICK_MODEL if stage == "pretrain" else []
        cmd += QUICK_FLAGS + [f"--max_iters={n}", f"--eval_interval={n}", f"--warmup_iters={max(1, n // 10)}",
                              f"--log_interval={max(1, n // 5)}"] + QUICK_STAGE_FLAGS.get(stage, [])
    return cmd


def run_dir(cfg, stage):
    return os.path.join(cfg["out_dir"], stage)


def run_train(cmd):
    print("$ " + " ".join(shlex.quote(a) for a in cmd), flush=True)
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if p.returncode != 0:
        print(f"\ndemo: the command above exited with status {p.returncode}; its output says why", file=sys.stderr)
        sys.exit(p.returncode)


def stage_summary(path, init_stage):
    """Figures of one training run, from its config.json and metrics.jsonl."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    rows = read_jsonl(os.path.join(path, "metrics.jsonl"))
    steps_logged = [r for r in rows if "loss" in r and not r.get("skipped")]
    evals = [r for r in rows if "val_loss" in r]
    steps = steps_logged[-1]["iter"]
    per_step = stages.tokens_per_step(cfg)  # None for grpo: its rows are as long as prompt and completion
    return {
        "init_from": init_stage, "block_size": cfg["block_size"], "steps": steps, "stage": cfg["stage"],
        "tokens": steps * per_step if per_step else None, "epochs": steps_logged[-1]["epoch"],
        "train_loss": steps_logged[-1]["loss"], "val_loss_start": evals[0]["val_loss"],
        "val_loss": evals[-1]["val_loss"], "val_bpb_start": evals[0].get("val_bpb"), "val_bpb": evals[-1].get("val_bpb"),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps_logged),
        "fill": statistics.mean(r["fill"] for r in steps_logged), "pack": cfg["pack"],
        "target_tokens_per_s": statistics.median(r["target_tokens_per_s"] for r in steps_logged),
        "rope_scaling": cfg["rope_scaling"], "think_tag_weight": cfg["think_tag_weight"], "teacher": cfg["teacher"],
        "curve": {"iter": [r["iter"] for r in steps_logged], "loss": [r["loss"] for r in steps_logged],
                  "val_iter": [r["iter"] for r in evals], "val_loss": [r["val_loss"] for r in evals],
                  **({k: [r[k] for r in steps_logged] for k in ("reward", "accuracy") if k in steps_logged[-1]}
                     if cfg["stage"] == "grpo" else {}),  # (accuracy: prompts with reference answers)
                  **({"val_reward": [r["val_reward"] for r in evals]} if cfg["stage"] == "grpo" else {})},
        "evals": evals,
    }


# -----------------------------------------------------------------------------
# 3. evaluation on the held-out tasks


def held_out(cfg):
    """The prompts of tasks_val.jsonl each model answers: all, or the first max_prompts (the file interleaves the
    kinds, so every kind is among the first ten)."""
    tasks = read_jsonl(f"{DEMO}/tasks_val.jsonl")
    n = cfg["max_prompts"] or (QUICK_PROMPTS if cfg["quick"] else 0)
    return tasks[:n] if n else tasks


def demo_tasks_module():
    """data/lm_eval/demo_tasks.py: how a reply to a held-out task is scored, shared with lm-eval's demo_tasks."""
    spec = importlib.util.spec_from_file_location("demo_tasks", os.path.join(ROOT, LM_EVAL_TASKS, "demo_tasks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def score(task, reply):
    """One reply scored as the demo_tasks task scores it: exact match of the answer after </think> (identity: the
    bot's name in it), and whether the reply is one well-formed <think> block and an answer."""
    tasks_module = demo_tasks_module()
    s = tasks_module.process_results(task, [reply])
    return {**task, "reply": reply, "final": tasks_module.final_answer(reply), "correct": bool(s["exact_match"]),
            "think_well_formed": bool(s["think_well_formed"])}


def answer_tasks(path, limit, device, max_new_tokens):
    """(every held-out reply with its score, eval.py's figures) of the model in `path`: greedy replies to the
    first `limit` prompts (0: all) of the generative demo_tasks, and the multiple-choice demo_add, through
    lm-evaluation-harness."""
    import eval as benchmarks

    figures, results = benchmarks.evaluate(path, "demo_tasks,demo_add", LM_EVAL_TASKS, limit=limit, device=device,
                                           dtype="float32", keep_think_tags=True, max_gen_toks=max_new_tokens)
    samples = sorted(results["samples"]["demo_tasks"], key=lambda s: s["doc_id"])
    replies = [{**s["doc"], "reply": s["resps"][0][0], "final": demo_tasks_module().final_answer(s["resps"][0][0]),
                "correct": bool(s["exact_match"]), "think_well_formed": bool(s["think_well_formed"])} for s in samples]
    return replies, figures


def model_shape(path):
    from llm_trainer.core.checkpoint import load_model

    model, _ = load_model(path)
    mcfg = model.mcfg
    return {"params": model.num_params(), "n_layers": mcfg.n_layers, "dim": mcfg.dim, "n_heads": mcfg.n_heads,
            "n_kv_heads": mcfg.n_kv_heads, "vocab_size": mcfg.vocab_size}


def sampled_scores(path, tasks, device, group, temperature, max_new_tokens):
    """Per task, through the batched generator: the greedy reply scored (1 or 0), and the share of `group` replies
    sampled at `temperature` that are right (mean@group) and whether one is (pass@group); each reply's final answer
    kept."""
    from llm_trainer.inference import generation

    model, tok, info = generation.load(path, device)
    gen, stop = torch.Generator(device).manual_seed(0), generation.chat_stop_ids(tok)
    prompts = [generation.chat_prompt_ids(tok, [{"role": "user", "content": t["prompt"]}]) for t in tasks]

    def finals(outs, chunk):  # [[score of each reply] of each task of the chunk]
        n = len(outs) // len(chunk)
        return [[score(t, generation.completion_text(tok, o, stop)) for o in outs[j * n:(j + 1) * n]]
                for j, t in enumerate(chunk)]

    # 32 prompts greedy, then the same 32 x group sampled (the generator draws as many rows at a time)
    greedy = finals(generate_in_chunks(model, prompts, 32, max_new_tokens, temperature=0.0, stop_ids=stop,
                                       max_len=info["block_size"]), tasks)
    sampled = finals(generate_in_chunks(model, [p for p in prompts for _ in range(group)], 32 * group,
                                        max_new_tokens, temperature=temperature, stop_ids=stop, generator=gen,
                                        max_len=info["block_size"]), tasks)
    return [{**t, "greedy": float(g[0]["correct"]), "mean": statistics.mean(float(s["correct"]) for s in samples),
             "pass": float(any(s["correct"] for s in samples)), "greedy_answer": g[0]["final"],
             "sampled_answers": [s["final"] for s in samples]} for t, g, samples in zip(tasks, greedy, sampled)]


def generate_in_chunks(model, prompts, size, max_new_tokens, **sampling):
    """model.generate_batch over `size` prompts at a time: batches, and their KV caches, of a bounded size."""
    return [out for i in range(0, len(prompts), size)
            for out in model.generate_batch(prompts[i: i + size], max_new_tokens, **sampling)]


def answer_baselines(train_answers, answers, k):
    """What a task's held-out answers score when the prompt is ignored, per prompt (to compare a model with prompt by
    prompt): "greedy", the most frequent train answer given to every prompt (1 where it is the prompt's answer);
    "mean", one answer drawn from the train answers' frequencies (right with probability p, the answer's share of
    them); "pass", k such draws (one of them right: 1 - (1 - p)^k). Exact expectations: nothing is drawn."""
    freq = collections.Counter(train_answers)
    top = max(sorted(freq), key=freq.__getitem__)  # a tie: the first in sorted order
    p = [freq[a] / len(train_answers) for a in answers]
    return {"answer": top, "greedy": [float(a == top) for a in answers], "mean": p,
            "pass": [1 - (1 - q) ** k for q in p]}


def paired(a, b):
    """mean ± standard error of the differences a - b of two per-prompt figures on the same prompts (paired: the
    prompts' own difficulty cancels)."""
    return mean_se([x - y for x, y in zip(a, b)])


def grpo_held_out(cfg, device):
    """GRPO's start (distill) and GRPO on the held-out counting prompts of grpo_val.jsonl (quick: the first
    QUICK_COUNT), greedy and grpo_group samples each at GRPO's temperature and completion length, beside the answer
    baselines of GRPO's train answers: each figure's mean ± standard error, and the paired differences."""
    tasks = read_jsonl(f"{DEMO}/grpo_val.jsonl")[: QUICK_COUNT if cfg["quick"] else None]
    train = [r["conversations"][-1]["content"]
             for r in read_jsonl(os.path.join(cfg["data_dir"], "demo_count", "count_train.jsonl"))]
    k = grpo_group(cfg)
    prior = answer_baselines(train, [t["answer"] for t in tasks], k)
    rows = {name: sampled_scores(run_dir(cfg, name), tasks, device, k, setting(cfg, "grpo", "temperature"),
                                 setting(cfg, "grpo", "max_new_tokens")) for name in ("distill", "grpo")}
    for name, scored in rows.items():
        with open(os.path.join(cfg["out_dir"], "eval", f"count_{name}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in scored)
    per = {"prior": prior, **{name: {kind: [r[kind] for r in scored] for kind in ("greedy", "mean", "pass")}
                              for name, scored in rows.items()}}
    return {"n": len(tasks), "group": k, "train_answers": len(train), "most_frequent": prior["answer"],
            "figures": {kind: {"prior": mean_se(prior[kind]), "start": mean_se(per["distill"][kind]),
                               "grpo": mean_se(per["grpo"][kind]),
                               "start_minus_prior": paired(per["distill"][kind], prior[kind]),
                               "grpo_minus_prior": paired(per["grpo"][kind], prior[kind]),
                               "grpo_minus_start": paired(per["grpo"][kind], per["distill"][kind])}
                        for kind in ("greedy", "mean", "pass")}}


def tool_use(path, tasks, device, max_new_tokens):
    """The tools model's greedy answers to the held-out additions, with the calculator offered (its calls run,
    their results fed back: generation.reply_with_tools) and without a tool, each scored as the tasks are."""
    from llm_trainer.inference import generation
    from llm_trainer.inference.tools import Tools

    model, tok, info = generation.load(path, device)
    calculator, rows = Tools("calculator"), []
    for t in tasks:
        messages = [{"role": "user", "content": t["prompt"]}]
        added = generation.reply_with_tools(model, tok, messages, calculator, TOOL_STEPS, temperature=0.0,
                                            max_new_tokens=max_new_tokens, max_len=info["block_size"])
        answer = added[-1]["content"] if added and added[-1]["role"] == "assistant" else ""
        plain = generation.reply(model, tok, messages, temperature=0.0, max_new_tokens=max_new_tokens,
                                 max_len=info["block_size"])
        rows.append({**t, "messages": added, "calls": sum(m["role"] == "tool" for m in added),
                     "with_tool": score(t, answer)["correct"], "reply_without": plain,
                     "without_tool": score(t, plain)["correct"]})
    return rows


def tool_summary(rows, sft):
    """The report's figures of tool_use's rows, beside the SFT model's score on the same prompts."""
    def share(k):
        n = len(rows)
        p = k / max(n, 1)
        return {"correct": k, "n": n, "accuracy": p, "se": math.sqrt(p * (1 - p) / max(n, 1))}

    example = next((r for r in rows if r["with_tool"]), rows[0])
    return {"with_tool": share(sum(r["with_tool"] for r in rows)),
            "without_tool": share(sum(r["without_tool"] for r in rows)), "sft": sft,
            "called": sum(r["calls"] > 0 for r in rows), "steps": TOOL_STEPS,
            "example": {"prompt": example["prompt"], "messages": example["messages"]}}


def accuracy_table(results):
    by_task = {}
    for r in results:
        k = by_task.setdefault(r["task"], [0, 0])
        k[0] += r["correct"]
        k[1] += 1
    correct = sum(r["correct"] for r in results)
    return {"correct": correct, "n": len(results), "accuracy": correct / max(1, len(results)),
            "by_task": {k: {"correct": v[0], "n": v[1], "accuracy": v[0] / v[1],
                            "se": math.sqrt(v[0] / v[1] * (1 - v[0] / v[1]) / v[1])} for k, v in by_task.items()},
            "think_well_formed": sum(r["think_well_formed"] for r in results)}


def grpo_group(cfg):
    """The completions per prompt of the demo's GRPO stage (the quick run's flags win)."""
    quick = [f for f in QUICK_STAGE_FLAGS["grpo"] if f.startswith("--grpo_group=")] if cfg["quick"] else []
    return int(quick[0].split("=")[1]) if quick else config_value(CONFIG_OF["grpo"], "grpo_group")


def new_tokens(cfg, stage):
    n = MAX_NEW_TOKENS.get(stage, DEFAULT_NEW_TOKENS)
    return min(n, QUICK_NEW_TOKENS) if cfg["quick"] else n


def evaluate_all(cfg, limit, device):
    """({stage: accuracy table with its replies and eval.py's figures}, the models' shape: every stage continues
    the same model)."""
    scored = {}
    os.makedirs(os.path.join(cfg["out_dir"], "eval"), exist_ok=True)
    for stage in CHAT_STAGES:
        t0 = time.perf_counter()
        results, figures = answer_tasks(run_dir(cfg, stage), limit, device, new_tokens(cfg, stage))
        with open(os.path.join(cfg["out_dir"], "eval", f"{stage}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
        scored[stage] = {**accuracy_table(results), "harness": figures["tasks"]}
        s, mc = scored[stage], figures["tasks"]["demo_add"]["metrics"]
        print(f"{stage:9s} {s['correct']:3d}/{s['n']} correct ({100 * s['accuracy']:.1f}%)  "
              + "  ".join(f"{k} {v['correct']}/{v['n']}" for k, v in s["by_task"].items())
              + f"  demo_add acc {mc['acc']['value']:.3f} ± {mc['acc']['stderr']:.3f}"
              + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        scored[stage]["results"] = results
    return scored, model_shape(run_dir(cfg, "sft"))


# -----------------------------------------------------------------------------
# 3b. the reward model: the held-out pairs, and grpo_rm's held-out replies, scored


def setting(cfg, stage, key):
    """A stage's setting: its quick flag in a quick run, else its demo config's value."""
    flags = [f for f in QUICK_STAGE_FLAGS.get(stage, []) if f.startswith(f"--{key}=")] if cfg["quick"] else []
    return ast.literal_eval(flags[0].split("=", 1)[1]) if flags else config_value(CONFIG_OF[stage], key)


def proportion(hits):
    """{"correct", "n", "accuracy", "se"} of a list of booleans: the binomial standard error."""
    n, k = len(hits), sum(hits)
    return {"correct": k, "n": n, "accuracy": k / n, "se": math.sqrt(k / n * (1 - k / n) / n)}


def mean_se(values):
    return {"mean": statistics.mean(values), "se": statistics.stdev(values) / math.sqrt(len(values)), "n": len(values)}


def pair_accuracies(cfg, data, device):
    """Every held-out pair of the DPO set, once: does the reward model score the chosen reply above the rejected one,
    and does the DPO model's implicit reward (its log-ratio to its reference, the SFT model) rank them so?"""
    from llm_trainer.core.checkpoint import load_model
    from llm_trainer.data import shards
    from llm_trainer.data.batches import Batches
    from llm_trainer.training import losses

    pad = shards.load_meta(data)["special_ids"]["<|endoftext|>"]
    batches = Batches(shards.open_split(data, "val"), unit="pair", block_size=setting(cfg, "rm", "block_size"),
                      batch_size=16, seed=0, pad_id=pad)
    rm, dpo, ref = (load_model(run_dir(cfg, name), device, head)[0]
                    for name, head in (("rm", "score"), ("dpo", "lm"), ("sft", "lm")))
    ranked = {"rm": [], "dpo": []}
    with torch.no_grad():
        for first in range(0, batches.n_units, batches.B):
            b = batches.batch(list(range(first, min(first + batches.B, batches.n_units)))).to(torch.device(device))
            kept = losses.pair_has_targets(b)
            chosen, rejected = losses.scores(rm, b.x, pad).chunk(2)
            ranked["rm"] += (chosen > rejected)[kept].tolist()
            chosen, rejected = (losses.sequence_logps(dpo, b) - losses.sequence_logps(ref, b)).chunk(2)
            ranked["dpo"] += (chosen > rejected)[kept].tolist()
    return {name: proportion(hits) for name, hits in ranked.items()}


def rm_scored_replies(cfg, data, device):
    """The greedy replies of grpo_rm's start (the SFT model) and of grpo_rm to the held-out prompts, each scored by
    the reward model with its prompt, as GRPO scored them in training: the score's and the length's (in tokens)
    mean ± standard error."""
    from llm_trainer.core.checkpoint import load_model
    from llm_trainer.data import shards
    from llm_trainer.inference import generation
    from llm_trainer.training.rewards import RewardModel, conversation

    split = shards.open_split(data, "val")
    n = min(split.num_docs, QUICK_RM_PROMPTS) if cfg["quick"] else split.num_docs
    prompts = [split.document(d)[0].tolist() for d in range(n)]
    pad = shards.load_meta(data)["special_ids"]["<|endoftext|>"]
    rm = RewardModel(load_model(run_dir(cfg, "rm"), device, "score")[0], pad, contextlib.nullcontext())
    figures = {}
    for name in ("sft", "grpo_rm"):
        model, tok, _ = generation.load(run_dir(cfg, name), device)
        replies = generate_in_chunks(model, prompts, 50, setting(cfg, "grpo_rm", "max_new_tokens"), temperature=0.0,
                                     stop_ids=generation.chat_stop_ids(tok),
                                     max_len=setting(cfg, "grpo_rm", "block_size"), pad_id=pad)
        scores = rm([conversation(tok, p, r) for p, r in zip(prompts, replies)])
        figures[name] = {**mean_se(scores), "length": mean_se([len(r) for r in replies]),
                         "example": {"prompt": split.refs[0]["prompt"],
                                     "reply": generation.completion_text(tok, replies[0], generation.chat_stop_ids(tok)),
                                     "score": scores[0]}}
    return {"before": figures["sft"], "after": figures["grpo_rm"]}


# -----------------------------------------------------------------------------
# 4. export and parity with transformers


def export_and_compare(run, hf_dir, tasks, chats, max_new_tokens):
    """Export `run`; max |logits ours - logits transformers| over held-out conversations (fp32, CPU);
    the chat template's ids against ours; greedy chat replies of both."""
    import transformers

    import export
    from llm_trainer.inference import generation

    export.export(run, hf_dir)
    ours, tok, _ = generation.load(run, "cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    diff, n_tokens = 0.0, 0
    with torch.no_grad():
        for t in tasks[:PARITY_SEQUENCES]:
            ids, _ = tok.render_chat([{"role": "user", "content": t["prompt"]}, {"role": "assistant", "content": t["answer"]}])
            x = torch.tensor([ids])
            diff = max(diff, (ours(x) - hf(x).logits).abs().max().item())
            n_tokens += len(ids)
    same_ids, same_text = 0, 0
    for turns in chats:
        messages = [{"role": "user", "content": turns[0]}]
        hf_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        same_ids += hf_ids == generation.chat_prompt_ids(tok, messages)
        x = torch.tensor([hf_ids])
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False)
        hf_text = hf_tok.decode(out[0, len(hf_ids):], skip_special_tokens=True)
        same_text += hf_text == generation.reply(ours, tok, messages, temperature=0.0, max_new_tokens=max_new_tokens)
    return {"hf_dir": hf_dir, "max_abs_diff": diff, "sequences": min(len(tasks), PARITY_SEQUENCES),
            "tokens": n_tokens, "template_ids_equal": same_ids, "greedy_equal": same_text, "prompts": len(chats)}


# -----------------------------------------------------------------------------
# 5. chat


def chat_with(path, device, chats, max_new_tokens):
    from llm_trainer.inference import generation

    model, tok, info = generation.load(path, device)
    transcript = []
    for turns in chats:
        messages = []
        for text in turns:
            messages.append({"role": "user", "content": text})
            print(f"user: {text}\nassistant: ", end="", flush=True)
            answer = generation.reply(model, tok, messages, temperature=0.0, max_new_tokens=max_new_tokens,
                                  max_len=info["block_size"], on_text=lambda s: print(s, end="", flush=True))
            print(flush=True)
            messages.append({"role": "assistant", "content": answer})
            transcript.append({"user": text, "assistant": answer})
    return transcript


# -----------------------------------------------------------------------------
# 6. report


def plot_losses(stages, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.4))
    for ax, (name, s) in zip(axes, stages.items()):
        curve = s["curve"]
        if s["stage"] == "grpo":  # rewards, not losses: the sampled completions' and the greedy held-out ones'
            ax.plot(curve["iter"], curve["reward"], label="reward (sampled)", lw=1.2)
            if "accuracy" in curve:
                ax.plot(curve["iter"], curve["accuracy"], label="accuracy (sampled)", lw=1.0, alpha=0.7)
            ax.plot(curve["val_iter"], curve["val_reward"], "o-", label="held-out reward (greedy)", ms=4)
            ax.legend(fontsize=7)
        else:
            ax.plot(curve["iter"], curve["loss"], label="train", lw=1.2)
            ax.plot(curve["val_iter"], curve["val_loss"], "o-", label="val", ms=4)
        ax.set_title(name + (" (train loss tag-weighted)" if s["think_tag_weight"] != 1 else "")
                     + (" (train loss: CE and KD)" if s["teacher"] else ""), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (DPO: sigmoid loss; rm: Bradley-Terry loss; GRPO: reward)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tool_line(m):
    """A message of a tool conversation as one transcript line: a call as name(arguments), a result as → result."""
    if m["role"] == "tool":
        return f"tool: {m['content']}"
    calls = [f"{c['function']['name']}({json.dumps(c['function']['arguments'], ensure_ascii=False)})"
             for c in m.get("tool_calls", [])]
    return f"assistant: {shorten(m['content'])}" + (f" [calls {', '.join(calls)}]" if calls else "")


def pct(x):
    return f"{100 * x:.1f}%"


def shorten(text, limit=300):
    """A reply for a code block: at most `limit` characters, no code fence inside."""
    text = text.replace("```", "'''")
    return text if len(text) <= limit else text[:limit] + " [...]"


def compare(a, b, higher_is_better=True):
    """'better', 'worse' or 'the same' for a against b."""
    if a == b:
        return "the same"
    return "better" if (a > b) == higher_is_better else "worse"


def noise(a, b):
    """Whether two task accuracies ({"correct", "n"}) differ by no more than two standard errors
    of their difference (binomial, pooled): on 150 prompts a few answers either way is chance."""
    p = (a["correct"] + b["correct"]) / (a["n"] + b["n"])
    se = math.sqrt(p * (1 - p) * (1 / a["n"] + 1 / b["n"]))
    return abs(a["correct"] / a["n"] - b["correct"] / b["n"]) <= 2 * se


def compare_tasks(a, b):
    return compare(a["accuracy"], b["accuracy"]) + (", within sampling noise" if a["accuracy"] != b["accuracy"] and noise(a, b) else "")


KINDS = {"greedy": "greedy", "mean": "mean@k", "pass": "pass@k"}  # the held-out figures of GRPO, as the report names them


def grpo_verdict(held_out):
    """Where GRPO is more than two standard errors of the paired difference above the prompt-independent baselines
    and above its start, and where not."""
    figures = held_out["figures"]

    def where(key, above):
        return [KINDS[kind].replace("k", str(held_out["group"])) for kind, f in figures.items()
                if (f[key]["mean"] > 2 * f[key]["se"]) == above]

    def sentence(key, what):
        yes, no = where(key, True), where(key, False)
        if not yes:
            return f"GRPO is not above {what} by more than two standard errors on any figure."
        return (f"GRPO is above {what} by more than two standard errors on {', '.join(yes)}"
                + (f", not on {', '.join(no)}." if no else "."))

    beats_prior = not where("grpo_minus_prior", False)
    return (f"{sentence('grpo_minus_prior', 'the answers that ignore the prompt')} "
            f"{sentence('grpo_minus_start', 'its start')} "
            + ("It beats the prompt-independent baselines on every figure." if beats_prior else
               "Where it does not beat them, the reward did not teach the task on this budget: the small model "
               "cannot copy the characters it counts, so a correct count is mostly an answer the prior makes likely "
               "(config/grpo_demo.py lists what was tried)."))


def rm_verdicts(rm):
    """The reward model against chance and against DPO's implicit reward on the same pairs; GRPO against it: the
    held-out score before and after, more than two standard errors of the difference apart or not."""
    ours, dpo = rm["pairs"]["rm"], rm["pairs"]["dpo"]
    before, after = rm["replies"]["before"], rm["replies"]["after"]
    raised = after["mean"] - before["mean"] > 2 * math.sqrt(before["se"] ** 2 + after["se"] ** 2)
    return {
        "chance": ("ranks the held-out pairs above chance (by more than two standard errors)"
                   if ours["accuracy"] - 0.5 > 2 * ours["se"] else "does not rank the held-out pairs clearly above "
                   "chance on this budget"),
        "dpo": ("ranks them as well as" if ours["correct"] == dpo["correct"] else "ranks them within sampling "
                "noise of" if noise(ours, dpo) else "ranks them better than" if ours["accuracy"] > dpo["accuracy"]
                else "ranks them worse than"),
        "grpo": ("GRPO raised the reward model's score of held-out replies by more than two standard errors."
                 if raised else "On this budget GRPO did not raise the reward model's score of held-out replies by "
                 "more than two standard errors: it does not help here."),
        "length": ("The replies got longer, the first thing a policy finds that a reward model pays for: read the "
                   "example below." if after["length"]["mean"] > 1.5 * before["length"]["mean"] else ""),
    }


def verdicts(r):
    """Every judgement the report makes, each computed once from the report's figures (words only, no numbers)."""
    st, models, dpo, tools = r["stages"], r["tasks"]["models"], r["dpo"], r["tools"]
    sft, long, distill = models["sft"], models["sft_long"], models["distill"]
    separated = dpo["after"]["margin"] > dpo["before"]["margin"] and dpo["after"]["accuracy"] > dpo["before"]["accuracy"]
    helped = distill["accuracy"] > sft["accuracy"] and not noise(distill, sft)
    long_costs_nothing = long["accuracy"] >= sft["accuracy"] and st["sft_long"]["val_loss"] <= st["sft"]["val_loss"]
    kd, alone = st["student_kd"], st["student_sft"]
    return {
        "identity": "it names itself" if r["identity"]["correct"] else "it does not name itself",
        "tasks_vs_sft": {name: compare_tasks(models[name], sft) for name in ("sft_long", "distill", "dpo")},
        "sft_long_val_loss": compare(st["sft_long"]["val_loss"], st["sft"]["val_loss"], higher_is_better=False),
        "sft_long": ": nothing here." if long_costs_nothing else ", not a gain on long inputs.",
        "distill": "distillation helped." if helped else "on this budget distillation does not clearly help" + (
            "; the model has learnt the format, not yet the reasoning (example below)."
            if distill["think_well_formed"] > distill["n"] / 2 else "."),
        "reward_model": rm_verdicts(r["reward_model"]),
        "dpo": ("separated the held-out pairs the preferred way." if separated
                else "did not separate the held-out pairs on this budget."),
        "tools": ("the calculator lifts held-out addition by more than two standard errors." if
                  tools["with_tool"]["accuracy"] > tools["sft"]["accuracy"] and not noise(tools["with_tool"], tools["sft"])
                  else "on this budget the calculator does not lift held-out addition by more than two standard "
                       "errors."),
        "grpo": grpo_verdict(r["grpo"]["held_out"]),
        "students": ("Distillation lowered" if kd["val_loss"] < alone["val_loss"] else "Distillation did not lower")
        + " the student's held-out loss; task accuracy against the student alone: "
        + compare_tasks(models["student_kd"], models["student_sft"]) + ".",
    }


def table(header, rows, left=1):
    """A Markdown table: the header's cells, the first `left` columns left-aligned, the others (numbers) right."""
    return [f"| {' | '.join(header)} |", "|" + "---|" * left + "---:|" * (len(header) - left)] + [
        f"| {' | '.join(map(str, row))} |" for row in rows]


def harness_rows(models):
    """Rows of eval.py's figures per model: demo_tasks exact match and think form, demo_add acc, acc_norm and the
    chance-adjusted score."""
    def cell(task, metric):
        return lambda m: f"{pct(m['harness'][task]['metrics'][metric]['value'])} ± " \
                         f"{pct(m['harness'][task]['metrics'][metric]['stderr'])}"

    rows = [("demo_tasks: exact match", cell("demo_tasks", "exact_match")),
            ("demo_tasks: well-formed think block", cell("demo_tasks", "think_well_formed")),
            ("demo_add: acc", cell("demo_add", "acc")), ("demo_add: acc_norm", cell("demo_add", "acc_norm")),
            ("demo_add: chance-adjusted", lambda m: f"{m['harness']['demo_add']['centered']:.3f}")]
    return [(name, *(f(m) for m in models.values())) for name, f in rows]


def rm_section(r):
    """The report's lines on the reward model and GRPO against it."""
    rm, v, st = r["reward_model"], r["verdicts"]["reward_model"], r["stages"]
    (ours, dpo), (before, after) = (rm["pairs"][k] for k in ("rm", "dpo")), (rm["replies"][k] for k in ("before", "after"))
    ranked = lambda k: (f"{k['correct']}/{k['n']}", f"{pct(k['accuracy'])} ± {pct(k['se'])}")  # noqa: E731
    score = lambda k: f"{k['mean']:.3f} ± {k['se']:.3f}"  # noqa: E731
    example = lambda k: f"{shorten(k['example']['reply'], 120)} (score {k['example']['score']:.3f})"  # noqa: E731
    return [
        "## Reward model (from the SFT model, on the DPO pairs) and GRPO against it", "",
        *table(["held-out pairs, each once", "ranked chosen over rejected", "accuracy"],
               [("reward model", *ranked(ours)), ("the DPO model's implicit reward (against the SFT model)",
                                                  *ranked(dpo))]), "",
        f"The reward model {v['chance']}; it {v['dpo']} the DPO model's implicit reward on the same pairs. "
        "± is one standard error.", "",
        *table([f"{before['n']} held-out prompts, greedy replies", "the start (SFT)", "after GRPO against the reward model"],
               [("reward-model score", score(before), score(after)),
                ("reply length (tokens)", *(f"{k['length']['mean']:.1f} ± {k['length']['se']:.1f}"
                                            for k in (before, after)))]), "",
        f"{st['grpo_rm']['steps']} steps of {rm['prompts']} prompts x {rm['group']} completions on the pairs' prompts "
        f"alone (no reference answers), reward: the reward model's score. {v['grpo']} {v['length']}".rstrip(), "",
        "```", f"user: {before['example']['prompt']}", f"start: {example(before)}", f"after: {example(after)}", "```"]


def render_report(r):
    """report.md from report.json alone: every figure in it is a value of r, every judgement one of r["verdicts"]."""
    env, st, models, v = r["environment"], r["stages"], r["tasks"]["models"], r["verdicts"]
    sft, long, distill, dpo = (models[k] for k in ("sft", "sft_long", "distill", "dpo"))
    ident, x, example, (before, after) = r["identity"], r["export"], r["distill"]["example"], r["dpo"].values()
    wall = " · ".join(f"{k} {t:.0f} s" for k, t in r["wall_s"].items() if k != "total")
    count = lambda k: f"{k['correct']}/{k['n']} ({pct(k['accuracy'])})"  # noqa: E731
    environment = [("commit", f"`{env['commit']}`"),
                   ("device", f"{env['device']}, {env['threads']} threads, preset {env['preset']}"
                              f"{', quick' if env['quick'] else ''}"),
                   ("torch", f"{env['torch']} (python {env['python']})"),
                   ("model", f"{env['params'] / 1e6:.2f}M parameters: {env['n_layers']} layers, dim {env['dim']}, "
                             f"{env['n_heads']} heads ({env['n_kv_heads']} KV), vocabulary {env['vocab_size']:,}"),
                   ("wall time", f"{wall} · **total {r['wall_s']['total']:.0f} s**")]
    def val(s):  # grpo's val_loss is minus its held-out greedy reward: show the reward
        if s["stage"] == "grpo":
            return f"reward {-s['val_loss_start']:.3f} → {-s['val_loss']:.3f}"
        return f"{s['val_loss_start']:.3f} → {s['val_loss']:.3f}"

    def bpb(s):  # grpo has no val cross-entropy
        return "–" if s.get("val_bpb") is None else f"{s['val_bpb_start']:.3f} → {s['val_bpb']:.3f}"

    training = [(name, s["init_from"] or "scratch", s["block_size"], s["steps"],
                 "–" if s["tokens"] is None else f"{s['tokens']:,}", f"{s['epochs']:.2f}", f"{s['train_loss']:.3f}",
                 val(s), bpb(s), pct(s["fill"]), f"{s['tokens_per_s']:,.0f}", f"{s['target_tokens_per_s']:,.0f}")
                for name, s in st.items()]
    tasks = [(kind, *(count(m["by_task"][kind]) for m in models.values())) for kind in sft["by_task"]]
    tasks.append(("**all**", *(count(m) for m in models.values())))
    g = r["grpo"]
    with_se = lambda k: f"{k['correct']}/{k['n']} ({pct(k['accuracy'])} ± {pct(k['se'])})"  # noqa: E731
    h = g["held_out"]
    kinds = {kind: name.replace("k", str(h["group"])) for kind, name in KINDS.items()}
    signed = lambda k: f"{'+' if k['mean'] >= 0 else ''}{pct(k['mean'])} ± {pct(k['se'])}"  # noqa: E731
    baseline = {"greedy": f"“{h['most_frequent']}” to every prompt", "mean": "one answer drawn from them",
                "pass": f"{h['group']} answers drawn from them"}
    grpo_rows = [(name, f"{baseline[kind]}: {pct(f['prior']['mean'])} ± {pct(f['prior']['se'])}",
                  *(f"{pct(f[m]['mean'])} ± {pct(f[m]['se'])}" for m in ("start", "grpo")))
                 for (kind, name), f in zip(kinds.items(), h["figures"].values())]
    diff_rows = [(label, *(signed(f[key]) for f in h["figures"].values())) for label, key in
                 (("start − prior", "start_minus_prior"), ("GRPO − prior", "grpo_minus_prior"),
                  ("GRPO − start", "grpo_minus_start"))]
    dpo_rows = [("reward accuracy (chosen > rejected)", pct(before["accuracy"]), pct(after["accuracy"])),
                ("reward margin (β · difference of log-ratios)", f"{before['margin']:.4f}", f"{after['margin']:.4f}"),
                ("DPO loss", f"{before['loss']:.4f}", f"{after['loss']:.4f}")]
    lines = [
        "# Report card: the demo pipeline", "",
        f"`{r['command']}`, finished {env['finished']}. Every figure below was computed in this run "
        "(report.json holds them all; eval/ holds every scored answer).", "",
        "## Environment", "", "| | |", "|---|---|", *(f"| {k} | {val} |" for k, val in environment), "",
        "## Training", "",
        *table(["stage", "from", "block", "steps", "tokens", "epochs", "final train loss", "val loss: start → end",
                "val bits/byte", "fill", "tokens/s", "target tokens/s"], training, left=2), "",
        "Tokens are the positions computed, rows × block size; fill is the share of them that hold real tokens, "
        f"not padding ({', '.join(n for n, s in st.items() if s['pack'])}: whole conversations packed into each row, "
        "each attending only to itself); target tokens are those that carry loss. An epoch is one pass over the "
        f"stage's train split. The distill train loss counts each reasoning tag {st['distill']['think_tag_weight']:g} "
        "times; every val loss is the plain mean over held-out target tokens (DPO: the DPO loss of held-out pairs). "
        "Bits per byte is the held-out cross-entropy in bits over the UTF-8 bytes of those targets (DPO: of the "
        "chosen replies), a figure that compares across tokenizers.", "",
        "![loss curves of every stage](loss.png)", "",
        f"## Held-out tasks ({r['tasks']['n']} prompts of tasks_val.jsonl, greedy)", "",
        *table(["task", *models], tasks), "",
        "Exact match, except identity (the reply must contain the bot's name); for the distilled model, the "
        "answer after `</think>`.", "",
        *table(["lm-evaluation-harness (eval.py)", *models], harness_rows(models)), "",
        "The same replies scored by lm-evaluation-harness (the local task data/lm_eval/demo_tasks.yaml), and the "
        "multiple-choice demo_add (data/lm_eval/demo_add.yaml: each held-out sum's right answer against three near "
        "misses, by log-likelihood; chance-adjusted: acc_norm minus chance, over one minus chance, as CORE reports "
        "it); ± is one standard error. "
        "A difference within two standard errors is noise.", "",
        f"**Who is it?** The SFT model, asked the held-out question “{ident['prompt']}”, answered “{ident['reply']}” "
        f"({v['identity']}; "
        f"{ident['correct_all']}/{ident['n']} held-out identity questions answered with the name).", "",
        f"## Long-context SFT (block {st['sft_long']['block_size']}, RoPE scaling {st['sft_long']['rope_scaling']})", "",
        f"Held-out val loss {st['sft_long']['val_loss']:.3f} against {st['sft']['val_loss']:.3f} for the SFT model it "
        f"continues ({v['sft_long_val_loss']}); task accuracy {pct(long['accuracy'])} against {pct(sft['accuracy'])} "
        f"({v['tasks_vs_sft']['sft_long']}). The held-out conversations are short, so this measures what the doubled "
        f"context costs on them{v['sft_long']}", "",
        "## Reasoning distillation", "",
        f"- {distill['think_well_formed']}/{distill['n']} held-out replies ({pct(r['distill']['think_share'])}) "
        "are well formed: one `<think>...</think>` block, then an answer;",
        f"- task accuracy {pct(distill['accuracy'])} against {pct(sft['accuracy'])} for SFT alone "
        f"({v['tasks_vs_sft']['distill']}): {v['distill']}",
        f"- a held-out {example['task']} question and the distilled model's reply:", "",
        "```", f"user: {example['prompt']}", f"assistant: {shorten(example['reply'])}", "```", "",
        "## DPO (from the SFT model, which is also its frozen reference)", "",
        *table(["held-out pairs", "before", "after"], dpo_rows), "",
        f"Before is the first step, where the policy is the reference and every reward is zero. DPO {v['dpo']} "
        f"Task accuracy after DPO: {pct(dpo['accuracy'])} against {pct(sft['accuracy'])} for the SFT model "
        f"({v['tasks_vs_sft']['dpo']}).", "",
        f"## GRPO (from the distilled model; reward {g['reward']}; the counting prompts of the reasoning set)", "",
        *table([f"{h['n']} held-out counting prompts (grpo_val.jsonl)",
                f"the prompt ignored: the {h['train_answers']} train answers", "distill (the start)", "GRPO"],
               grpo_rows), "",
        *table(["paired difference, same prompts", *kinds.values()], diff_rows), "",
        f"Accuracy of the answer after `</think>`: greedy; mean@{h['group']} and pass@{h['group']}, the share of "
        f"{h['group']} replies sampled at temperature {g['temperature']:g} that are right and whether one is (at most "
        f"{g['max_new_tokens']} new tokens, as in training). The prompt-independent baselines are exact expectations "
        "over the train answers' frequencies; ± is one standard error over the prompts, and a difference counts where "
        f"it exceeds two. {st['grpo']['steps']} steps of {g['prompts']} prompts x {g['group']} completions (KL weight "
        f"{g['kl']:g}, grpo_epochs {g['epochs']}, advantages "
        f"{'divided by the group std' if g['std_norm'] else 'not divided by the group std (Dr. GRPO)'}); the "
        f"sampled reward {g['reward_start']:.3f} at the first logged step, {g['reward_end']:.3f} at the last. "
        f"Generating took {pct(g['gen_share'])} of a step, the update the rest. {v['grpo']}", "",
        *rm_section(r), "",
        *students_section(r), "",
        f"## Tool use (from the SFT model; {st['tools']['steps']} steps on conversations that call the calculator)", "",
        *table(["held-out additions, greedy", "correct"],
               [("tools model, the calculator offered", with_se(r["tools"]["with_tool"])),
                ("tools model, no tool", with_se(r["tools"]["without_tool"])),
                ("SFT model, no tool", with_se(r["tools"]["sft"]))]), "",
        f"With the calculator offered (its schema in the system turn), the tools model called it on "
        f"{r['tools']['called']}/{r['tools']['with_tool']['n']} prompts; each call ran and its result came back as a "
        f"tool message, at most {r['tools']['steps']} replies with calls before the answer. ± is one standard error: "
        f"{v['tools']} A held-out addition:", "",
        "```", f"user: {r['tools']['example']['prompt']}",
        *(tool_line(m) for m in r["tools"]["example"]["messages"]), "```", "",
        "## Export to transformers", "",
        f"`{x['hf_dir']}` (the DPO model) loaded with `AutoModelForCausalLM`: max |logit difference| "
        f"{x['max_abs_diff']:.2e} over {x['tokens']} positions of {x['sequences']} held-out conversations (float "
        f"weights, CPU); the chat template's ids equal ours for {x['template_ids_equal']}/{x['prompts']} prompts; "
        f"greedy replies equal for {x['greedy_equal']}/{x['prompts']}.", "",
        "## Chat (the DPO model, greedy)", "", "```",
        *(line for turn in r["chat"] for line in (f"user: {turn['user']}", f"assistant: {shorten(turn['assistant'])}")),
        "```",
    ]
    return "\n".join(lines) + "\n"


def students_section(r):
    """The report's lines on the students: alone against distilled, the teacher beside them."""
    k, models = r["students"], r["students"]["models"]
    cell = lambda m: f"{m['correct']}/{m['n']} ({pct(m['accuracy'])} ± {pct(m['se'])})"  # noqa: E731
    rows = [("parameters", *(f"{m['params'] / 1e6:.2f}M" for m in models.values())),
            ("training steps (wall time)", *(f"{m['steps']} ({m['wall_s']:.0f} s)" for m in models.values())),
            ("held-out val loss (bits/byte)", *(f"{m['val_loss']:.3f} ({m['val_bpb']:.3f})" for m in models.values())),
            ("held-out tasks, greedy", *(cell(m) for m in models.values())),
            ("demo_add acc", *(f"{pct(m['demo_add'])} ± {pct(m['demo_add_se'])}" for m in models.values()))]
    return ["## Distillation into a smaller model (logits of the SFT model)", "",
            *table(["", "student alone", "student distilled", "teacher (sft)"], rows), "",
            f"The same student, from scratch on the chat set, the same steps alone and distilled: (1 − {k['kd_weight']:g})"
            f" × cross-entropy + {k['kd_weight']:g} × {k['kd_loss']} to the teacher at temperature "
            f"{k['kd_temperature']:g}, on the same targets. On the held-out targets the teacher's own cross-entropy is "
            f"{k['val_teacher_ce']:.3f}, and the distilled student's divergence from it went {k['val_kd_start']:.3f} → "
            f"{k['val_kd']:.3f}. The val loss is the plain cross-entropy of every held-out conversation (one figure "
            f"per run, no standard error); ± is one standard error. {r['verdicts']['students']}"]


def students_summary(cfg, stages, scored, wall):
    """The students alone and distilled, and their teacher: size, steps, wall time, held-out loss and scores."""
    with open(os.path.join(run_dir(cfg, "student_kd"), "config.json"), encoding="utf-8") as f:
        kd = json.load(f)
    evals = stages["student_kd"]["evals"]

    def model(name):
        s, m = stages[name], scored[name]
        add = m["harness"]["demo_add"]["metrics"]["acc"]
        return {"params": model_shape(run_dir(cfg, name))["params"], "steps": s["steps"], "wall_s": wall[name],
                "val_loss": s["val_loss"], "val_bpb": s["val_bpb"], "correct": m["correct"], "n": m["n"],
                "accuracy": m["accuracy"], "se": math.sqrt(m["accuracy"] * (1 - m["accuracy"]) / m["n"]),
                "demo_add": add["value"], "demo_add_se": add["stderr"]}

    return {"kd_loss": kd["kd_loss"], "kd_temperature": kd["kd_temperature"], "kd_weight": kd["kd_weight"],
            "val_kd_start": evals[0]["val_kd"], "val_kd": evals[-1]["val_kd"],
            "val_teacher_ce": evals[-1]["val_teacher_ce"],
            "models": {name: model(name) for name in ("student_sft", "student_kd", "sft")}}


# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = configurator.configure(_DEFAULTS, argv)
    if cfg["preset"] not in ("auto", "cpu", "gpu"):
        configurator.fail(f"preset must be auto, cpu or gpu, got {cfg['preset']!r}")
    kind = cfg["preset"] if cfg["preset"] != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.chdir(ROOT)
    os.makedirs(cfg["out_dir"], exist_ok=True)
    sets = {name: os.path.join(cfg["data_dir"], f"demo_{name}") for name in ["pretrain", *CHAT_SETS]}
    wall, t_start = {}, time.perf_counter()
    print(f"demo: {kind} preset on {device}{' (quick)' if cfg['quick'] else ''}; everything goes to {cfg['out_dir']}",
          flush=True)

    header("1. prepare: tokenizer and token shards")
    with timed(wall, "prepare"):
        metas = prepare_all(cfg, sets)

    stages = {}
    for i, (stage, config_file, init_stage, data) in enumerate(STAGES, start=2):
        header(f"{i}. {stage}: train.py {config_file}" + (f", from {init_stage}" if init_stage else ""))
        with timed(wall, stage):
            run_train(train_command(cfg, stage, config_file, init_stage, sets[data], kind, device))
        stages[stage] = stage_summary(run_dir(cfg, stage), init_stage)

    step = len(STAGES) + 2
    header(f"{step}. evaluate: greedy answers to the held-out tasks, GRPO and its start on the held-out counting "
           "prompts, the tools model with its calculator")
    tasks = held_out(cfg)
    with timed(wall, "evaluate"):
        scored, shape = evaluate_all(cfg, cfg["max_prompts"] or (QUICK_PROMPTS if cfg["quick"] else 0), device)
        counted = grpo_held_out(cfg, device)
        adds = [t for t in tasks if t["task"] == "add"]
        tools = tool_use(run_dir(cfg, "tools"), adds, device, new_tokens(cfg, "tools"))
    with open(os.path.join(cfg["out_dir"], "eval", "tools.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in tools)
    print(f"{counted['n']} held-out counting prompts: " + "  ".join(
        f"{kind} prior {f['prior']['mean']:.3f} start {f['start']['mean']:.3f} grpo {f['grpo']['mean']:.3f}"
        for kind, f in counted["figures"].items()), flush=True)
    print(f"tools, held-out additions: {sum(r['with_tool'] for r in tools)}/{len(tools)} with the calculator, "
          f"{sum(r['without_tool'] for r in tools)}/{len(tools)} without", flush=True)

    header(f"{step + 1}. reward model: the held-out pairs ranked, and grpo_rm's held-out replies scored")
    with timed(wall, "rm_eval"):
        reward_model = {"pairs": pair_accuracies(cfg, sets["dpo"], device),
                        "replies": rm_scored_replies(cfg, sets["prompts"], device),
                        "prompts": setting(cfg, "grpo_rm", "batch_size"), "group": setting(cfg, "grpo_rm", "grpo_group")}
    pairs, replies = reward_model["pairs"], reward_model["replies"]
    print(f"held-out pairs ranked right: reward model {pairs['rm']['correct']}/{pairs['rm']['n']}, DPO's implicit "
          f"reward {pairs['dpo']['correct']}/{pairs['dpo']['n']}; reward-model score of the held-out replies "
          f"{replies['before']['mean']:.3f} -> {replies['after']['mean']:.3f}", flush=True)
    step += 1

    header(f"{step + 1}. export: the DPO model to transformers, compared")
    chats = CHAT[:QUICK_CHATS] if cfg["quick"] else CHAT
    with timed(wall, "export"):
        parity = export_and_compare(run_dir(cfg, "dpo"), os.path.join(cfg["out_dir"], "hf"), tasks, chats,
                                    new_tokens(cfg, "dpo"))
    print(f"max |logits ours - transformers| = {parity['max_abs_diff']:.2e}; greedy replies equal "
          f"{parity['greedy_equal']}/{parity['prompts']}", flush=True)

    header(f"{step + 2}. chat with the DPO model")
    with timed(wall, "chat"):
        transcript = chat_with(run_dir(cfg, "dpo"), device, chats, new_tokens(cfg, "dpo"))

    header("report")
    report = build_report(cfg, kind, device, shape, stages, metas, scored, counted, parity, transcript, wall, t_start,
                          tools, reward_model)
    print(write_report(cfg["out_dir"], report, stages))


def build_report(cfg, kind, device, shape, stages, metas, scored, counted, parity, transcript, wall, t_start, tools,
                 reward_model):
    identity = [r for r in scored["sft"]["results"] if r["task"] == "identity"]
    distill = scored["distill"]["results"]
    example = next((r for r in distill if r["task"] == "add" and r["think_well_formed"]), distill[0])
    dpo_evals = stages["dpo"]["evals"]
    dpo_point = lambda e: {"accuracy": e["val_rewards/accuracies"], "margin": e["val_rewards/margins"],
                           "loss": e["val_loss"]}
    wall = dict(wall, total=time.perf_counter() - t_start)
    report = {
        "command": "python demo.py" + (" --quick=True" if cfg["quick"] else ""),
        "environment": {
            "commit": git_commit(),
            "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu {platform.machine()}",
            "threads": torch.get_num_threads(), "preset": kind, "quick": cfg["quick"],
            "torch": torch.__version__, "python": platform.python_version(),
            "finished": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            **shape,
        },
        "wall_s": wall,
        "data": {name: {split: {k: m["splits"][split][k] for k in ("documents", "tokens", "targets")}
                        for split in ("train", "val")} for name, m in metas.items()},
        "stages": {name: {k: v for k, v in s.items() if k != "evals"} for name, s in stages.items()},
        "tasks": {"n": len(scored["sft"]["results"]),
                  "models": {name: {k: v for k, v in s.items() if k != "results"} for name, s in scored.items()}},
        "identity": {"prompt": identity[0]["prompt"], "reply": identity[0]["reply"], "correct": identity[0]["correct"],
                     "correct_all": sum(r["correct"] for r in identity), "n": len(identity)},
        "distill": {"think_share": scored["distill"]["think_well_formed"] / len(distill),
                    "example": {k: example[k] for k in ("task", "prompt", "reply")}},
        "dpo": {"before": dpo_point(dpo_evals[0]), "after": dpo_point(dpo_evals[-1])},
        "grpo": grpo_summary(run_dir(cfg, "grpo"), counted),
        "students": students_summary(cfg, stages, scored, wall),
        "tools": tool_summary(tools, scored["sft"]["by_task"]["add"]),
        "reward_model": reward_model,
        "export": parity,
        "chat": transcript,
    }
    report["verdicts"] = verdicts(report)
    return report


def grpo_summary(path, counted):
    """The GRPO run's settings and figures for the report, from its config.json and metrics.jsonl."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    rows = read_jsonl(os.path.join(path, "metrics.jsonl"))
    steps, evals = [r for r in rows if "reward" in r], [r for r in rows if "val_reward" in r]
    return {"reward": cfg["reward"], "group": cfg["grpo_group"], "prompts": cfg["batch_size"],
            "temperature": cfg["temperature"], "max_new_tokens": cfg["max_new_tokens"], "held_out": counted,
            "kl": cfg["grpo_kl"], "std_norm": cfg["grpo_std_norm"], "epochs": cfg["grpo_epochs"],
            "reward_start": steps[0]["reward"], "reward_end": steps[-1]["reward"],
            "val_reward_start": evals[0]["val_reward"], "val_reward_end": evals[-1]["val_reward"],
            "gen_share": statistics.median(r["gen_s"] / (r["dt_ms"] / 1000) for r in steps)}


def write_report(out, report, stages):
    plot_losses(stages, os.path.join(out, "loss.png"))
    write_json(os.path.join(out, "report.json"), report, indent=1)
    text = render_report(report)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text + f"\n(written to {os.path.join(out, 'report.md')}, with report.json and loss.png)"


if __name__ == "__main__":
    main()
