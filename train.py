"""
One training loop for every stage: pretrain, sft (also long-context SFT and
reasoning distillation) and dpo. The stage decides what a batch is and what the
loss is; optimizer, schedule, precision, parallelism, checkpoints and logging
are shared.

    python train.py config/pretrain_demo.py
    python train.py config/sft_demo.py --init_from=out/pretrain_demo
    torchrun --nproc_per_node=4 train.py config/sft.py --batch_size=32

Guarantees, each tested:
- the loss of an optimizer step is the mean over all its target tokens (DPO:
  over all its pairs), across micro-steps and ranks;
- batches and dropout are a pure function of (seed, iteration, micro-step,
  rank), so a resumed run repeats the uninterrupted one bit for bit, and N
  ranks reproduce one process that accumulates N times as many micro-batches;
- checkpoints are atomic; SIGTERM/SIGINT save and exit 0; a non-finite step
  is skipped, and too many in a row stop the run with the last good
  checkpoint intact.
"""

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

import configurator
import shards
from checkpoint import TOKENIZER_FILES, is_hf_dir, load_checkpoint, load_model, resume_checkpoint_path, save_checkpoint
from configurator import fail
from model import ModelConfig, Transformer

# -----------------------------------------------------------------------------
# defaults (override with config files and --key=value)
out_dir = "out/run"
data_dir = "data/demo_pretrain"
stage = "pretrain"  # pretrain | sft | dpo
init_from = "scratch"  # scratch | resume | a run dir (ckpt.pt) | an HF Llama dir
# model shape, used when training from scratch (otherwise it comes from the checkpoint)
vocab_size = 0  # 0: the data's vocabulary size
dim = 512
n_layers = 8
n_heads = 8
n_kv_heads = 0  # 0: n_heads
ffn_dim = 0  # 0: 8/3 * dim rounded up to a multiple of 64
rope_theta = 10000.0
norm_eps = 1e-5
tie_embeddings = True
# these apply to any init_from
block_size = 512  # tokens per row (the model sees block_size, predicts block_size targets)
rope_scaling = None  # e.g. {"type": "yarn", "factor": 2.0, "original_max_seq_len": 512}
dropout = 0.0
# batch: tokens per optimizer step = batch_size * block_size * gradient_accumulation_steps
batch_size = 8  # rows per micro-batch per rank
gradient_accumulation_steps = 1  # micro-batches per optimizer step, summed over all ranks
max_iters = 1000
# optimizer and schedule
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 100
lr_decay_iters = 0  # 0: max_iters
lr_schedule = "cosine"  # cosine | wsd (warmup, stable, then linear decay over the last wsd_decay_frac)
wsd_decay_frac = 0.2
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0: no clipping
# post-training
think_tag_weight = 1.0  # sft: weight of target positions whose label is a reasoning tag
dpo_beta = 0.1
dpo_loss = "sigmoid"  # sigmoid | ipo
dpo_label_smoothing = 0.0
dpo_precompute_ref = False  # reference log-probs computed once up front: no reference model in memory
# system
device = "auto"  # auto | cpu | cuda | cuda:N | mps
dtype = "auto"  # auto | bfloat16 | float16 | float32
compile = False
compile_mode = "default"  # torch.compile mode: default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
fsdp = False  # FSDP2 fully_shard per block (under torchrun) instead of DDP
seed = 1337
# evaluation, logging, checkpoints
eval_interval = 200
eval_iters = 20
log_interval = 10
checkpoint_interval = 0  # 0: every eval_interval
keep_last = 1  # older checkpoints kept beside ckpt.pt
wandb_log = False
wandb_project = "llm-trainer"
wandb_run_name = ""
verify_data = True  # checksums and token ids of every shard before the first step
max_bad_steps = 3  # non-finite steps in a row before the run stops
debug_nonfinite_iters = []  # fault injection for tests: iterations whose loss is made NaN
# -----------------------------------------------------------------------------

STAGES = ("pretrain", "sft", "dpo")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Datasheet dense (no sparsity) BF16 tensor-core peaks, TFLOP/s, matched by substring of the device name.
PEAK_TFLOPS = [
    ("H200 NVL", 835.0),  # NVIDIA H200 NVL datasheet: BF16 1,671 TF with sparsity -> 835 dense
    ("H200", 989.0),  # NVIDIA H200 datasheet: BF16 1,979 TF with sparsity -> 989 dense (SXM)
    ("H100 NVL", 835.0),  # NVIDIA H100 datasheet, NVL column: 1,671 TF with sparsity
    ("H100 PCIe", 756.0),  # NVIDIA H100 datasheet, PCIe column: 1,513 TF with sparsity
    ("H100", 989.0),  # NVIDIA H100 datasheet, SXM column: 1,979 TF with sparsity
    ("A100", 312.0),  # NVIDIA A100 datasheet: BF16 312 TF dense
    ("B200", 2250.0),  # NVIDIA HGX B200 datasheet: FP16/BF16 4.5 PF per GPU with sparsity -> 2,250 dense
    ("L40S", 362.0),  # NVIDIA L40S datasheet: BF16 362.05 TF dense (733 with sparsity)
    ("L40", 181.0),  # NVIDIA L40 datasheet: BF16 181.05 TF dense (362.1 with sparsity); before "L4"
    ("L4", 121.0),  # NVIDIA L4 datasheet: BF16 242 TF with sparsity -> 121 dense
    ("A10G", 70.0),  # AWS/NVIDIA A10G: 70 TF dense BF16 (sparse 140)
    ("A10", 125.0),  # NVIDIA A10 datasheet: BF16 125 TF dense (250 with sparsity); after "A100" and "A10G"
    ("RTX 4090", 165.2),  # Ada whitepaper: BF16 with FP32 accumulate 165.2 TF dense
    ("RTX 3090", 71.0),  # Ampere GA102 whitepaper: BF16 with FP32 accumulate 71 TF dense
]


def peak_tflops(device_name):
    for key, tf in PEAK_TFLOPS:
        if key in device_name:
            return tf
    return None


# -----------------------------------------------------------------------------
# setup


def setup_distributed(device_name):
    """rank, local_rank, world_size; initialises the process group under torchrun."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    # CPU tensors (the step's target count) go through gloo even when CUDA tensors go through NCCL
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and not device_name.startswith("cpu") else "gloo"
    torch.distributed.init_process_group(backend=backend)
    return rank, local_rank, world


def resolve_device(name, local_rank):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{local_rank}")
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def resolve_dtype(name, dev):
    if name == "auto":
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def check_config(cfg, world):
    """Impossible combinations: one clear line, exit 2, before any work."""
    if cfg["stage"] not in STAGES:
        fail(f"stage must be one of {', '.join(STAGES)}, got {cfg['stage']!r}")
    if cfg["dtype"] not in ("auto", "bfloat16", "float16", "float32"):
        fail(f"dtype must be auto, bfloat16, float16 or float32, got {cfg['dtype']!r}")
    if cfg["lr_schedule"] not in ("cosine", "wsd"):
        fail(f"lr_schedule must be cosine or wsd, got {cfg['lr_schedule']!r}")
    if cfg["dpo_loss"] not in ("sigmoid", "ipo"):
        fail(f"dpo_loss must be sigmoid or ipo, got {cfg['dpo_loss']!r}")
    if cfg["gradient_accumulation_steps"] % world:
        fail(f"gradient_accumulation_steps ({cfg['gradient_accumulation_steps']}) must be divisible by the "
             f"number of processes ({world}): it counts micro-batches over all ranks")
    if min(cfg["batch_size"], cfg["block_size"], cfg["gradient_accumulation_steps"], cfg["max_iters"]) < 1:
        fail("batch_size, block_size, gradient_accumulation_steps and max_iters must be >= 1")
    if cfg["compile_mode"] not in COMPILE_MODES:
        fail(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {cfg['compile_mode']!r}")
    if cfg["fsdp"] and world == 1:
        fail("fsdp=True shards the model over processes: launch with torchrun --nproc_per_node=N (N >= 2)")
    for key in ("eval_interval", "log_interval", "eval_iters"):
        if cfg[key] < 1:
            fail(f"{key} must be >= 1, got {cfg[key]}")
    if cfg["checkpoint_interval"] < 0 or cfg["keep_last"] < 0:
        fail("checkpoint_interval (0: every eval_interval) and keep_last must be >= 0")
    if not cfg["learning_rate"] > 0 or min(cfg["min_lr"], cfg["weight_decay"], cfg["grad_clip"]) < 0:
        fail("learning_rate must be > 0; min_lr, weight_decay and grad_clip (0: no clipping) must be >= 0")
    if os.path.exists(cfg["out_dir"]) and not os.path.isdir(cfg["out_dir"]):
        fail(f"out_dir '{cfg['out_dir']}' exists and is not a directory")
    scaling = cfg["rope_scaling"]
    if scaling is not None:
        if not isinstance(scaling, dict) or scaling.get("type") not in ("linear", "dynamic", "yarn"):
            fail("rope_scaling must be None or a dict with type linear, dynamic or yarn, a factor and "
                 "original_max_seq_len")
        limit = float(scaling.get("factor", 1)) * int(scaling.get("original_max_seq_len", cfg["block_size"]))
        if cfg["block_size"] > limit:
            fail(f"block_size {cfg['block_size']} is larger than rope_scaling allows "
                 f"(factor x original_max_seq_len = {int(limit)})")
    if cfg["stage"] == "dpo" and cfg["dropout"] > 0:
        fail("dpo needs dropout=0: the policy and the reference must agree at step 0")
    # the model shape as far as the config decides it (a checkpoint being continued decides the rest)
    shape = {"dim": cfg["dim"], "n_heads": cfg["n_heads"], "n_kv_heads": cfg["n_kv_heads"] or None}
    try:
        ModelConfig(rope_scaling=scaling, **(shape if cfg["init_from"] == "scratch" else {}))
    except ValueError as e:
        fail(str(e))


def lr_at(it, cfg):
    decay_iters = cfg["lr_decay_iters"] or cfg["max_iters"]
    lr, lo = cfg["learning_rate"], cfg["min_lr"]
    if it < cfg["warmup_iters"]:
        return lr * (it + 1) / (cfg["warmup_iters"] + 1)
    if it >= decay_iters:
        return lo
    if cfg["lr_schedule"] == "wsd":
        decay_start = decay_iters - int(cfg["wsd_decay_frac"] * decay_iters)
        if it < decay_start:
            return lr
        return lr + (lo - lr) * (it - decay_start) / max(1, decay_iters - decay_start)
    ratio = (it - cfg["warmup_iters"]) / max(1, decay_iters - cfg["warmup_iters"])
    return lo + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - lo)


# -----------------------------------------------------------------------------
# data: a batch is a pure function of (seed, iteration, global micro-step)


class Batches:
    """Rows of one split for one stage, in a seeded order per epoch.

    A unit is what a row holds: a window of block_size+1 tokens (pretrain), a
    document from its start (sft) or a chosen/rejected pair (dpo). Row r of
    global micro-step m at iteration it is unit number
    (it * micro_steps + m) * batch_size + r of the epoch-wise permutation.
    """

    def __init__(self, split, stage, block_size, batch_size, seed, pad_id, tag_ids=(), tag_weight=1.0):
        self.split, self.stage, self.T, self.B = split, stage, block_size, batch_size
        self.seed, self.pad_id = seed, pad_id
        self.tag_ids, self.tag_weight = np.array(sorted(tag_ids), dtype=np.int64), tag_weight
        if stage == "pretrain":
            self.n_units = (split.num_tokens - 1) // block_size
        elif stage == "sft":
            self.n_units = split.num_docs
        else:
            self.n_units = split.num_docs // 2
        if self.n_units < 1:
            fail(f"split '{split.name}' of {split.meta.get('data_dir', 'the data')} is too small for "
                 f"stage {stage} with block_size {block_size} ({split.num_tokens} tokens, {split.num_docs} documents)")
        self._epoch, self._order = None, None

    def unit(self, g):
        epoch, pos = divmod(g, self.n_units)
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_units)
            self._epoch = epoch
        return int(self._order[pos])

    def _row(self, start, end):
        """tokens, mask (np arrays of block_size+1) of [start, end), truncated and padded."""
        n = min(end - start, self.T + 1)
        tokens, mask = self.split.read(start, n)
        if n < self.T + 1:
            tokens = np.concatenate([tokens, np.full(self.T + 1 - n, self.pad_id, dtype=np.int64)])
            mask = np.concatenate([mask, np.zeros(self.T + 1 - n, dtype=np.uint8)])
        return tokens, mask

    def rows(self, unit):
        if self.stage == "pretrain":
            start = unit * self.T
            return [self._row(start, start + self.T + 1)]
        s, e = self.split.doc_starts, self.split.doc_ends
        docs = [unit] if self.stage == "sft" else [2 * unit, 2 * unit + 1]
        return [self._row(int(s[d]), int(e[d])) for d in docs]

    def get(self, g_micro):
        """Micro-batch number g_micro: x, y (int64), w (float32 loss weight per label), units."""
        units = [self.unit(g_micro * self.B + r) for r in range(self.B)]
        rows = [self.rows(u) for u in units]
        if self.stage == "dpo":  # all chosen rows first, then all rejected rows
            rows = [[r[0] for r in rows], [r[1] for r in rows]]
            rows = rows[0] + rows[1]
        else:
            rows = [r[0] for r in rows]
        tokens = np.stack([t for t, _ in rows])
        mask = np.stack([m for _, m in rows])
        x, y = tokens[:, :-1], tokens[:, 1:]
        w = mask[:, 1:].astype(np.float32)  # the mask applies to label positions
        if self.tag_weight != 1.0 and len(self.tag_ids):
            w[(w > 0) & np.isin(y, self.tag_ids)] *= self.tag_weight
        return SimpleNamespace(x=torch.from_numpy(np.ascontiguousarray(x)), y=torch.from_numpy(np.ascontiguousarray(y)),
                               w=torch.from_numpy(w), units=torch.tensor(units))


def to_device(batch, dev):
    pin = dev.type == "cuda"
    return SimpleNamespace(**{k: (v.pin_memory() if pin else v).to(dev, non_blocking=pin) for k, v in vars(batch).items()})


# -----------------------------------------------------------------------------
# losses


def token_losses(model, x, y):
    """Cross-entropy of every label position, float32, shape (B, T), computed inside the (compiled) model."""
    return model(x, targets=y)


def sequence_logps(model, batch):
    """Summed log-probability of each row's target tokens (the final reply, for DPO data)."""
    return -(token_losses(model, batch.x, batch.y) * (batch.w > 0)).sum(-1)


def dpo_terms(policy_logps, ref_logps, cfg):
    """Per-pair DPO loss and TRL-style statistics from (2B,) summed log-probs, chosen rows first."""
    pc, pr = policy_logps.chunk(2)
    rc, rr = ref_logps.chunk(2)
    logits = (pc - pr) - (rc - rr)
    beta = cfg["dpo_beta"]
    if cfg["dpo_loss"] == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        eps = cfg["dpo_label_smoothing"]
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    chosen_r, rejected_r = beta * (pc - rc).detach(), beta * (pr - rr).detach()
    stats = {"rewards/chosen": chosen_r, "rewards/rejected": rejected_r,
             "rewards/accuracies": (chosen_r > rejected_r).float(), "rewards/margins": chosen_r - rejected_r,
             "logps/chosen": pc.detach(), "logps/rejected": pr.detach()}
    return losses, stats


def micro_loss(run, batch):
    """(sum of weighted losses, dict of per-row stat tensors to sum) for one micro-batch."""
    if run.cfg["stage"] != "dpo":
        return (token_losses(run.model, batch.x, batch.y) * batch.w).sum(), {}
    policy = sequence_logps(run.model, batch)
    ref = reference_logps(run, batch)
    losses, stats = dpo_terms(policy, ref, run.cfg)
    return losses.sum(), {k: v.sum() for k, v in stats.items()}


def reference_logps(run, batch):
    if run.ref_logps is not None:  # precomputed once: (n_pairs, 2)
        pairs = run.ref_logps[batch.units.cpu()].to(batch.x.device)
        return torch.cat([pairs[:, 0], pairs[:, 1]])
    with torch.no_grad():
        return sequence_logps(run.ref_model, batch)


def normaliser(batch, stage):
    """What the step's loss is a mean over: target weight (tokens) or pairs."""
    return float(batch.units.numel()) if stage == "dpo" else float(batch.w.sum())


# -----------------------------------------------------------------------------
# the training step (bench.py times exactly this)


def all_reduce_sum(t, world):
    if world > 1:
        torch.distributed.all_reduce(t)
    return t


def train_step(run, it):
    """One optimizer step at iteration `it`. Returns a dict of floats (one host sync per step)."""
    cfg, model, opt = run.cfg, run.model, run.optimizer
    torch.manual_seed(cfg["seed"] * 1_000_003 + it * 101 + run.rank)  # dropout: a function of (seed, it, rank)
    ahead = run.next_micros
    targets, micros = ahead[1] if ahead is not None and ahead[0] == it else load_micros(run, it)
    # the step's loss is a mean over the targets of every micro-batch on every rank
    total = all_reduce_sum(torch.tensor(targets, dtype=torch.float64), run.world)
    denom = max(float(total), 1.0)
    for g in opt.param_groups:
        g["lr"] = lr_at(it, cfg)
    loss_sum = torch.zeros((), device=run.device)
    stats_sum = {}
    for m, batch in enumerate(micros):
        with sync_gradients(run, last=m == len(micros) - 1), run.autocast:
            loss, stats = micro_loss(run, batch)
            if it in cfg["debug_nonfinite_iters"]:
                loss = loss * float("nan")
        # DDP and FSDP average gradients over ranks: scale back up so the step's gradient is the global mean
        run.scaler.scale(loss * (run.world / denom)).backward()
        loss_sum += loss.detach()
        for k, v in stats.items():
            stats_sum[k] = stats_sum.get(k, 0.0) + v.detach().float()
    # the device is still busy with this step: read and copy the next step's batches meanwhile
    run.next_micros = (it + 1, load_micros(run, it + 1))
    run.scaler.unscale_(opt)
    grad_norm = clip_grad_norm(run, cfg["grad_clip"])
    flags = torch.stack([loss_sum / denom, grad_norm.float(), torch.tensor(float(run.stop_requested), device=run.device)]
                        + list(stats_sum.values()))
    flags[1] = flags[1] / run.world  # every rank holds the same global norm: the sum over ranks is world x
    flags = all_reduce_sum(flags, run.world).tolist()  # the one host sync of the step
    loss, gnorm, stop = flags[0], flags[1], flags[2] > 0
    finite = math.isfinite(loss) and (math.isfinite(gnorm) or run.scaler.is_enabled())
    if finite:
        run.scaler.step(opt)
        run.scaler.update()
    opt.zero_grad(set_to_none=True)
    out = {"loss": loss, "grad_norm": gnorm, "lr": lr_at(it, cfg), "finite": finite, "stop": stop}
    for i, k in enumerate(stats_sum):
        out[k] = flags[3 + i] / denom
    return out


def load_micros(run, it):
    """(target count, micro-batches on the device) of this rank at iteration it; the count is taken on the host."""
    cfg = run.cfg
    micros = [run.train_batches.get(it * cfg["gradient_accumulation_steps"] + run.rank * run.local_micro + m)
              for m in range(run.local_micro)]
    return sum(normaliser(b, cfg["stage"]) for b in micros), [to_device(b, run.device) for b in micros]


def sync_gradients(run, last):
    """Gradient all-reduce only on the last micro-step."""
    if run.world == 1 or last:
        if run.fsdp:
            run.model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if run.fsdp:
        run.model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return run.model.no_sync()


def clip_grad_norm(run, max_norm):
    params = [p for p in run.model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(run):
    """Validation figures: token-exact mean cross-entropy (unweighted), or DPO loss and reward statistics."""
    cfg, model = run.cfg, run.model
    model.eval()
    sums = None
    for i in range(run.rank, cfg["eval_iters"], run.world):
        batch = to_device(run.val_batches.get(i), run.device)
        with run.autocast:
            if cfg["stage"] == "dpo":
                losses, stats = dpo_terms(sequence_logps(model, batch), reference_logps_eval(run, batch), cfg)
                parts = [losses.sum(), torch.tensor(float(batch.units.numel()), device=run.device)]
                parts += [v.sum() for v in stats.values()]
            else:
                targets = (batch.w > 0).float()
                parts = [(token_losses(model, batch.x, batch.y) * targets).sum(), targets.sum()]
        part = torch.stack([p.float() for p in parts])
        sums = part if sums is None else sums + part
    if sums is None:  # more ranks than eval batches
        sums = torch.zeros(8 if cfg["stage"] == "dpo" else 2, device=run.device)
    sums = all_reduce_sum(sums, run.world).tolist()
    model.train()
    out = {"val_loss": sums[0] / max(sums[1], 1.0)}
    if cfg["stage"] == "dpo":
        for k, v in zip(["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                         "logps/chosen", "logps/rejected"], sums[2:]):
            out["val_" + k] = v / max(sums[1], 1.0)
    return out


def reference_logps_eval(run, batch):
    if run.ref_model is None:  # precomputed mode: evaluate the (frozen) starting weights' view lazily
        return run.val_ref_logps[batch.units.cpu()].to(batch.x.device).T.reshape(-1)
    return sequence_logps(run.ref_model, batch)


@torch.no_grad()
def precompute_reference(run, batches):
    """Reference log-probs of every pair of a split, computed once with the starting weights."""
    out = torch.zeros(batches.n_units, 2, dtype=torch.float32)
    model = run.raw_model.eval()  # not yet wrapped: the starting weights, whole on every rank
    B = batches.B
    for first in range(run.rank * B, batches.n_units, run.world * B):
        units = list(range(first, min(first + B, batches.n_units)))
        rows = [batches.rows(u) for u in units]
        tokens = np.stack([r[0][0] for r in rows] + [r[1][0] for r in rows])
        mask = np.stack([r[0][1] for r in rows] + [r[1][1] for r in rows])
        batch = to_device(SimpleNamespace(x=torch.from_numpy(tokens[:, :-1].copy()), y=torch.from_numpy(tokens[:, 1:].copy()),
                                          w=torch.from_numpy(mask[:, 1:].astype(np.float32))), run.device)
        with run.autocast:
            logps = sequence_logps(model, batch).float().cpu()
        out[units, 0], out[units, 1] = logps[: len(units)], logps[len(units):]
    model.train()
    return all_reduce_sum(out.to(run.device), run.world).cpu()


# -----------------------------------------------------------------------------
# model, optimizer, checkpoints


def model_config(cfg, meta, start):
    """The model's shape: from the checkpoint being continued, else from the config."""
    if start is not None:
        mc = ModelConfig(**{**start["model_config"], "max_seq_len": cfg["block_size"], "dropout": cfg["dropout"]})
        if cfg["rope_scaling"] is not None:
            mc.rope_scaling = dict(cfg["rope_scaling"])
        return ModelConfig(**mc.to_dict())
    return ModelConfig(
        vocab_size=cfg["vocab_size"] or meta["vocab_size"], dim=cfg["dim"], n_layers=cfg["n_layers"],
        n_heads=cfg["n_heads"], n_kv_heads=cfg["n_kv_heads"] or None, ffn_dim=cfg["ffn_dim"] or None,
        max_seq_len=cfg["block_size"], rope_theta=cfg["rope_theta"], rope_scaling=cfg["rope_scaling"],
        norm_eps=cfg["norm_eps"], tie_embeddings=cfg["tie_embeddings"], dropout=cfg["dropout"],
    )


def load_start(cfg):
    """The state to start from: None (scratch), a checkpoint dict (resume or a run dir), or HF weights."""
    src = cfg["init_from"]
    if src == "scratch":
        return None
    if src == "resume":
        path = resume_checkpoint_path(cfg["out_dir"])
        if path is None:
            print(f"init_from=resume: no checkpoint in {cfg['out_dir']} yet, starting from scratch")
            return None
        state = load_checkpoint(path)
        state["resume"] = True
        return state
    if os.path.isfile(os.path.join(src, "ckpt.pt")):
        state = load_checkpoint(os.path.join(src, "ckpt.pt"))
        return {"model": state["model"], "model_config": state["model_config"], "data": state.get("data", {}),
                "stage": state.get("stage")}
    if os.path.isdir(src) and is_hf_dir(src):
        model, _ = load_model(src)
        return {"model": model.state_dict(), "model_config": model.cfg.to_dict(), "data": {}, "stage": None}
    fail(f"init_from={src!r}: expected scratch, resume, a run directory with ckpt.pt, or an HF Llama directory")


def configure_optimizer(model, cfg, dev):
    """AdamW, weight decay on matrices only (not norms), fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    fused = dev.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]), fused=fused)


def wrap_model(model, cfg, dev, ptdtype, world, local_rank):
    """compile, then DDP or FSDP2 when there are several processes."""
    if world > 1 and cfg["fsdp"]:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=ptdtype, reduce_dtype=torch.float32) if ptdtype != torch.float32 else None
        kwargs = {"mp_policy": mp} if mp else {}
        for block in model.model.layers:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
    if cfg["compile"]:
        model = torch.compile(model, mode=cfg["compile_mode"])
    if world > 1 and not cfg["fsdp"]:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[local_rank] if dev.type == "cuda" else None)
    return model


def full_state(run):
    """Full (unsharded) model and optimizer state dicts on CPU; a collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(run.model, run.optimizer, options=options)


def load_full_state(run, model_sd, optim_sd):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(run.model, run.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True))


def save(run, it):
    model_sd, optim_sd = full_state(run)
    if run.rank == 0:
        state = {"model": {k: v.float() for k, v in model_sd.items()}, "optimizer": optim_sd,
                 "scaler": run.scaler.state_dict(), "model_config": run.raw_model.cfg.to_dict(),
                 "iter": it, "best_val_loss": run.best_val_loss, "config": run.cfg, "stage": run.cfg["stage"],
                 "data": run.data_identity}
        try:
            save_checkpoint(run.cfg["out_dir"], state, run.cfg["keep_last"])
        except OSError as e:
            fail(str(e))
        print(f"saved checkpoint at iter {it} to {os.path.join(run.cfg['out_dir'], 'ckpt.pt')}", flush=True)
    if run.world > 1:
        torch.distributed.barrier()


# -----------------------------------------------------------------------------
# logging


class Logger:
    """Console line, out_dir/metrics.jsonl and optionally wandb; rank 0 only."""

    def __init__(self, run, resume_iter):
        self.active = run.rank == 0
        self.path = os.path.join(run.cfg["out_dir"], "metrics.jsonl")
        self.wandb = None
        if not self.active:
            return
        if resume_iter is not None:
            self._truncate_after(resume_iter)
        elif os.path.exists(self.path):
            os.remove(self.path)
        if run.cfg["wandb_log"]:
            self.wandb = start_wandb(run.cfg)

    def _truncate_after(self, it):
        """Drop what a stopped run logged after its last checkpoint, and the evaluation at it: the resumed
        run redoes them. A line cut short (power loss, full disk) is dropped too."""
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record["iter"] < it or (record["iter"] == it and "val_loss" not in record):
                    kept.append(json.dumps(record) + "\n")
        with open(self.path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

    def log(self, record, line=None):
        if not self.active:
            return
        if line:
            print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb:
            self.wandb.log(record, step=record["iter"])


def start_wandb(cfg):
    try:
        import wandb
    except ImportError:
        fail("wandb_log=True needs the wandb package: pip install wandb")
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or os.path.exists(os.path.expanduser("~/.netrc"))
    return wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"] or None, config=cfg,
                      mode="online" if logged_in else "offline", dir=cfg["out_dir"])


def memory_mb(dev):
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    except ImportError:
        return float("nan")


# -----------------------------------------------------------------------------
# putting it together


def build(cfg):
    """Everything a step needs, from a resolved config: the run namespace train_step() and bench.py use."""
    rank, local_rank, world = setup_distributed(cfg["device"])
    check_config(cfg, world)
    dev = resolve_device(cfg["device"], local_rank)
    missing = {"cuda": not torch.cuda.is_available(), "mps": not torch.backends.mps.is_available()}
    if missing.get(dev.type):
        fail(f"device={cfg['device']!r}, but this PyTorch sees no such device: use device=cpu or auto")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ptdtype = resolve_dtype(cfg["dtype"], dev)
    meta = shards.load_meta(cfg["data_dir"])
    if meta["stage"] != cfg["stage"] and cfg["stage"] != "pretrain":
        fail(f"{cfg['data_dir']} was prepared for stage {meta['stage']!r}, not {cfg['stage']!r} "
             f"(prepare.py --stage={cfg['stage']})")
    verify = cfg["verify_data"] and rank == 0
    train_split = shards.open_split(cfg["data_dir"], "train", meta=meta, verify=verify)
    val_split = shards.open_split(cfg["data_dir"], "val", meta=meta, verify=verify)

    start = load_start(cfg)
    check_data_identity(cfg, meta, start)
    torch.manual_seed(cfg["seed"])
    mcfg = model_config(cfg, meta, start)
    if mcfg.vocab_size < meta["vocab_size"]:
        fail(f"the model's vocabulary ({mcfg.vocab_size}) does not cover the data's ({meta['vocab_size']} ids in "
             f"{cfg['data_dir']}): prepare the data with the model's tokenizer")
    raw = Transformer(mcfg)
    if start is not None:
        raw.load_state_dict(start["model"])
    raw.to(dev)

    run = SimpleNamespace(cfg=cfg, rank=rank, world=world, device=dev, ptdtype=ptdtype, raw_model=raw,
                          fsdp=cfg["fsdp"] and world > 1, local_micro=cfg["gradient_accumulation_steps"] // world,
                          stop_requested=False, best_val_loss=float("inf"), ref_model=None, ref_logps=None,
                          next_micros=None,
                          val_ref_logps=None, data_identity=data_identity(cfg, meta))
    run.autocast = (torch.autocast(dev.type, dtype=ptdtype) if ptdtype != torch.float32
                    else contextlib.nullcontext())
    run.scaler = torch.amp.GradScaler(dev.type, enabled=ptdtype == torch.float16)
    special = meta["special_ids"]
    tags = [special[t] for t in ("<think>", "</think>", "<answer>", "</answer>") if t in special]
    pad = special.get("<|endoftext|>", 0)
    batch_args = dict(stage=cfg["stage"], block_size=cfg["block_size"], batch_size=cfg["batch_size"], pad_id=pad)
    run.train_batches = Batches(train_split, seed=cfg["seed"], tag_ids=tags, tag_weight=cfg["think_tag_weight"],
                                **batch_args)
    run.val_batches = Batches(val_split, seed=cfg["seed"] + 1, **batch_args)

    if cfg["stage"] == "dpo":
        setup_reference(run)
    run.model = wrap_model(raw, cfg, dev, ptdtype, world, local_rank)
    run.optimizer = configure_optimizer(run.model, cfg, dev)
    run.start_iter, run.resumed = 0, False
    if start is not None and start.get("resume"):
        load_full_state(run, start["model"], start["optimizer"])
        run.scaler.load_state_dict(start["scaler"])
        run.start_iter, run.resumed = int(start["iter"]), True
        run.best_val_loss = float(start.get("best_val_loss", float("inf")))
    return run


def setup_reference(run):
    """DPO reference: a frozen copy of the starting weights, or its log-probs computed once."""
    if run.cfg["dpo_precompute_ref"]:
        run.ref_logps = precompute_reference(run, run.train_batches)
        run.val_ref_logps = precompute_reference(run, run.val_batches)
        return
    ref = Transformer(run.raw_model.cfg).to(run.device)
    ref.load_state_dict(run.raw_model.state_dict())
    run.ref_model = ref.eval().requires_grad_(False)


def data_identity(cfg, meta):
    return {"data_dir": os.path.abspath(cfg["data_dir"]), "tokenizer_sha256": meta.get("tokenizer_sha256"),
            "vocab_size": meta["vocab_size"]}


def check_data_identity(cfg, meta, start):
    """A checkpoint continued on data from another tokenizer would train on garbage: refuse it."""
    if start is None or not start.get("data"):
        return
    theirs, ours = start["data"].get("tokenizer_sha256"), meta.get("tokenizer_sha256")
    if theirs and ours and theirs != ours:
        fail(f"{cfg['data_dir']} was tokenized with a different tokenizer than the checkpoint in "
             f"{cfg['init_from'] if cfg['init_from'] != 'resume' else cfg['out_dir']} was trained with")


def copy_tokenizer(cfg):
    """A run directory is self-contained: sample.py and export.py need only it."""
    for name in TOKENIZER_FILES:
        src = os.path.join(cfg["data_dir"], name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(cfg["out_dir"], name))


def request_stop(signum, frame):
    RUN.stop_requested = True
    print(f"\nsignal {signal.Signals(signum).name}: saving a checkpoint after this step, then exiting", flush=True)


def main(argv=None):
    global RUN
    cfg = configurator.configure(globals(), argv, quiet=True)
    if cfg["checkpoint_interval"] == 0:
        cfg["checkpoint_interval"] = cfg["eval_interval"]
    run = RUN = build(cfg)
    if run.rank == 0:
        configurator.print_config(cfg)
        try:
            os.makedirs(cfg["out_dir"], exist_ok=True)
        except OSError as e:
            fail(f"cannot create out_dir '{cfg['out_dir']}': {e.strerror}")
        copy_tokenizer(cfg)
        with open(os.path.join(cfg["out_dir"], "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    logger = Logger(run, run.start_iter if run.resumed else None)
    print_plan(run)
    train_loop(run, logger)


def print_plan(run):
    if run.rank != 0:
        return
    cfg, raw = run.cfg, run.raw_model
    rows = 2 if cfg["stage"] == "dpo" else 1
    tokens = rows * cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
    print(f"model: {raw.num_params() / 1e6:.2f}M parameters, {raw.cfg.n_layers} layers, dim {raw.cfg.dim}, "
          f"vocab {raw.cfg.vocab_size}; device {run.device}, {str(run.ptdtype).split('.')[-1]}, "
          f"{run.world} process(es){', FSDP' if run.fsdp else ''}")
    print(f"stage {cfg['stage']}: {tokens:,} tokens per optimizer step "
          f"({cfg['batch_size']} rows x {cfg['block_size']} x {cfg['gradient_accumulation_steps']} micro-steps"
          f"{' x 2 (chosen, rejected)' if rows == 2 else ''}), {cfg['max_iters']} steps"
          + (f", resuming at step {run.start_iter}" if run.resumed else ""), flush=True)


def train_loop(run, logger):
    cfg = run.cfg
    rows = 2 if cfg["stage"] == "dpo" else 1
    tokens_per_step = rows * cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
    flops_per_step = run.raw_model.flops_per_token(cfg["block_size"]) * tokens_per_step
    peak = peak_tflops(torch.cuda.get_device_name(run.device)) if run.device.type == "cuda" else None
    it, bad_in_row, t0 = run.start_iter, 0, time.time()
    while True:
        if it % cfg["eval_interval"] == 0 or it == cfg["max_iters"]:
            ev = evaluate(run)
            run.best_val_loss = min(run.best_val_loss, ev["val_loss"])
            logger.log({"iter": it, **ev}, "eval  " + fmt_stats(it, ev))
            t0 = time.time()
        if it >= cfg["max_iters"]:
            break
        stats = train_step(run, it)
        it += 1
        dt, t0 = time.time() - t0, time.time()
        if not stats["finite"]:
            bad_in_row += 1
            logger.log({"iter": it, "loss": stats["loss"], "lr": stats["lr"], "skipped": True},
                       f"iter {it}: non-finite loss {stats['loss']} or grad norm {stats['grad_norm']}: update skipped "
                       f"({bad_in_row}/{cfg['max_bad_steps']} in a row)")
            if bad_in_row >= cfg["max_bad_steps"]:
                print(f"error: {bad_in_row} non-finite steps in a row; stopping. The last good checkpoint is in "
                      f"{cfg['out_dir']} (lower learning_rate, check the data, or use dtype=bfloat16)", flush=True)
                sys.exit(1)
            continue
        bad_in_row = 0
        if it % cfg["log_interval"] == 0 or it == cfg["max_iters"]:
            record = {"iter": it, "loss": stats["loss"], "lr": stats["lr"], "grad_norm": stats["grad_norm"],
                      "tokens_per_s": tokens_per_step / dt, "dt_ms": dt * 1000, "mem_mb": memory_mb(run.device),
                      **{k: v for k, v in stats.items() if "/" in k}}
            if peak:
                record["mfu"] = flops_per_step / dt / (peak * 1e12)
            logger.log(record, "train " + fmt_stats(it, record))
        if stats["stop"]:
            save(run, it)
            print("stopped by signal; resume with --init_from=resume", flush=True)
            sys.exit(0)
        if it % cfg["checkpoint_interval"] == 0 and it < cfg["max_iters"]:
            save(run, it)
    save(run, it)
    if run.world > 1:
        torch.distributed.destroy_process_group()


def fmt_stats(it, r):
    parts = [f"iter {it:6d}"]
    for k, v in r.items():
        if k == "iter":
            continue
        if k == "lr":
            parts.append(f"lr {v:.2e}")
        elif k == "tokens_per_s":
            parts.append(f"{v:,.0f} tok/s")
        elif k == "mfu":
            parts.append(f"mfu {100 * v:.1f}%")
        elif k == "mem_mb":
            parts.append(f"mem {v:,.0f}MB")
        elif isinstance(v, float):
            parts.append(f"{k} {v:.4f}")
    return " | ".join(parts)


RUN = None

if __name__ == "__main__":
    try:
        main()
    except configurator.ConfigError:
        sys.exit(2)
