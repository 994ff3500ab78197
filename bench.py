"""
bench.py: how fast is training, really? train.py's real step, side by side with HuggingFace's
LlamaForCausalLM of the same shape in the same process, plus data loading, prepare.py and decoding.

    python bench.py config/bench_124m.py --device=cuda --compile=True --compare_hf=True
    python bench.py --device=cpu --model=tiny --json=bench.json

How it measures:
- The training step is train.train_step itself (loading the step's micro-batches, forward, loss,
  backward, clipping, AdamW and the step's one host sync), with the model, precision, compile and
  accumulation settings train.py would use. `warmup_steps` untimed steps first (compilation,
  allocator, caches); then every step is timed between two device synchronisations and the figure
  is the median.
- compare_hf=True: the baseline is LlamaForCausalLM (attn_implementation="sdpa") with our weights,
  trained by the very same train.train_step, the same batches, loss, precision, clipping and AdamW
  settings (llm_trainer/training/optimizers.py), compiled iff ours is (together with the loss, as ours):
  only the model differs. Ours and HF take turns, `rounds` times `steps` steps each, so a machine
  whose load changes mid-run (shared cores, clocks) slows both. ours/HF is the ratio of median
  tokens/s; ours/HF paired is the median over rounds of HF's time / ours in that round, the
  steadier of the two when the load changes.
- MFU = flops_per_token x tokens per step / step time / peak, where flops_per_token is
  model.flops_per_token (6N + 12·L·H·Q·T, PaLM appendix B) and the peak comes from
  common.PEAK_TFLOPS by device name, or peak_tflops. No MFU on CPU unless peak_tflops is given.
- Peak memory on CUDA: weights and optimizer state of the model plus the most its steps allocated
  on top (so the other model, resident at the same time, does not count); on CPU only the
  process's maximum resident set, for the whole run.
- Data loading: run.train_batches.get + Batch.to(device) per micro-batch, as a share of the step.
- prepare.py MB/s: its main pass (tokenize + write shards; not tokenizer training) on a jsonl of
  `prepare_mb` MB made of the demo corpus, median of three runs.
- Decode tokens/s at batch 1, greedy, not compiled: ours (Transformer.generate, KV cache) and HF
  generate with the same weights, `decode_tokens` new tokens after a 16-token prompt.
- sft=True measures SFT rows instead: target tokens (those that carry loss) per second of the
  same train.train_step with pack=True against pack=False, in turns, on a prepared SFT directory
  (data_dir) or on synthetic chats whose lengths are long-tailed (lognormal, sigma 1) with mean
  block_size/3, a third of each a prompt. Fill is real tokens / computed positions.
  dpo=True does the same for DPO's preference pairs (whole pairs packed, against one pair in two
  padded rows, the reference model's forward included), on a prepared DPO directory or on
  synthetic short pairs: a prompt and two replies, each lognormal (sigma 1) with mean block_size/16.

    python bench.py --sft=True --model=26m --block_size=512 --device=cpu --threads=2
    python bench.py --dpo=True --model=tiny --data_dir=data/demo_dpo --block_size=512 --device=cpu
- lora=True measures LoRA against full fine-tuning: the same SFT step (synthetic chats, as sft=True)
  on the same randomly initialised model, every weight trained or only rank-lora_rank adapters on
  all projections, in turns; tokens/s, and the bytes each keeps: weights, gradients and AdamW
  state counted tensor by tensor, plus the CUDA peak on a GPU. lora_runs=["lora"] (or ["full"])
  runs one of them alone, so that the process's peak RSS is that run's.

    python bench.py --lora=True --model=124m --block_size=256 --batch_size=4 --device=cpu
- kd=True measures logit distillation: the same SFT step (synthetic chats, as sft=True) of the same student, plain
  ("sft"), with a frozen teacher (random weights of the kd_teacher preset's shape, the student's own when "") whose
  logits and the student's exist kd_chunk target positions at a time ("kd"), and with all of them at once
  ("kd_unchunked"), in turns; step time and its ratio to plain SFT, and the CUDA peak (weights, optimizer state and
  teacher, plus the most a step allocates) on a GPU. On a CPU the peak is the process's maximum resident set:
  kd_runs=["kd"] (or one other) runs one alone, so that it is that run's.

    python bench.py --kd=True --model=26m --block_size=256 --batch_size=8 --device=cpu --threads=2
- evals=True measures eval.py against lm_eval's own hf backend (HFLM) on the export of the same model: a
  multiple-choice task of eval_items items (a local YAML task built from the demo corpus, HellaSwag-like: a
  passage of 200 characters, four endings of 80, one of them the passage's own), the whole
  lm_eval.simple_evaluate timed, both sides in turns, `rounds` times at every batch size of eval_batch_sizes;
  items/s of each side at its best batch size, and of the model's calls alone (the time inside
  lm.loglikelihood: the rest, building requests, metrics, lm_eval's environment report, is the same work for both). The model
  has the preset's shape, random weights and a tokenizer trained on the demo corpus with the preset's vocabulary.

    python bench.py --evals=True --model=tiny --device=cpu --threads=2 --rounds=2
- quality=True measures quality per token and per second: the same model (the preset's shape, the same seed's
  initial weights) on the same prepared pretraining data (data_dir, with a val split and a tokenizer) in the
  same batch order, trained quality_iters steps by each recipe (a name and train.py keys, over train_keys, over
  train.py's defaults),
  val bits per byte every quality_eval_interval steps. The baseline is the first recipe at the best of
  baseline_lrs (the lowest final val bpb, mean over seeds), so that it is tuned; every run's min_lr is a tenth
  of its peak unless the recipe sets it. For each recipe and seed, against the baseline of the same seed: the
  tokens and the training seconds (evaluation not counted) it needs to reach the baseline's final val bpb
  (linear between evaluations; None if it does not), its val bpb at the baseline's token count, its median
  step time, and the optimizer step alone (random gradients: Muon's Newton-Schulz cost). Runs are kept in
  quality_dir and reused by a later call with the same settings, so a sweep can be split over calls
  (quality_max_runs new runs each); the report covers what is done. With json, a plot of val bpb against tokens
  and against seconds is written beside it (the same name, .png).

    python bench.py --quality=True --model=tiny --data_dir=data/demo_pretrain --json=out/quality/tiny.json
- serve=True measures serve.py instead: it serves serve_run on 127.0.0.1 and sends serve_clients
  streaming chat requests at once (the official openai client, one thread each), several rounds;
  aggregate completion tokens/s (all clients' tokens over the wall time of the round) and the
  p50 / p95 time to the first token. Then a load check (bench_serve_load): serve_load_clients clients at
  once, a quarter leaving mid-request and a quarter sending invalid bodies; the valid ones must get the
  text they get alone, and the server's own counters (GET /health) say what ran and for how long.

    python bench.py --serve=True --serve_run=out/demo/sft --device=cpu

`model` picks a size preset: the shape and the recipe (optimizer, learning rates: RECIPE_KEYS) of
config/model_<model>.py and that preset's vocabulary; every key given after it (in a config file or as
--key=value) wins. The shape and recipe keys and their defaults are train.py's. quality=True runs each
recipe over train.py's defaults, not over the preset's recipe, so that a recipe is what it says. `--json=PATH` writes every
figure with its name, the config, the command, the device, torch and transformers versions and
the date.
"""

import contextlib
import dataclasses
import datetime
import importlib.metadata
import io
import itertools
import json as json_lib
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch

from llm_trainer import stages
from llm_trainer.core import common
import configurator
import prepare
from llm_trainer.data import shards
import train
from configurator import fail
from llm_trainer.core.files import write_json
from llm_trainer.training import optimizers
from model import to_hf_state_dict, token_cross_entropy

SHAPE_KEYS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "rope_theta", "tie_embeddings")
# the optimizer and schedule, as train.py takes them: a size preset (config/model_*.py) sets its recipe
RECIPE_KEYS = ("optimizer", "learning_rate", "min_lr", "warmup_iters", "weight_decay", "muon_lr", "muon_momentum",
               "muon_adjust_lr", "muon_split", "group_lr", "group_weight_decay")
STEP_KEYS = ("block_size", "batch_size", "gradient_accumulation_steps", "device", "dtype", "compile", "compile_mode",
             "seed")

# -----------------------------------------------------------------------------
# defaults (override with config files and --key=value)
model = "tiny"  # size preset: tiny | 26m | 124m | 500m | 1b (config/model_<model>.py), "" to give the shape below
data_dir = ""  # a prepared pretraining (sft=True: sft, dpo=True: dpo) directory to read batches from; "": synthetic data
# the model shape: train.py's keys (vocab_size, dim, n_layers, n_heads, n_kv_heads, ffn_dim, rope_theta,
# tie_embeddings) with train.py's defaults; a preset sets them; vocab_size 0: the preset's vocabulary
# the training step, as train.py takes it
block_size = 256
batch_size = 8
gradient_accumulation_steps = 1
device = "auto"  # auto | cpu | cuda | cuda:N | mps
dtype = "auto"  # auto | bfloat16 | float16 | float32 (auto: bf16 on recent GPUs, fp32 on CPU)
compile = False
compile_mode = "default"  # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs (both models)
seed = 1337
threads = 0  # torch CPU threads (0: torch's default, one per core)
# what to measure
compare_hf = False  # the same step with transformers' LlamaForCausalLM, in this process
sft = False  # SFT rows instead: target tokens/s packed against padded (data_dir: a prepared sft set)
dpo = False  # DPO's preference pairs instead: target tokens/s packed against padded (data_dir: a prepared dpo set)
sft_docs = 4000  # synthetic chats (dpo=True: pairs) when sft=True and no data_dir
lora = False  # LoRA against full fine-tuning instead: tokens/s and memory (weights, gradients, optimizer state)
lora_rank = 8
lora_runs = ["full", "lora"]  # lora=True: the runs compared ("lora" or "full" alone: the process RSS is its own)
kd = False  # logit distillation instead: the SFT step's cost with a teacher over without one, and memory
kd_teacher = ""  # kd=True: the teacher's size preset ("": the student's shape)
kd_chunk = 1024  # kd=True: the "kd" run's kd_chunk (train.py)
kd_runs = ["sft", "kd", "kd_unchunked"]  # kd=True: the runs compared (one alone: the process RSS is its own)
serve = False  # serve.py instead: aggregate tokens/s and time to first token at serve_clients concurrent clients
serve_run = ""  # serve=True: the run (or HF) directory to serve
serve_clients = [1, 4, 16]  # concurrent streaming clients, one measurement each
serve_max_tokens = 48  # tokens per reply at most
serve_load_clients = 64  # serve=True: then a load check with this many clients at once (0: none), see bench_serve_load
evals = False  # eval.py against lm_eval's hf backend instead: items/s on one multiple-choice task, each side at its
# best of eval_batch_sizes
eval_items = 200  # evals=True: items of the task (a cloze task made of the demo corpus: a passage, four endings)
eval_batch_sizes = [1, 8, 32]
quality = False  # quality per token instead: val bpb of several recipes against tokens and seconds (see above)
recipes = {"adamw": {"optimizer": "adamw"}, "muon": {"optimizer": "muon"}}  # quality: name -> train.py keys; the
# first is the baseline, whose learning_rate is swept (baseline_lrs)
baseline_lrs = [1e-3, 3e-3, 1e-2]  # quality: the baseline's learning rates; the best is the baseline
seeds = [1337, 1338]  # quality: every recipe runs once per seed (initial weights and batch order)
train_keys = {"warmup_iters": 20}  # quality: train.py keys of every run (under each recipe's own)
quality_iters = 200  # quality: optimizer steps per run
quality_eval_interval = 20  # quality: val bpb every so many steps
quality_eval_iters = 8  # quality: val micro-batches per evaluation
quality_dir = "out/quality"  # quality: finished runs, reused by a later call with the same settings
quality_max_runs = 0  # quality: new runs this call at most (0: all that are missing)
warmup_steps = 3  # untimed steps per model before timing
steps = 2  # timed steps per model per round
rounds = 5  # ours and HF take turns this many times
peak_tflops = 0.0  # 0: common.PEAK_TFLOPS by GPU name (none on CPU)
data_batches = 20  # micro-batches timed for the data loading figure (0: skip)
prepare_mb = 2.0  # MB of jsonl prepare.py is timed on (0: skip)
decode_tokens = 64  # new tokens per decode run (0: skip)
json = ""  # write every figure to this path
# -----------------------------------------------------------------------------
_DEFAULTS = {**{k: train._DEFAULTS[k] for k in SHAPE_KEYS + RECIPE_KEYS}, **configurator.defaults(globals())}

ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_CORPUS = os.path.join(ROOT, "data", "demo", "pretrain.jsonl")
# the vocabulary of each size preset (config/model_*.py leave it to the data)
PRESET_VOCAB = {
    "tiny": 4096,  # the demo tokenizer, config/prepare_demo.py
    "26m": 6400,  # MiniMind's tokenizer
    "124m": 50304,  # GPT-2's 50,257 rounded up to a multiple of 64, as nanoGPT does
    "500m": 32000,
    "1b": 32000,
}
PROMPT_TOKENS = 16  # decode prompt length
MFU_FORMULA = "MFU = flops_per_token x tokens_per_step / step_time / peak, flops_per_token = 6N + 12*L*H*Q*T"


# -----------------------------------------------------------------------------
# configuration


def configure(argv=None):
    """bench.py's config: the defaults, then the shape of the `model` preset, then argv (which wins)."""
    argv = sys.argv[1:] if argv is None else argv
    preset = configurator.configure(_DEFAULTS, argv)["model"]
    if preset:
        if preset not in PRESET_VOCAB:
            fail(f"model must be one of {', '.join(PRESET_VOCAB)} or \"\", got {preset!r}")
        argv = [os.path.join(ROOT, "config", f"model_{preset}.py"), f"--vocab_size={PRESET_VOCAB[preset]}", *argv]
    cfg = configurator.configure(_DEFAULTS, argv)
    if min(cfg["warmup_steps"], cfg["data_batches"], cfg["decode_tokens"]) < 0 or min(cfg["steps"], cfg["rounds"]) < 1:
        fail("steps and rounds must be >= 1; warmup_steps, data_batches and decode_tokens >= 0")
    if not cfg["data_dir"] and cfg["vocab_size"] < 1:
        fail("with no data_dir, set vocab_size (or pick a model preset)")
    if sum(bool(cfg[k]) for k in ("sft", "dpo", "lora", "serve", "evals")) > 1:
        fail("sft, dpo, lora, serve and evals each pick what to measure: set one of them")
    return cfg


def train_config(b, data_dir, out_dir, stage="pretrain", **keys):
    """train.py's resolved config for a run with bench's shape and step settings."""
    keys = {**{k: b[k] for k in SHAPE_KEYS + STEP_KEYS + RECIPE_KEYS}, **keys}
    keys.update(data_dir=data_dir, out_dir=out_dir, stage=stage, verify_data=False)
    return train.configure([f"--{k}={v!r}" for k, v in keys.items()])


# -----------------------------------------------------------------------------
# inputs


def write_synthetic_data(out_dir, vocab, n_tokens, seed):
    """A prepared pretraining directory of random token ids, as train.py reads it (meta.json last)."""
    os.makedirs(out_dir, exist_ok=True)
    dtype = shards.token_dtype(vocab)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", n_tokens), ("val", max(n_tokens // 100, 4096))):
        writer = shards.ShardWriter(out_dir, split, dtype, shard_tokens=n)
        writer.add(rng.integers(1, vocab, n), np.ones(n, dtype=np.uint8))
        written = writer.close()
        splits[split] = {"tokens": writer.tokens, "documents": writer.documents, "targets": writer.targets,
                         "shards": written}
    shards.write_meta(out_dir, {"version": shards.FORMAT_VERSION, "stage": "pretrain", "dtype": dtype,
                                "vocab_size": vocab, "special_ids": {"<|endoftext|>": 0}, "tokenizer_sha256": None,
                                "tokenizer_source": "none: random token ids (bench.py)", "splits": splits})
    return out_dir


def write_synthetic_chats(out_dir, vocab, block_size, n_docs, seed):
    """A prepared SFT directory of random-token chats: lognormal lengths (sigma 1, mean block_size/3), the first
    third of each a prompt (not a target), the rest its reply."""
    rng = np.random.default_rng(seed)
    lengths = lognormal_lengths(rng, block_size / 3, n_docs)
    docs = [(n // 3, n - n // 3) for n in lengths]  # (prompt, reply) tokens
    return write_synthetic_docs(out_dir, "sft", vocab, docs, 1, rng)


def write_synthetic_pairs(out_dir, vocab, block_size, n_pairs, seed):
    """A prepared DPO directory of random-token pairs: a prompt and two replies, each lognormal (sigma 1, mean
    block_size/16); the chosen and the rejected document share the prompt."""
    rng = np.random.default_rng(seed)
    prompts, replies = (lognormal_lengths(rng, block_size / 16, n) for n in (n_pairs, 2 * n_pairs))
    docs = [(int(prompts[k // 2]), int(replies[k])) for k in range(2 * n_pairs)]
    return write_synthetic_docs(out_dir, "dpo", vocab, docs, 2, rng)


def lognormal_lengths(rng, mean, n, sigma=1.0):
    return np.maximum(rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, n).astype(np.int64), 4)


def write_synthetic_docs(out_dir, stage, vocab, docs, per_unit, rng):
    """A prepared `stage` directory of random-token documents, (prompt, reply) lengths each, `per_unit` documents a
    unit; a fiftieth of them (at least 8 units) again as the val split."""
    os.makedirs(out_dir, exist_ok=True)
    splits = {}
    for split, part in (("train", docs), ("val", docs[: per_unit * max(len(docs) // per_unit // 50, 8)])):
        writer = shards.ShardWriter(out_dir, split, shards.token_dtype(vocab), shard_tokens=1 << 30)
        lengths = [p + r for p, r in part]
        mask = np.concatenate([np.arange(p + r) >= p for p, r in part]).astype(np.uint8)
        writer.add_units(rng.integers(1, vocab, sum(lengths)), mask, lengths, [per_unit] * (len(part) // per_unit))
        written = writer.close()
        splits[split] = {"tokens": writer.tokens, "documents": writer.documents, "targets": writer.targets,
                         "shards": written}
    shards.write_meta(out_dir, {"version": shards.FORMAT_VERSION, "stage": stage, "dtype": shards.token_dtype(vocab),
                                "vocab_size": vocab, "special_ids": {"<|endoftext|>": 0}, "tokenizer_sha256": None,
                                "tokenizer_source": "none: random token ids (bench.py)", "splits": splits})
    return out_dir


def write_corpus(path, mb):
    """A jsonl of about `mb` MB: the demo corpus, repeated as often as needed."""
    with open(DEMO_CORPUS, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    target, written = int(mb * 1e6), 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            for line in lines:
                f.write(line)
                written += len(line.encode("utf-8"))
                if written >= target:
                    break
    return path


# -----------------------------------------------------------------------------
# the models


class AsOurs(torch.nn.Module):
    """An HF causal LM as train.py calls a model: token ids in, logits out, or with targets our per-position
    loss (model.token_cross_entropy), so that compiling this module compiles HF's model with the loss, as ours."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, idx, targets=None, segments=None, temperature=1.0):
        if segments is not None or temperature != 1.0:
            raise ValueError("the HF baseline runs unpacked rows, at temperature 1")
        logits = self.hf(input_ids=idx, use_cache=False).logits
        return logits if targets is None else token_cross_entropy(logits, targets)


def hf_model(raw, dev):
    """LlamaForCausalLM (sdpa attention) of raw's shape, holding a copy of raw's weights."""
    import transformers

    from llm_trainer.core.checkpoint import hf_config_dict

    config = transformers.LlamaConfig.from_dict(hf_config_dict(raw.mcfg, pad_id=0), attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(config)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(raw), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"HF baseline does not take our weights: missing {missing}, unexpected {unexpected}")
    if raw.mcfg.tie_embeddings:
        hf.tie_weights()
    return hf.to(dev).train()


def hf_run(run, hf, b):
    """A train.Run for train.train_step that trains `hf` instead of ours; everything else equal."""
    return dataclasses.replace(
        run, raw_model=hf, model=torch.compile(AsOurs(hf), mode=b["compile_mode"]) if b["compile"] else AsOurs(hf),
        optimizer=optimizers.build(hf, run.cfg), prefetched={},
        scaler=torch.amp.GradScaler(run.device.type, enabled=run.scaler.is_enabled()))


# -----------------------------------------------------------------------------
# measuring


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed_in_turns(runs, b):
    """warmup_steps untimed steps for each run, then `rounds` rounds in which each run takes `steps` timed steps
    in turn: {name: [time_steps(...) of each round]}."""
    for run in runs.values():
        for it in range(b["warmup_steps"]):
            train.train_step(run, it)
    out = {name: [] for name in runs}
    for r in range(b["rounds"]):
        for name, run in runs.items():
            out[name].append(time_steps(run, b["warmup_steps"] + r * b["steps"], b["steps"]))
    return out


def time_steps(run, first_it, n):
    """Seconds of each of n train.train_step calls, iterations first_it...; peak extra CUDA bytes; what each
    step returned."""
    dev, times, stats = run.device, [], []
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        resident = torch.cuda.memory_allocated(dev)
    for it in range(first_it, first_it + n):
        sync(dev)
        t0 = time.perf_counter()
        stats.append(train.train_step(run, it))
        sync(dev)
        times.append(time.perf_counter() - t0)
    extra = torch.cuda.max_memory_allocated(dev) - resident if dev.type == "cuda" else None
    return times, extra, stats


def resident_bytes(run):
    """Weights and optimizer state of a run's model: what stays allocated between steps."""
    tensors = list(run.raw_model.parameters())
    tensors += [t for state in run.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def step_figures(raw_model, block_size, tokens_per_step, step_seconds, peak):
    """tokens/s, step time and (given a peak in TFLOP/s) MFU of a median step time."""
    flops = raw_model.flops_per_token(block_size) * tokens_per_step
    return {"step_ms": 1000 * step_seconds, "tokens_per_s": tokens_per_step / step_seconds,
            "tflops": flops / step_seconds / 1e12, "mfu": flops / step_seconds / (peak * 1e12) if peak else None}


def measure_training(runs, b):
    """({name: figures}, tokens per step, (peak, its source), ours/HF paired by round or None) of the
    runs ({name: run}), timed in turns."""
    rounds = timed_in_turns(runs, b)
    times = {name: [t for ts, _, _ in rs for t in ts] for name, rs in rounds.items()}
    extra = {name: max(e or 0 for _, e, _ in rs) for name, rs in rounds.items()}
    ratios = [sum(h[0]) / sum(o[0]) for o, h in zip(rounds["ours"], rounds["hf"])] if "hf" in rounds else []
    ours = runs["ours"]
    cfg = ours.cfg
    tokens = stages.tokens_per_step(cfg)
    peak = peak_of(ours.device, b)
    out = {}
    for name, run in runs.items():
        fig = step_figures(ours.raw_model, cfg["block_size"], tokens, statistics.median(times[name]), peak[0])
        fig["step_ms_min"], fig["step_ms_max"] = 1000 * min(times[name]), 1000 * max(times[name])
        fig["peak_mem_mb"] = (resident_bytes(run) + extra[name]) / 2**20 if run.device.type == "cuda" else None
        out[name] = fig
    return out, tokens, peak, statistics.median(ratios) if ratios else None


def peak_of(dev, b):
    """(peak TFLOP/s or None, where it came from)."""
    if b["peak_tflops"] > 0:
        return b["peak_tflops"], "--peak_tflops"
    if dev.type != "cuda":
        return None, f"none on {dev.type} (give --peak_tflops to get an MFU)"
    name = torch.cuda.get_device_name(dev)
    tf = common.peak_tflops(name)
    return (tf, f"common.PEAK_TFLOPS['{name}']") if tf else (None, f"unknown GPU '{name}': give --peak_tflops")


def measure_data_loading(run, n):
    """Median seconds to build one micro-batch (train_batches.get) and put it on the device."""
    times = []
    for g in range(n):
        sync(run.device)
        t0 = time.perf_counter()
        run.train_batches.get(g).to(run.device)
        sync(run.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_prepare(mb, workdir):
    """prepare.py's main-pass MB/s (median of three runs; the tokenizer is trained once, not timed) and workers."""
    corpus = write_corpus(os.path.join(workdir, "corpus.jsonl"), mb)
    speeds, tokenizer = [], "train"
    for i in range(3):
        out = os.path.join(workdir, f"prepared{i}")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            meta = prepare.main([f"--input={corpus}", f"--out_dir={out}", f"--tokenizer={tokenizer}",
                                 "--vocab_size=4096", "--tokenizer_sample_bytes=1000000"])
        speeds.append(meta["timing"]["mb_per_s"])
        tokenizer = os.path.join(workdir, "prepared0")
    return statistics.median(speeds), meta["timing"]["workers"], meta["timing"]["input_mb"]


def measure_decode(raw, hf, n_new, run, repeats=5):
    """Greedy decode at batch 1 on the same weights and prompt, ours and HF taking turns:
    {name: (median tokens/s, tokens)}."""
    dev, vocab = run.device, raw.mcfg.vocab_size
    prompt = torch.randint(1, vocab, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()

    def ours():
        return list(raw.generate(prompt, n_new, temperature=0, max_len=PROMPT_TOKENS + n_new))

    def theirs():
        ids = torch.tensor([prompt], device=dev)
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                          do_sample=False, pad_token_id=0)
        return out[0, PROMPT_TOKENS:].tolist()

    fns = {"ours": ours} if hf is None else {"ours": ours, "hf": theirs}
    models = [m for m in (raw, hf) if m is not None]
    for m in models:
        m.eval()
    with run.autocast:
        tokens = {name: fn() for name, fn in fns.items()}  # also the warm-up
        times = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                sync(dev)
                t0 = time.perf_counter()
                fn()
                sync(dev)
                times[name].append(time.perf_counter() - t0)
    for m in models:
        m.train()
    return {name: (n_new / statistics.median(t), tokens[name]) for name, t in times.items()}


def max_logit_diff(run, hf):
    """Largest |ours - HF| logit on a validation batch: the baseline is the same function as ours."""
    batch = run.val_batches.get(0).to(run.device)
    with torch.no_grad(), run.autocast:
        theirs = hf(input_ids=batch.x, use_cache=False).logits
        return (run.raw_model(batch.x).float() - theirs.float()).abs().max().item()


# -----------------------------------------------------------------------------
# putting it together


FIGURE_KEYS = [
    "model.params", "model.flops_per_token", "train.tokens_per_step", "train.peak_tflops",
    *[f"train.{who}.{k}" for who in ("ours", "hf") for k in
      ("tokens_per_s", "step_ms", "step_ms_min", "step_ms_max", "tflops", "mfu", "peak_mem_mb")],
    "train.ours_over_hf", "train.ours_over_hf_paired", "train.hf_max_logit_diff",
    "data.load_ms_per_batch", "data.load_pct_of_step",
    "prepare.mb_per_s", "prepare.input_mb", "prepare.workers",
    "decode.ours.tokens_per_s", "decode.hf.tokens_per_s", "decode.ours_over_hf", "decode.same_tokens",
    "process.max_rss_mb",
]


def bench(b):
    """Every figure, by name (FIGURE_KEYS; None where not measured), and notes on how."""
    fig = dict.fromkeys(FIGURE_KEYS)
    notes = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        data = b["data_dir"]
        if not data:
            rows = b["batch_size"] * b["gradient_accumulation_steps"] * (b["warmup_steps"] + b["steps"] * b["rounds"])
            data = write_synthetic_data(os.path.join(tmp, "data"), b["vocab_size"],
                                        min(max(rows, 64) * (b["block_size"] + 1), 1 << 24), b["seed"])
        run = train.build(train_config(b, data, os.path.join(tmp, "out")))
        raw = run.raw_model
        fig["model.params"] = raw.num_params()
        fig["model.flops_per_token"] = raw.flops_per_token(b["block_size"])
        runs = {"ours": run}
        hf = None
        if b["compare_hf"]:
            hf = hf_model(raw, run.device)
            fig["train.hf_max_logit_diff"] = max_logit_diff(run, hf)
            runs["hf"] = hf_run(run, hf, b)
        train_figs, tokens, (peak, peak_source), fig["train.ours_over_hf_paired"] = measure_training(runs, b)
        notes["peak"] = peak_source
        fig["train.tokens_per_step"], fig["train.peak_tflops"] = tokens, peak
        for who, f in train_figs.items():
            for k, v in f.items():
                fig[f"train.{who}.{k}"] = v
        if hf is not None:
            fig["train.ours_over_hf"] = fig["train.ours.tokens_per_s"] / fig["train.hf.tokens_per_s"]
        if b["data_batches"]:
            load = measure_data_loading(run, b["data_batches"])
            fig["data.load_ms_per_batch"] = 1000 * load
            fig["data.load_pct_of_step"] = 100 * load * run.local_micro / (fig["train.ours.step_ms"] / 1000)
        if b["decode_tokens"]:
            n_new = min(b["decode_tokens"], b["block_size"] - PROMPT_TOKENS)
            dec = measure_decode(raw, hf, n_new, run)
            fig["decode.ours.tokens_per_s"] = dec["ours"][0]
            if hf is not None:
                fig["decode.hf.tokens_per_s"] = dec["hf"][0]
                fig["decode.ours_over_hf"] = dec["ours"][0] / dec["hf"][0]
                fig["decode.same_tokens"] = dec["ours"][1] == dec["hf"][1]
            notes["decode"] = f"batch 1, greedy, {PROMPT_TOKENS}-token prompt, {n_new} new tokens, not compiled"
        if b["prepare_mb"]:
            speed, workers, mb = measure_prepare(b["prepare_mb"], tmp)
            fig.update({"prepare.mb_per_s": speed, "prepare.workers": workers, "prepare.input_mb": mb})
        fig["process.max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        device = describe_device(run.device)
        notes["dtype"] = common.dtype_name(run.ptdtype)
    return fig, notes, device


def row_keys(stage):
    """The figures of sft=True (stage sft) or dpo=True (stage dpo)."""
    return ["model.params", f"{stage}.documents", f"{stage}.mean_length", f"{stage}.truncated", f"{stage}.tokens_per_step",
            *[f"{stage}.{how}.{k}" for how in ("packed", "padded") for k in ("target_tokens_per_s", "fill", "step_ms")],
            f"{stage}.packed_over_padded", f"{stage}.packed_over_padded_paired", "process.max_rss_mb"]


SFT_KEYS, DPO_KEYS = row_keys("sft"), row_keys("dpo")
SYNTHETIC = {"sft": (write_synthetic_chats, "synthetic chats, lognormal lengths (sigma 1) with mean block_size/3"),
             "dpo": (write_synthetic_pairs, "synthetic pairs: prompt and replies lognormal (sigma 1) with mean "
                                            "block_size/16 each")}


def bench_rows(b):
    """row_keys: target tokens/s of packed and padded rows (of SFT chats or DPO pairs), the same step timed in
    turns."""
    stage = "dpo" if b["dpo"] else "sft"
    fig, notes = dict.fromkeys(row_keys(stage)), {"stage": stage}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        write, synthetic = SYNTHETIC[stage]
        data = b["data_dir"] or write(os.path.join(tmp, "data"), b["vocab_size"], b["block_size"], b["sft_docs"],
                                      b["seed"])
        runs = {how: train.build(train_config(b, data, os.path.join(tmp, how), stage=stage, pack=how == "packed"))
                for how in ("packed", "padded")}
        batches = runs["padded"].train_batches
        fig.update({"model.params": runs["packed"].raw_model.num_params(),
                    f"{stage}.documents": batches.split.num_docs,
                    f"{stage}.mean_length": float((batches.split.doc_ends - batches.split.doc_starts).mean()),
                    f"{stage}.truncated": batches.truncated,
                    f"{stage}.tokens_per_step": stages.tokens_per_step(runs["packed"].cfg)})
        rounds = timed_in_turns(runs, b)

        def rate(rs):  # target tokens per second over the steps of these rounds
            return sum(s["target_tokens"] for _, _, stats in rs for s in stats) / sum(sum(t) for t, _, _ in rs)

        for how, rs in rounds.items():
            fig[f"{stage}.{how}.target_tokens_per_s"] = rate(rs)
            fig[f"{stage}.{how}.fill"] = statistics.mean(s["fill"] for _, _, stats in rs for s in stats)
            fig[f"{stage}.{how}.step_ms"] = 1000 * statistics.median(t for ts, _, _ in rs for t in ts)
        ratios = [rate([p]) / rate([q]) for p, q in zip(rounds["packed"], rounds["padded"])]
        fig[f"{stage}.packed_over_padded"] = (fig[f"{stage}.packed.target_tokens_per_s"]
                                              / fig[f"{stage}.padded.target_tokens_per_s"])
        fig[f"{stage}.packed_over_padded_paired"] = statistics.median(ratios)
        fig["process.max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        notes["dtype"] = common.dtype_name(runs["packed"].ptdtype)
        notes["data"] = b["data_dir"] or synthetic
        device = describe_device(runs["packed"].device)
    return fig, notes, device


def report_rows(b, fig, notes, device):
    stage = notes["stage"]
    rows = (f"{b['batch_size']} rows x {b['block_size']}" if stage == "sft" else
            f"{b['batch_size']} rows of whole pairs x {2 * (b['block_size'] + 1)} packed, {b['batch_size']} pairs x 2 "
            f"rows x {b['block_size']} padded")
    lines = [f"bench {stage}: {b['model'] or 'custom'} shape, {fig['model.params'] / 1e6:.2f}M parameters, {device}, "
             f"{notes['dtype']}, compile={b['compile']}, {rows} x {b['gradient_accumulation_steps']} micro-steps per "
             "step",
             f"data: {notes['data']}: {fig[f'{stage}.documents']:,} documents, mean "
             f"{fig[f'{stage}.mean_length']:.1f} tokens, {fig[f'{stage}.truncated']:,} longer than block_size+1 (cut)",
             f"{'':26}{'packed':>12}{'padded':>12}"]
    for label, key, spec in (("target tokens/s", "target_tokens_per_s", ",.0f"), ("fill", "fill", ".1%"),
                             ("step time, median (ms)", "step_ms", ",.1f")):
        lines.append(f"{label:26}{format(fig[f'{stage}.packed.{key}'], spec):>12}"
                     f"{format(fig[f'{stage}.padded.{key}'], spec):>12}")
    lines.append(f"packed/padded target tokens/s: {fig[f'{stage}.packed_over_padded']:.2f}x "
                 f"(paired by round: {fig[f'{stage}.packed_over_padded_paired']:.2f}x)")
    lines.append(f"process max RSS {fig['process.max_rss_mb']:,.0f} MB; torch {torch.__version__}")
    return "\n".join(lines)


def bench_serve(b):
    """Per number of concurrent clients: aggregate completion tokens/s and time to first token, p50 and p95."""
    import httpx
    import openai
    import serve

    if not b["serve_run"]:
        fail("serve=True needs serve_run: a run or HF directory to serve")
    port = serve_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--out_dir={b['serve_run']}",
                             f"--port={port}", f"--device={b['device']}", f"--max_tokens={b['serve_max_tokens']}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url, fig = f"http://127.0.0.1:{port}", {}
    try:
        wait_until_up(url, proc)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        messages = [{"role": "user", "content": "Who are you?"}]

        def one(out, i):
            t0, first, tokens = time.perf_counter(), None, 0
            for chunk in client.chat.completions.create(model="m", messages=messages, stream=True, temperature=0.8,
                                                         max_tokens=b["serve_max_tokens"], seed=i,
                                                         stream_options={"include_usage": True}):
                if chunk.choices and first is None and (chunk.choices[0].delta.content or
                                                        getattr(chunk.choices[0].delta, "reasoning_content", None)):
                    first = time.perf_counter() - t0
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            out[i] = (first if first is not None else time.perf_counter() - t0, tokens)

        one({}, 0)  # warm-up
        for n in b["serve_clients"]:
            ttfts, tokens, seconds = [], 0, 0.0
            for _ in range(b["rounds"]):
                out, t0 = {}, time.perf_counter()
                threads = [threading.Thread(target=one, args=(out, i)) for i in range(n)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                seconds += time.perf_counter() - t0
                ttfts += [v[0] for v in out.values()]
                tokens += sum(v[1] for v in out.values())
            ttfts.sort()
            fig.update({f"serve.{n}.tokens_per_s": tokens / seconds, f"serve.{n}.requests": len(ttfts),
                        f"serve.{n}.ttft_p50_ms": 1000 * ttfts[len(ttfts) // 2],
                        f"serve.{n}.ttft_p95_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))]})
        health = httpx.get(url + "/health").json()
        if b["serve_load_clients"]:
            fig.update(bench_serve_load(b, url, proc.pid))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    fig["process.max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    notes = {"dtype": "auto", "server": f"serve.py {b['serve_run']} ({health['model']}), queued: one generation at a time",
             "queue": serve.queue_size}
    return fig, notes, describe_device(torch.device("cpu") if b["device"] in ("auto", "cpu") else torch.device(b["device"]))


LOAD_INVALID = [b'{"messages": [', b'{"messages": [{"role": "user", "content": "hi"}], "stream": "true"}',
                b'{"messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}',
                b'{"messages": [{"role": "user", "content": "hi"}], "stop": ""}', None]  # None: 16 MB, chunked
LOAD_PROMPTS = ["Who are you?", "你好，你是谁？", "What is 2 + 3?", "Tell me about the sea."]


def peak_rss_mb(pid):
    """A process's peak resident memory (Linux /proc), None elsewhere."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except OSError:
        return None


def bench_serve_load(b, url, pid):
    """serve_load_clients clients at once, client i streaming when i // 4 is even: it leaves mid-request (i % 4 == 0:
    streamed ones after their first piece, the others after 0.25 s), sends an invalid body (i % 4 == 1: bad JSON, bad
    values, a 16 MB chunked body) or asks for a greedy reply that must equal the one the same request gets alone.
    The server's counters (GET /health, before and after) say how many requests were accepted for generation (the
    invalid ones must cost none), cancelled or skipped, and the most milliseconds a generation ran after its client
    left; its peak memory (/proc) must stay flat under the oversized bodies."""
    import httpx
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def request(i, **kw):
        return dict(model="m", messages=[{"role": "user", "content": LOAD_PROMPTS[i % len(LOAD_PROMPTS)]}],
                    temperature=0, max_tokens=b["serve_max_tokens"], **kw)

    def reply(i, stream):
        if not stream:
            return client.chat.completions.create(**request(i)).choices[0].message.content
        chunks = client.chat.completions.create(**request(i, stream=True))
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    def leave(i, stream):
        if stream:
            with client.chat.completions.create(**request(i, stream=True, n=2)) as chunks:
                next(c for c in chunks if c.choices and c.choices[0].delta.content)
            return "left"
        try:
            httpx.post(url + "/v1/chat/completions", json=request(i, n=2), timeout=0.25)
            return "done before leaving"
        except httpx.TimeoutException:
            return "left"

    def invalid(i):
        body = LOAD_INVALID[(i // 4) % len(LOAD_INVALID)]
        body = body if body is not None else (b"x" * 1_000_000 for _ in range(16))
        return httpx.post(url + "/v1/chat/completions", content=body, timeout=60).status_code

    def one(out, i):
        kind, stream = ("leave", "invalid", "valid", "valid")[i % 4], (i // 4) % 2 == 0
        out[i] = (kind, leave(i, stream) if kind == "leave" else invalid(i) if kind == "invalid" else
                  reply(i, stream) == alone[i % len(LOAD_PROMPTS)])

    alone = [reply(i, False) for i in range(len(LOAD_PROMPTS))]
    before, rss_before = httpx.get(url + "/health").json()["generation"], peak_rss_mb(pid)
    out, t0 = {}, time.perf_counter()
    threads = [threading.Thread(target=one, args=(out, i)) for i in range(b["serve_load_clients"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    while (h := httpx.get(url + "/health").json())["busy"] or h["waiting"]:  # what is left: skipped requests
        time.sleep(0.01)
    idle_after = time.perf_counter() - t0 - seconds
    after = h["generation"]
    kinds = [k for k, _ in out.values()]
    valid, left = kinds.count("valid"), [r for k, r in out.values() if k == "leave"]
    return {"load.clients": len(out), "load.seconds": seconds, "load.valid": valid,
            "load.valid_same_as_alone": sum(r is True for k, r in out.values() if k == "valid"),
            "load.invalid": kinds.count("invalid"),
            "load.invalid_4xx": sum(400 <= r < 500 for k, r in out.values() if k == "invalid"),
            "load.left": left.count("left"), "load.done_before_leaving": left.count("done before leaving"),
            "load.accepted": after["accepted"] - before["accepted"],
            "load.accepted_invalid": after["accepted"] - before["accepted"] - valid - len(left),
            "load.cancelled": after["cancelled"] - before["cancelled"],
            "load.skipped": after["skipped"] - before["skipped"], "load.max_cancel_lag_ms": after["max_cancel_lag_ms"],
            "load.idle_after_s": idle_after, "load.server_peak_rss_mb_before": rss_before,
            "load.server_peak_rss_mb_after": peak_rss_mb(pid)}


def serve_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url, proc, seconds=120):
    import httpx

    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    fail(f"serve.py did not come up at {url} (exit status {proc.poll()})")


def report_serve(b, fig, notes, device):
    lines = [f"bench serve: {notes['server']}, {device}, {b['serve_max_tokens']} tokens per reply at most, "
             f"{b['rounds']} rounds", f"{'clients':>8}{'requests':>10}{'tokens/s':>12}{'TTFT p50 ms':>14}{'p95 ms':>10}"]
    for n in b["serve_clients"]:
        lines.append(f"{n:>8}{fig[f'serve.{n}.requests']:>10}{fig[f'serve.{n}.tokens_per_s']:>12,.1f}"
                     f"{fig[f'serve.{n}.ttft_p50_ms']:>14,.0f}{fig[f'serve.{n}.ttft_p95_ms']:>10,.0f}")
    if "load.clients" in fig:
        f = fig
        lines += [f"load: {f['load.clients']} clients at once, {f['load.seconds']:.1f} s",
                  f"  valid: {f['load.valid_same_as_alone']} of {f['load.valid']} got the text they get alone",
                  f"  invalid: {f['load.invalid_4xx']} of {f['load.invalid']} got a 4xx; requests they queued for "
                  f"generation: {f['load.accepted_invalid']}",
                  f"  leaving: {f['load.left']} left mid-request ({f['load.done_before_leaving']} done before): "
                  f"{f['load.cancelled']} generations cancelled, {f['load.skipped']} skipped in the queue; the most a "
                  f"generation ran after its client left: {f['load.max_cancel_lag_ms']:.1f} ms; idle "
                  f"{f['load.idle_after_s']:.2f} s after the last client",
                  f"  server peak RSS: {num(f['load.server_peak_rss_mb_before'], ',.0f')} MB before, "
                  f"{num(f['load.server_peak_rss_mb_after'], ',.0f')} MB after"]
    return "\n".join(lines)


LORA_KEYS = ["model.params", *[f"lora.{how}.{k}" for how in ("full", "lora") for k in (
    "trainable_params", "tokens_per_s", "step_ms", "weights_mb", "grads_mb", "optimizer_mb", "state_mb", "peak_mem_mb")],
    "lora.state_ratio", "lora.tokens_per_s_ratio", "process.max_rss_mb"]


def bench_lora(b):
    """LORA_KEYS: full fine-tuning and LoRA of the same model on the same SFT batches, timed in turns."""
    from llm_trainer.core import checkpoint
    from model import Transformer

    fig, notes = dict.fromkeys(LORA_KEYS), {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        data = write_synthetic_chats(os.path.join(tmp, "data"), b["vocab_size"], b["block_size"], 400, b["seed"])
        base_dir = os.path.join(tmp, "base")  # the model both start from: random weights, saved as a run
        os.makedirs(base_dir)
        base = Transformer(checkpoint.model_config(train_config(b, data, base_dir, stage="sft"),
                                                         {"vocab_size": b["vocab_size"]}, None))
        checkpoint.save_checkpoint(base_dir, {"model": base.state_dict(), "model_config": base.mcfg.to_dict()})
        fig["model.params"] = base.num_params()
        del base
        runs = {how: train.build(train_config(b, data, os.path.join(tmp, how), stage="sft", init_from=base_dir,
                                              lora_rank=b["lora_rank"] if how == "lora" else 0,
                                              optimizer="adamw"))  # fine-tuning, as the sft configs: AdamW
                for how in b["lora_runs"]}
        rounds = timed_in_turns(runs, b)
        for how, run in runs.items():
            params = list(run.raw_model.parameters())
            trainable = [p for p in params if p.requires_grad]
            weights = sum(p.numel() * p.element_size() for p in params)
            grads = sum(p.numel() * p.element_size() for p in trainable)  # what backward allocates
            optimizer = resident_bytes(run) - weights
            times = [t for ts, _, _ in rounds[how] for t in ts]
            extra = max(e or 0 for _, e, _ in rounds[how])
            fig.update({f"lora.{how}.trainable_params": sum(p.numel() for p in trainable),
                        f"lora.{how}.step_ms": 1000 * statistics.median(times),
                        f"lora.{how}.tokens_per_s": stages.tokens_per_step(run.cfg) / statistics.median(times),
                        f"lora.{how}.weights_mb": weights / 2**20, f"lora.{how}.grads_mb": grads / 2**20,
                        f"lora.{how}.optimizer_mb": optimizer / 2**20,
                        f"lora.{how}.state_mb": (weights + grads + optimizer) / 2**20,
                        f"lora.{how}.peak_mem_mb": (resident_bytes(run) + extra) / 2**20
                        if run.device.type == "cuda" else None})
        if len(runs) == 2:
            fig["lora.state_ratio"] = fig["lora.lora.state_mb"] / fig["lora.full.state_mb"]
            fig["lora.tokens_per_s_ratio"] = fig["lora.lora.tokens_per_s"] / fig["lora.full.tokens_per_s"]
        fig["process.max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        any_run = next(iter(runs.values()))
        notes["dtype"] = common.dtype_name(any_run.ptdtype)
        device = describe_device(any_run.device)
    return fig, notes, device


def report_lora(b, fig, notes, device):
    runs = b["lora_runs"]
    lines = [f"bench lora: {b['model'] or 'custom'} shape, {fig['model.params'] / 1e6:.1f}M parameters, {device}, "
             f"{notes['dtype']}, rank {b['lora_rank']} on every projection, {b['batch_size']} rows x "
             f"{b['block_size']} x {b['gradient_accumulation_steps']} micro-steps", f"{'':30}" + "".join(
                 f"{how:>14}" for how in runs)]
    for label, key, spec in (("trainable parameters", "trainable_params", ",.0f"), ("tokens/s", "tokens_per_s", ",.0f"),
                             ("step time, median (ms)", "step_ms", ",.0f"), ("weights (MB)", "weights_mb", ",.1f"),
                             ("gradients (MB)", "grads_mb", ",.1f"), ("AdamW state (MB)", "optimizer_mb", ",.1f"),
                             ("weights+grads+state (MB)", "state_mb", ",.1f"), ("CUDA peak (MB)", "peak_mem_mb", ",.0f")):
        values = [fig[f"lora.{how}.{key}"] for how in runs]
        lines.append(f"{label:30}" + "".join(f"{'-' if v is None else format(v, spec):>14}" for v in values))
    if fig["lora.state_ratio"] is not None:
        lines.append(f"LoRA/full: weights+gradients+optimizer state {fig['lora.state_ratio']:.1%}, tokens/s "
                     f"{fig['lora.tokens_per_s_ratio']:.2f}x")
    lines.append(f"process max RSS {fig['process.max_rss_mb']:,.0f} MB (runs in this process: {', '.join(runs)})")
    return "\n".join(lines)


KD_RUNS = ("sft", "kd", "kd_unchunked")
KD_KEYS = ["model.params", "kd.teacher_params", "kd.target_tokens_per_step", *[f"kd.{how}.{k}" for how in KD_RUNS
                                                                             for k in ("step_ms", "peak_mem_mb")],
           "kd.kd_over_sft", "kd.kd_unchunked_over_sft", "process.max_rss_mb"]


def bench_kd(b):
    """KD_KEYS: the same student's SFT step plain, distilled with its logits kd_chunk positions at a time, and
    distilled unchunked, on the same batches, timed in turns."""
    from llm_trainer.core import checkpoint
    from model import Transformer

    if not set(b["kd_runs"]) <= set(KD_RUNS) or not b["kd_runs"]:
        fail(f"kd_runs must be some of {', '.join(KD_RUNS)}, got {b['kd_runs']}")
    fig, notes = dict.fromkeys(KD_KEYS), {}
    shape = {k: b[k] for k in SHAPE_KEYS}
    if b["kd_teacher"]:
        shape.update({k: v for k, v in configure([f"--model={b['kd_teacher']}"]).items() if k in SHAPE_KEYS},
                     vocab_size=b["vocab_size"])
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        data = write_synthetic_chats(os.path.join(tmp, "data"), b["vocab_size"], b["block_size"], 400, b["seed"])
        teacher_dir = os.path.join(tmp, "teacher")  # random weights of the teacher's shape, saved as a run
        os.makedirs(teacher_dir)
        teacher = Transformer(checkpoint.model_config(train_config(b, data, teacher_dir, stage="sft", **shape),
                                                      {"vocab_size": b["vocab_size"]}, None))
        checkpoint.save_checkpoint(teacher_dir, {"model": teacher.state_dict(), "model_config": teacher.mcfg.to_dict()})
        fig["kd.teacher_params"] = teacher.num_params()
        teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
        del teacher
        runs = {how: train.build(train_config(b, data, os.path.join(tmp, how), stage="sft", optimizer="adamw", **(
            {} if how == "sft" else {"teacher": teacher_dir, "kd_chunk": b["kd_chunk"] if how == "kd" else 0})))
                for how in b["kd_runs"]}  # fine-tuning, as the sft configs: AdamW
        any_run = next(iter(runs.values()))
        fig["model.params"] = any_run.raw_model.num_params()
        rounds = timed_in_turns(runs, b)
        for how, run in runs.items():
            extra = max(e or 0 for _, e, _ in rounds[how])
            fig[f"kd.{how}.step_ms"] = 1000 * statistics.median(t for ts, _, _ in rounds[how] for t in ts)
            fig[f"kd.{how}.peak_mem_mb"] = ((resident_bytes(run) + extra + (teacher_bytes if how != "sft" else 0))
                                            / 2**20 if run.device.type == "cuda" else None)
        fig["kd.target_tokens_per_step"] = statistics.mean(
            s["target_tokens"] for rs in rounds.values() for _, _, stats in rs for s in stats)
        for how in ("kd", "kd_unchunked"):
            if how in runs and "sft" in runs:
                fig[f"kd.{how}_over_sft"] = fig[f"kd.{how}.step_ms"] / fig["kd.sft.step_ms"]
        fig["process.max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        notes["dtype"] = common.dtype_name(any_run.ptdtype)
        device = describe_device(any_run.device)
    return fig, notes, device


def report_kd(b, fig, notes, device):
    runs = b["kd_runs"]
    lines = [f"bench kd: {b['model'] or 'custom'} shape, {fig['model.params'] / 1e6:.2f}M parameters, teacher "
             f"{fig['kd.teacher_params'] / 1e6:.2f}M, {device}, {notes['dtype']}, compile={b['compile']}, "
             f"{b['batch_size']} rows x {b['block_size']} x {b['gradient_accumulation_steps']} micro-steps, "
             f"{fig['kd.target_tokens_per_step']:,.0f} target tokens per step, kd_chunk {b['kd_chunk']}",
             f"{'':26}" + "".join(f"{how:>14}" for how in runs)]
    for label, key, spec in (("step time, median (ms)", "step_ms", ",.1f"), ("CUDA peak (MB)", "peak_mem_mb", ",.0f")):
        lines.append(f"{label:26}" + "".join(f"{num(fig[f'kd.{how}.{key}'], spec):>14}" for how in runs))
    ratios = [f"{how} {fig[f'kd.{how}_over_sft']:.2f}x" for how in ("kd", "kd_unchunked")
              if fig[f"kd.{how}_over_sft"] is not None]
    if ratios:
        lines.append("step time over plain SFT: " + ", ".join(ratios))
    lines.append(f"process max RSS {fig['process.max_rss_mb']:,.0f} MB (runs in this process: {', '.join(runs)})")
    return "\n".join(lines)


EVAL_KEYS = ["model.params", "eval.items", *[f"eval.{who}.{k}" for who in ("ours", "hf") for k in (
    "items_per_s", "best_batch_size", "model_share", "model_items_per_s")], "eval.ours_over_hf", "eval.model_ours_over_hf",
    "eval.same_acc", "process.max_rss_mb"]


def write_cloze_task(tmp, n_items, seed):
    """A HellaSwag-like multiple-choice task as a local lm_eval YAML: a passage of the demo corpus, its own next
    words and three other passages' as the endings. Returns the folder to include."""
    import random

    rng = random.Random(seed)
    with open(DEMO_CORPUS, encoding="utf-8") as f:
        texts = [t for t in (json_lib.loads(line)["text"] for line in f) if len(t) >= 280][: 4 * n_items]
    items = []
    for i in range(n_items):  # characters, not words: the corpus is English and Chinese
        text = texts[i % len(texts)]
        endings = [text[200:280]] + [rng.choice(texts)[200:280] for _ in range(3)]
        order = rng.sample(range(4), 4)
        items.append({"context": text[:200], "choices": [endings[j] for j in order], "gold": order.index(0)})
    folder = os.path.join(tmp, "tasks")
    os.makedirs(folder)
    with open(os.path.join(folder, "cloze.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json_lib.dumps(item, ensure_ascii=False) + "\n" for item in items)
    with open(os.path.join(folder, "bench_cloze.yaml"), "w", encoding="utf-8") as f:
        f.write(f"task: bench_cloze\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder}/cloze.jsonl\n"
                "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
                "doc_to_choice: choices\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return folder


def eval_model(b, tmp):
    """(run directory, its export, parameters): the preset's shape with random weights, a tokenizer of its
    vocabulary."""
    import export
    from llm_trainer.core.checkpoint import save_checkpoint
    from model import ModelConfig, Transformer
    from llm_trainer.data.tokenizer import train_tokenizer

    with open(DEMO_CORPUS, encoding="utf-8") as f:
        tok = train_tokenizer([json_lib.loads(line)["text"] for line in itertools.islice(f, 4000)], b["vocab_size"])
    shape = {k: b[k] for k in SHAPE_KEYS if k != "vocab_size"}
    shape["n_kv_heads"], shape["ffn_dim"] = shape["n_kv_heads"] or None, shape["ffn_dim"] or None
    cfg = ModelConfig(vocab_size=tok.vocab_size, max_seq_len=b["block_size"], **shape)
    torch.manual_seed(b["seed"])  # the same random weights every run: near-tied choices flip the same way
    run, model = os.path.join(tmp, "run"), Transformer(cfg)
    os.makedirs(run)
    save_checkpoint(run, {"model": model.state_dict(), "model_config": cfg.to_dict(), "stage": "pretrain", "iter": 0,
                          "config": {"block_size": b["block_size"], "stage": "pretrain"}})
    tok.save(run)
    export.export(run, os.path.join(tmp, "hf"))
    return run, os.path.join(tmp, "hf"), model.num_params()


def bench_evals(b):
    """EVAL_KEYS: the same task through eval.py's model and lm_eval's hf backend, timed in turns."""
    import eval as evalpy
    from lm_eval.models.huggingface import HFLM

    fig, notes = dict.fromkeys(EVAL_KEYS), {}
    dev = common.resolve_device(b["device"])
    dtype = common.dtype_name(common.resolve_dtype(b["dtype"], dev))
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        run, hf_dir, fig["model.params"] = eval_model(b, tmp)
        manager = evalpy.task_manager(write_cloze_task(tmp, b["eval_items"], b["seed"]), ["bench_cloze"])
        make = {"ours": lambda n: evalpy.load_lm(run, n, str(dev), dtype)[0],
                "hf": lambda n: HFLM(pretrained=hf_dir, device=str(dev), batch_size=n, dtype=dtype)}
        seconds = {(who, n): [] for who in make for n in b["eval_batch_sizes"]}
        in_model, acc = {k: [] for k in seconds}, {}
        evalpy.load_tasks(["bench_cloze"], manager)  # builds the data set's cache untimed, not in the first timed call
        for _ in range(b["rounds"]):
            for (who, n), times in seconds.items():
                lm = make[who](n)
                model_s = wrap_timed(lm, "loglikelihood")
                t0 = time.perf_counter()
                res = evalpy.run_tasks(lm, evalpy.load_tasks(["bench_cloze"], manager), manager)
                times.append(time.perf_counter() - t0)
                in_model[(who, n)].append(model_s[0])
                acc[(who, n)] = res["results"]["bench_cloze"]["acc,none"]
        fig["eval.items"] = b["eval_items"]
        for who in make:
            best = min(b["eval_batch_sizes"], key=lambda n: statistics.median(seconds[(who, n)]))
            wall = statistics.median(seconds[(who, best)])
            fig[f"eval.{who}.items_per_s"], fig[f"eval.{who}.best_batch_size"] = b["eval_items"] / wall, best
            fig[f"eval.{who}.model_share"] = statistics.median(in_model[(who, best)]) / wall
            fig[f"eval.{who}.model_items_per_s"] = b["eval_items"] / min(statistics.median(in_model[(who, n)])
                                                                           for n in b["eval_batch_sizes"])
            notes[who] = {str(n): b["eval_items"] / statistics.median(seconds[(who, n)]) for n in b["eval_batch_sizes"]}
        fig["eval.ours_over_hf"] = fig["eval.ours.items_per_s"] / fig["eval.hf.items_per_s"]
        # the spread: HF's time over ours in each round, each at its best batch size (the sides ran minutes apart
        # at most, under the same load)
        notes["paired"] = [hf / ours for hf, ours in zip(seconds[("hf", fig["eval.hf.best_batch_size"])],
                                                         seconds[("ours", fig["eval.ours.best_batch_size"])])]
        fig["eval.model_ours_over_hf"] = fig["eval.ours.model_items_per_s"] / fig["eval.hf.model_items_per_s"]
        fig["eval.same_acc"] = len(set(acc.values())) == 1
    fig["process.max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    notes["dtype"] = dtype
    return fig, notes, describe_device(dev)


def wrap_timed(lm, method):
    """Count the seconds spent in lm.<method> from now on: returns a one-element list that holds them."""
    spent, inner = [0.0], getattr(lm, method)

    def timed_call(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0

    setattr(lm, method, timed_call)
    return spent


def report_evals(b, fig, notes, device):
    lines = [f"bench evals: {b['model'] or 'custom'} shape, {fig['model.params'] / 1e6:.2f}M parameters, {device}, "
             f"{notes['dtype']}; {fig['eval.items']} items of a 4-choice cloze task, {b['rounds']} rounds",
             f"{'batch size':>12}{'ours items/s':>16}{'HF items/s':>14}"]
    for n in b["eval_batch_sizes"]:
        lines.append(f"{n:>12}{notes['ours'][str(n)]:>16,.1f}{notes['hf'][str(n)]:>14,.1f}")
    lines.extend([f"best: ours {fig['eval.ours.items_per_s']:,.1f} items/s (batch {fig['eval.ours.best_batch_size']}, "
                 f"{fig['eval.ours.model_share']:.0%} of it in the model), HF {fig['eval.hf.items_per_s']:,.1f} "
                 f"(batch {fig['eval.hf.best_batch_size']}, {fig['eval.hf.model_share']:.0%}): "
                 f"ours/HF {fig['eval.ours_over_hf']:.2f}x (per round: "
                 f"{', '.join(f'{r:.2f}x' for r in notes['paired'])}); the same acc everywhere: {fig['eval.same_acc']}",
                 f"the model's calls alone (lm.loglikelihood), at the best batch size of each: ours "
                 f"{fig['eval.ours.model_items_per_s']:,.1f} items/s, HF {fig['eval.hf.model_items_per_s']:,.1f}: "
                 f"ours/HF {fig['eval.model_ours_over_hf']:.2f}x (the rest is lm_eval's own work, the same for both)"])
    return "\n".join(lines)


def quality_runs(b):
    """[(recipe name, learning rate swept or None, train.py keys, seed)] of every run the sweep needs."""
    (base_name, base_keys), *others = b["recipes"].items()
    runs = [(base_name, lr, {**b["train_keys"], **base_keys, "learning_rate": lr}, seed)
            for lr in b["baseline_lrs"] for seed in b["seeds"]]
    runs += [(name, None, {**b["train_keys"], **keys}, seed) for name, keys in others for seed in b["seeds"]]
    for _, _, keys, _ in runs:
        keys.setdefault("min_lr", keys.get("learning_rate", train._DEFAULTS["learning_rate"]) / 10)
    return runs


def quality_run(b, data, keys, seed, tmp):
    """One run: {"tokens", "seconds", "val_bpb"} at each evaluation (seconds: of training steps only), the median
    step and optimizer-step times (ms), the optimizer's groups."""
    recipe = {**{k: train._DEFAULTS[k] for k in RECIPE_KEYS}, **keys}  # stated in full: not the preset's recipe
    run = train.build(train_config(b, data, os.path.join(tmp, "run"), seed=seed, max_iters=b["quality_iters"],
                                   eval_interval=b["quality_eval_interval"], eval_iters=b["quality_eval_iters"],
                                   overwrite=True, **recipe))
    tokens_per_step = stages.tokens_per_step(run.cfg)
    curve, seconds, steps = {"tokens": [], "seconds": [], "val_bpb": []}, 0.0, []
    for it in range(b["quality_iters"] + 1):
        if it % b["quality_eval_interval"] == 0 or it == b["quality_iters"]:
            for k, v in (("tokens", it * tokens_per_step), ("seconds", seconds),
                         ("val_bpb", train.evaluate(run)["val_bpb"])):
                curve[k].append(v)
        if it == b["quality_iters"]:
            break
        (dt,), _, _ = time_steps(run, it, 1)
        seconds += dt
        steps.append(dt)
    return {**curve, "step_ms": 1000 * statistics.median(steps), "optimizer_ms": optimizer_step_ms(run),
            "groups": run.optimizer.specs, "params": run.raw_model.num_params(), "tokens_per_step": tokens_per_step,
            "device": describe_device(run.device), "dtype": common.dtype_name(run.ptdtype)}


def optimizer_step_ms(run, n=5):
    """Median ms of the optimizer's step alone on random gradients (the weights are discarded after)."""
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    times = []
    for _ in range(n + 1):
        for p in params:
            p.grad = torch.randn_like(p)
        sync(run.device)
        t0 = time.perf_counter()
        run.optimizer.step()
        sync(run.device)
        times.append(time.perf_counter() - t0)
    run.optimizer.zero_grad(set_to_none=True)
    return 1000 * statistics.median(times[1:])


def quality_key(b, data, keys, seed):
    """What decides a run's curve: the shape, the step settings, the data's content, its keys and seed."""
    import hashlib

    meta = shards.load_meta(data)
    what = {**{k: b[k] for k in SHAPE_KEYS + STEP_KEYS}, "data": meta["splits"], "keys": keys, "seed": seed,
            **{k: b[k] for k in ("quality_iters", "quality_eval_interval", "quality_eval_iters")}}
    return hashlib.sha256(json_lib.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reach(curve, target, axis):
    """The tokens (or seconds) at which a curve's val bpb first reaches target, linear between evaluations; None
    if it never does."""
    xs, ys = curve[axis], curve["val_bpb"]
    for i, y in enumerate(ys):
        if y <= target:
            if i == 0:
                return xs[0]
            return xs[i - 1] + (xs[i] - xs[i - 1]) * (ys[i - 1] - target) / (ys[i - 1] - y)
    return None


def bench_quality(b):
    """Every run of the sweep (from quality_dir where done before), then each recipe against the tuned baseline."""
    if not b["data_dir"] or not os.path.isfile(os.path.join(b["data_dir"], "tokenizer.json")):
        fail("quality=True needs data_dir: a prepared pretraining directory with its tokenizer (val bpb is per byte)")
    if len(b["baseline_lrs"]) < 1 or not b["recipes"] or not b["seeds"]:
        fail("quality=True needs recipes (the first is the baseline), baseline_lrs and seeds")
    os.makedirs(b["quality_dir"], exist_ok=True)
    done, new = {}, 0
    for name, lr, keys, seed in quality_runs(b):
        path = os.path.join(b["quality_dir"], f"{name}_{quality_key(b, b['data_dir'], keys, seed)}.json")
        if not os.path.exists(path):
            if b["quality_max_runs"] and new >= b["quality_max_runs"]:
                continue
            with tempfile.TemporaryDirectory(prefix="bench-") as tmp, contextlib.redirect_stdout(io.StringIO()):
                record = {"recipe": name, "lr": lr, "keys": keys, "seed": seed,
                          **quality_run(b, b["data_dir"], keys, seed, tmp)}
            write_json(path, record, indent=1)
            new += 1
            print(f"{name}{'' if lr is None else f' lr {lr:g}'} seed {seed}: val bpb {record['val_bpb'][-1]:.4f} "
                  f"after {record['tokens'][-1]:,} tokens, {record['seconds'][-1]:.0f} s", flush=True)
        with open(path, encoding="utf-8") as f:
            done[(name, lr, seed)] = json_lib.load(f)
    return quality_figures(b, done)


def quality_figures(b, done):
    """The figures of the runs done: the baseline's lr sweep, then per recipe against the tuned baseline."""
    base_name = next(iter(b["recipes"]))
    fig, notes = {}, {"runs": {f"{n}{'' if lr is None else f'@{lr:g}'}/{s}": r for (n, lr, s), r in done.items()}}
    notes["dtype"] = next(iter(done.values()))["dtype"] if done else "-"

    def finals(name, lr):
        return [done[(name, lr, s)]["val_bpb"][-1] for s in b["seeds"] if (name, lr, s) in done]

    sweep = {lr: finals(base_name, lr) for lr in b["baseline_lrs"]}
    fig["quality.sweep"] = {f"{lr:g}": statistics.mean(v) for lr, v in sweep.items() if v}
    complete = [lr for lr, v in sweep.items() if len(v) == len(b["seeds"])]
    if not complete:
        return fig, notes, "-"
    best = min(complete, key=lambda lr: statistics.mean(sweep[lr]))
    fig["quality.baseline_lr"] = best
    fig["quality.baseline_lr_at_edge"] = best in (min(b["baseline_lrs"]), max(b["baseline_lrs"]))
    recipes = [(base_name, best)] + [(n, None) for n in list(b["recipes"])[1:]]
    for name, lr in recipes:
        rows = []
        for s in b["seeds"]:
            base, run = done.get((base_name, best, s)), done.get((name, lr, s))
            if base is None or run is None:
                continue
            target = base["val_bpb"][-1]
            tokens, secs = reach(run, target, "tokens"), reach(run, target, "seconds")
            rows.append({"seed": s, "target_bpb": target, "final_bpb": run["val_bpb"][-1],
                         "tokens_to_target": tokens, "seconds_to_target": secs,
                         "token_ratio": base["tokens"][-1] / tokens if tokens else None,
                         "second_ratio": base["seconds"][-1] / secs if secs else None,
                         "step_ms": run["step_ms"], "optimizer_ms": run["optimizer_ms"],
                         "step_ratio": run["step_ms"] / base["step_ms"]})
        fig[f"quality.{name}"] = {"seeds": rows, **{k: spread([r[k] for r in rows]) for k in (
            "final_bpb", "token_ratio", "second_ratio", "step_ms", "optimizer_ms", "step_ratio")}}
    any_run = next(iter(done.values()))
    fig["model.params"], fig["quality.tokens_per_step"] = any_run["params"], any_run["tokens_per_step"]
    return fig, notes, any_run["device"]


def spread(values):
    """{"mean", "min", "max"} of the values, None when any is None (a recipe that missed the target)."""
    if not values or any(v is None for v in values):
        return None
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}


def report_quality(b, fig, notes, device):
    if "quality.baseline_lr" not in fig:
        return f"bench quality: no baseline run finished yet ({len(notes['runs'])} runs done); call again"
    base_name = next(iter(b["recipes"]))
    lines = [f"bench quality: {b['model'] or 'custom'} shape, {fig['model.params'] / 1e6:.2f}M parameters, {device}; "
             f"{b['data_dir']}; {b['quality_iters']} steps of {fig['quality.tokens_per_step']:,} tokens, val bpb every "
             f"{b['quality_eval_interval']}; seeds {', '.join(map(str, b['seeds']))}",
             f"baseline {base_name}, learning_rate sweep (mean final val bpb): " + ", ".join(
                 f"{lr}: {v:.4f}" for lr, v in fig["quality.sweep"].items()) + f" -> {fig['quality.baseline_lr']:g}"
             + (" (at the edge of the sweep: widen it)" if fig["quality.baseline_lr_at_edge"] else ""),
             f"{'recipe':24}{'final bpb':>26}{'tokens to baseline':>22}{'seconds to baseline':>22}{'step ms':>18}"
             f"{'optimizer ms':>20}"]

    def cell(f, key, spec, suffix=""):
        v = f[key]
        return "not reached" if v is None else f"{v['mean']:{spec}}{suffix} ({v['min']:{spec}}-{v['max']:{spec}})"

    for name in b["recipes"]:
        f = fig.get(f"quality.{name}")
        if f is None or not f["seeds"]:
            lines.append(f"{name:24}(not run yet)")
            continue
        lines.append(f"{name:24}{cell(f, 'final_bpb', '.4f'):>26}{cell(f, 'token_ratio', '.2f', 'x'):>22}"
                     f"{cell(f, 'second_ratio', '.2f', 'x'):>22}{cell(f, 'step_ms', ',.0f'):>18}"
                     f"{cell(f, 'optimizer_ms', ',.1f'):>20}")
    lines.append("tokens/seconds to baseline: the baseline's tokens (seconds) over the recipe's to reach the baseline's "
                 "final val bpb, same seed; mean (min-max) over seeds")
    return "\n".join(lines)


def plot_quality(b, fig, notes, path):
    """val bpb against tokens and against seconds, every run of the report (the baseline: its best lr), a line
    per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_name = next(iter(b["recipes"]))
    shown = [(base_name, fig["quality.baseline_lr"])] + [(n, None) for n in list(b["recipes"])[1:]]
    axes = plt.subplots(1, 2, figsize=(12, 4.5))[1]
    for i, (name, lr) in enumerate(shown):
        for s in b["seeds"]:
            run = notes["runs"].get(f"{name}{'' if lr is None else f'@{lr:g}'}/{s}")
            if run is None:
                continue
            for ax, axis in zip(axes, ("tokens", "seconds")):
                ax.plot(run[axis][1:], run["val_bpb"][1:], color=f"C{i}", alpha=0.8,
                        label=f"{name}{'' if lr is None else f' lr {lr:g}'}" if s == b["seeds"][0] else None)
    for ax, label in zip(axes, ("tokens", "training seconds")):
        ax.set_xlabel(label)
        ax.set_ylabel("val bits per byte")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[0].set_title(f"{b['model']}: {os.path.basename(os.path.normpath(b['data_dir']))}")
    plt.tight_layout()
    plt.savefig(path, dpi=110)
    plt.close()
    return path


def describe_device(dev):
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def package_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def num(v, spec):
    return "-" if v is None else format(v, spec)


def report(b, fig, notes, device):
    """The table printed at the end."""
    def ratio(v):
        return "-" if v is None else f"{v:.2f}x"

    hf = b["compare_hf"]
    lines = [f"bench: {b['model'] or 'custom'} shape, {fig['model.params'] / 1e6:.2f}M parameters, {device}, "
             f"{notes['dtype']}, compile={b['compile']}" + (f" ({b['compile_mode']})" if b["compile"] else "")
             + f", batch {b['batch_size']} x {b['block_size']} x {b['gradient_accumulation_steps']} micro-steps "
             f"= {fig['train.tokens_per_step']:,} tokens/step",
             f"{'':28}{'ours':>12}{'HF' if hf else '':>12}{'ours/HF' if hf else '':>10}"]

    def row(label, key, spec, r=None):
        theirs = num(fig[key.format("hf")], spec) if hf else ""
        lines.append(f"{label:28}{num(fig[key.format('ours')], spec):>12}{theirs:>12}{ratio(r) if hf else '':>10}")

    row("train tokens/s", "train.{}.tokens_per_s", ",.0f", fig["train.ours_over_hf"])
    row("step time, median (ms)", "train.{}.step_ms", ",.1f")
    row("step time, min (ms)", "train.{}.step_ms_min", ",.1f")
    row("achieved TFLOP/s", "train.{}.tflops", ".3f")
    row("MFU", "train.{}.mfu", ".1%")
    row("peak memory (MB)", "train.{}.peak_mem_mb", ",.0f")
    row("decode tokens/s (batch 1)", "decode.{}.tokens_per_s", ",.1f", fig["decode.ours_over_hf"])
    lines.append(f"{MFU_FORMULA}: {fig['model.flops_per_token']:,} FLOPs/token at T={b['block_size']}; "
                 f"peak {num(fig['train.peak_tflops'], 'g')} TFLOP/s ({notes['peak']})")
    if hf:
        same = fig["decode.same_tokens"]
        same = "" if same is None else f"; greedy decoding, same tokens: {same}"
        lines.append(f"HF baseline: LlamaForCausalLM, sdpa, our weights (max |logit diff| "
                     f"{fig['train.hf_max_logit_diff']:.2e}){same}")
        lines.append(f"train ours/HF paired by round (median of HF's time / ours): "
                     f"{fig['train.ours_over_hf_paired']:.2f}x")
    if fig["data.load_ms_per_batch"] is not None:
        lines.append(f"data loading: {fig['data.load_ms_per_batch']:.3f} ms per micro-batch, "
                     f"{fig['data.load_pct_of_step']:.2f}% of a training step")
    if fig["prepare.mb_per_s"] is not None:
        lines.append(f"prepare.py: {fig['prepare.mb_per_s']:.2f} MB/s on {fig['prepare.input_mb']:.1f} MB of jsonl, "
                     f"{fig['prepare.workers']} worker(s)")
    lines.append(f"process max RSS {fig['process.max_rss_mb']:,.0f} MB; torch {torch.__version__}")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    b = configure(argv)
    if b["threads"]:
        torch.set_num_threads(b["threads"])
    torch.manual_seed(b["seed"])
    measure, render = ((bench_serve, report_serve) if b["serve"] else (bench_lora, report_lora) if b["lora"]
                       else (bench_kd, report_kd) if b["kd"]
                       else (bench_rows, report_rows) if b["sft"] or b["dpo"]
                       else (bench_evals, report_evals) if b["evals"]
                       else (bench_quality, report_quality) if b["quality"] else (bench, report))
    fig, notes, device = measure(b)
    print(render(b, fig, notes, device), flush=True)
    if b["json"]:
        record = {"command": " ".join(["python", "bench.py", *argv]), "device": device, "dtype": notes["dtype"],
                  "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                  "transformers": package_version("transformers"), "mfu_formula": MFU_FORMULA,
                  "notes": notes, "config": b, "figures": fig}
        write_json(b["json"], record, indent=1)
        if b["quality"] and "quality.baseline_lr" in fig:
            print(f"plot: {plot_quality(b, fig, notes, os.path.splitext(b['json'])[0] + '.png')}", flush=True)
    return fig


if __name__ == "__main__":
    main()
