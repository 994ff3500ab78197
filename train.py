"""
One training loop for every stage: pretrain, sft (also long-context SFT and
reasoning distillation), dpo, rm (a reward model) and grpo. The stage, defined once in
llm_trainer/stages.py, decides what a batch is and what the loss is; optimizer,
schedule, precision, parallelism, checkpoints and logging are shared.

    python train.py config/pretrain_demo.py
    python train.py config/sft_demo.py --init_from=out/demo/pretrain
    torchrun --nproc_per_node=4 train.py config/sft.py --batch_size=32

Reading order: the defaults, main, the loop, one optimizer step, evaluation,
then build() and the small pieces they call.

Guarantees, each tested:
- the loss of an optimizer step is the mean over all its target tokens (DPO
  and rm: over all its pairs; GRPO: over all its completion tokens), across
  micro-steps and ranks;
- batches and dropout are a pure function of (seed, global micro-batch
  index), so a resumed run repeats the uninterrupted one bit for bit, and N
  ranks reproduce one process that accumulates N times as many micro-batches;
- checkpoints are atomic; SIGTERM/SIGINT save and exit 0; a non-finite step
  is skipped, and too many in a row stop the run with the last good
  checkpoint intact.

Faults for tests to inject come from the environment, never from the config:
TRAIN_FAULTS='{"nonfinite_iters": [5, 9], "stall": [1, 5]}' makes the loss of
iterations 5 and 9 NaN, and rank 1 stall in the step from iteration 5 to 6.
"""

import ast
import math
import os
import re
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

import torch

import configurator
from configurator import fail
from llm_trainer import stages
from llm_trainer.core import checkpoint, common, distributed
from llm_trainer.core.files import write_json
from llm_trainer.data import shards
from llm_trainer.data.batches import Batches
from llm_trainer.data.tokenizer import ChatTokenizer, check_same_vocabulary, load_tokenizer
from llm_trainer.training import losses, optimizers
from llm_trainer.training.metrics import Logger, format_line
from llm_trainer.training.rewards import Reward
from llm_trainer.inference.tools import Tools
from model import LORA_PARTS, ModelConfig, Transformer, for_head, lora_trained

# -----------------------------------------------------------------------------
# defaults (override with config files and --key=value)
out_dir = "out/run"
data_dir = "data/demo_pretrain"
stage = "pretrain"  # pretrain | sft | dpo | rm | grpo (llm_trainer/stages.py)
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
# optimizer and schedule (the groups and their settings: llm_trainer/training/optimizers.py)
optimizer = "muon"  # muon: Muon on the hidden matrices, AdamW on embedding, head, norms | adamw: AdamW on every weight
learning_rate = 6e-4  # AdamW's peak learning rate (with optimizer=muon: of the embedding, head and norms)
min_lr = 6e-5  # where the schedule ends: every group's peak learning rate times min_lr / learning_rate
muon_lr = 0.02  # muon: the hidden matrices' peak learning rate (torch.optim.Muon's, adjusted to each shape)
muon_momentum = 0.95  # muon: Nesterov momentum
muon_adjust_lr = "original"  # muon: torch.optim.Muon's adjust_lr_fn, original (sqrt(max(1, rows/cols))) | match_rms_adamw
muon_split = True  # muon: q, k, v of qkv_proj and gate, up of gate_up_proj orthogonalised one by one (False: fused whole)
group_lr = {}  # peak learning rates of single groups by name, e.g. {"embed": 0.01} (the run prints its groups)
group_weight_decay = {}  # weight decay of single groups by name (default: weight_decay, 0 for norms)
warmup_iters = 100
lr_decay_iters = 0  # 0: max_iters
lr_schedule = "cosine"  # cosine | wsd (warmup, stable, then linear decay over the last wsd_decay_frac)
wsd_decay_frac = 0.2
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0: no clipping
# post-training
lora_rank = 0  # > 0: train LoRA adapters of this rank on frozen weights (any stage but pretrain)
lora_alpha = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank
lora_dropout = 0.0
lora_targets = "all"  # attention | mlp | all, or projections of q, k, v, o, gate, up, down, comma-separated
think_tag_weight = 1.0  # sft: weight of target positions whose label is a reasoning tag
pack = None  # sft, dpo, rm: whole documents (dpo, rm: whole pairs) packed into each row, attention and positions kept per document (None: True for them)
doc_mask = False  # pretrain: documents in a window do not attend to each other, positions restart per document
dpo_beta = 0.1
dpo_loss = "sigmoid"  # sigmoid | ipo
dpo_label_smoothing = 0.0
dpo_precompute_ref = False  # reference log-probs computed once up front: no reference model in memory
teacher = ""  # sft: logit distillation from this frozen model (a run or an HF Llama directory of the same tokenizer)
kd_weight = 0.5  # sft with a teacher: loss = (1 - kd_weight) * cross-entropy + kd_weight * divergence from the teacher
kd_temperature = 1.0  # sft with a teacher: both distributions softened by it; the divergence is multiplied by its square
kd_loss = "forward_kl"  # sft with a teacher: forward_kl (KL(teacher || student)) | reverse_kl | jsd
kd_chunk = 1024  # sft with a teacher: target positions whose logits (of both models) exist at once; 0: all
center_rewards_coefficient = 0.0  # rm: weight of (r_chosen + r_rejected)^2, which keeps the scores centred on 0 (TRL)
reward = "exact_answer"  # grpo: a built-in, module:function, file.py:function, rm:DIR, teacher:DIR or a weighted sum (llm_trainer/training/rewards.py)
grpo_group = 8  # grpo: completions sampled per prompt (batch_size counts prompts)
grpo_epochs = 1  # grpo: optimizer updates on each batch of rollouts (> 1: the ratio to the rollout policy is clipped)
grpo_clip = 0.2  # grpo: the ratio is clipped to [1 - grpo_clip, 1 + grpo_clip]
grpo_kl = 0.0  # grpo: weight of the k3 KL to the starting weights (0: no reference model in memory)
grpo_std_norm = True  # grpo: advantages divided by the standard deviation of the group's rewards
temperature = 1.0  # grpo rollouts: sampling temperature
top_p = 1.0  # grpo rollouts: nucleus sampling (1.0: off)
max_new_tokens = 128  # grpo rollouts: completion length at most (prompt + completion <= block_size)
grpo_tools = ""  # grpo rollouts: tools the policy may call (calculator, a .py file of functions; inference/tools.py)
grpo_tool_calls = 2  # grpo rollouts with tools: calls run per completion at most
# system
device = "auto"  # auto | cpu | cuda | cuda:N | mps
dtype = "auto"  # auto | bfloat16 | float16 | float32
compile = False
compile_mode = "default"  # torch.compile mode: default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
fsdp = False  # FSDP2 fully_shard per block (under torchrun) instead of DDP
dist_timeout_s = 600.0  # torchrun: a collective not done by then (a process stuck or gone) stops the run, exit 3
seed = 1337
# evaluation, logging, checkpoints
eval_interval = 200
eval_iters = 20  # micro-batches per evaluation; 0: no evaluation (a data dir without a val split)
eval_tasks = ""  # lm-eval tasks and eval.py suites scored during training (eval.py), e.g. "demo_add,hellaswag"
eval_tasks_include = ""  # a folder of local YAML tasks for eval_tasks (as eval.py --include_path)
eval_tasks_interval = 0  # 0: every eval_interval
eval_tasks_limit = 0  # items per task (0: all): a cheap subsample
log_interval = 10
checkpoint_interval = 0  # 0: every eval_interval
keep_last = 1  # older checkpoints kept beside ckpt.pt
overwrite = False  # a run that does not resume, into an out_dir that holds checkpoints: True deletes them, else refused
wandb_log = False
wandb_project = "llm-trainer"
wandb_run_name = ""
verify_data = True  # checksums and token ids of every shard before the first step
max_bad_steps = 3  # non-finite steps in a row before the run stops
# -----------------------------------------------------------------------------

_DEFAULTS = configurator.defaults(globals())

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# What decides the model, its reference or the batch sequence (grpo's: its rollouts): a resumed run that changed one
# would go on as another run, so init_from=resume refuses it (the data's content is compared too: its shards'
# checksums). Every other key may change on resume (max_iters, the schedule, evaluation, logging, device, dtype...).
# Each stage names its own such keys (Stage.fixed_on_resume).
RESUME_FIXED = frozenset({
    "stage", "seed", "batch_size", "gradient_accumulation_steps", "block_size", "pack",
    "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "rope_theta", "norm_eps", "tie_embeddings",
    "rope_scaling", "dropout", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets",
}) | stages.FIXED_ON_RESUME
FAULTS = ("nonfinite_iters", "stall")  # TRAIN_FAULTS (the module docstring)


def configure(argv=None):
    """train.py's resolved config: the defaults, config files and --key=value in argv, derived settings set."""
    cfg = configurator.configure(_DEFAULTS, argv)
    if cfg["checkpoint_interval"] == 0:
        cfg["checkpoint_interval"] = cfg["eval_interval"]
    if cfg["eval_tasks_interval"] == 0:
        cfg["eval_tasks_interval"] = cfg["eval_interval"]
    if cfg["pack"] is None:
        cfg["pack"] = stages.get(cfg["stage"]).packs
    return cfg


def main(argv=None):
    cfg = configure(argv)
    run = None
    try:
        run = build(cfg)
        start(run)
    except RuntimeError as e:
        if not distributed.is_collective_failure(e):
            raise
        stop_on_collective_failure(cfg, run.phase if run else "startup (building the run)", e)


def start(run):
    """Write the run directory's config and tokenizer, install the signal handlers, then train."""
    cfg = run.cfg
    distributed.together(lambda: prepare_out_dir(run), run.rank, run.world, "preparing out_dir")
    # restored at the end: a caller that trains in-process (the demo, the tests) keeps its own handlers, and
    # processes it forks later do not inherit one that ignores SIGTERM (a pool's terminate() would wait forever)
    previous = {sig: signal.signal(sig, lambda signum, frame: request_stop(run, signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        logger = distributed.together(lambda: Logger(cfg, run.rank, run.start_iter if run.resumed else None),
                                      run.rank, run.world, "starting the log")
        print_plan(run)
        train_loop(run, logger)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train_loop(run, logger):
    """Evaluate every eval_interval, step, log every log_interval, save every checkpoint_interval and at the end."""
    cfg = run.cfg
    flops_per_token = run.raw_model.flops_per_token(cfg["block_size"])
    peak = common.peak_tflops(torch.cuda.get_device_name(run.device)) if run.device.type == "cuda" else None
    it, bad_in_row, t0 = run.start_iter, 0, time.time()
    while True:
        val_due = cfg["eval_iters"] and (it % cfg["eval_interval"] == 0 or it == cfg["max_iters"])
        tasks_due = run.tasks is not None and (it % cfg["eval_tasks_interval"] == 0 or it == cfg["max_iters"])
        if val_due or tasks_due:
            run.phase = f"evaluation at iteration {it}"
            ev = evaluate(run) if val_due else {}
            run.best_val_loss = min(run.best_val_loss, ev.get("val_loss", math.inf))
            ev.update(run.tasks(run.raw_model) if tasks_due else {})  # eval.py's figures, as "tasks/<task>/<metric>"
            logger.log({"iter": it, **ev}, "eval  " + format_line(it, ev))
            t0 = time.time()
        if it >= cfg["max_iters"]:
            break
        run.phase = f"the training step from iteration {it} to {it + 1}"
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
                      "tokens_per_s": stats["positions"] / dt, "target_tokens_per_s": stats["target_tokens"] / dt,
                      "fill": stats["fill"], "epoch": run.train_batches.epochs(it * cfg["gradient_accumulation_steps"]
                                                                               * cfg["batch_size"]),
                      "dt_ms": dt * 1000, "mem_mb": common.memory_mb(run.device),
                      **{k: stats[k] for k in (run.stage.logged or run.stage.stats(cfg)) + run.stage.figures
                         if stats[k] is not None}}  # a figure that does not apply is None (rm_score without an rm)
            if peak:
                record["mfu"] = flops_per_token * stats["positions"] / dt / (peak * 1e12)
            logger.log(record, "train " + format_line(it, record))
        run.phase = f"checkpoint save at iteration {it}"
        if stats["stop"]:
            checkpoint.save_run(run, it)
            print("stopped by signal; resume with --init_from=resume", flush=True)
            sys.exit(0)
        if it % cfg["checkpoint_interval"] == 0 and it < cfg["max_iters"]:
            checkpoint.save_run(run, it)
    run.phase = f"checkpoint save at iteration {it}"
    checkpoint.save_run(run, it)
    logger.close()
    distributed.destroy(run.world)


# -----------------------------------------------------------------------------
# one optimizer step (bench.py times exactly this)


def train_step(run, it):
    """Iteration `it`: its micro-batches, read (or sampled by the model: the stage's updates on them), then one
    optimizer update. Returns a dict of floats (one host sync per update)."""
    if run.faults.get("stall") == [run.rank, it]:  # as a rank stuck elsewhere: the others time out in a collective
        deadline = time.time() + 10 * run.cfg["dist_timeout_s"]
        while time.time() < deadline and not run.stop_requested:
            time.sleep(0.05)
    if run.stage.sample is not None:
        counts, micros, figures = run.stage.sample(run, it)
        counts = distributed.all_reduce_sum(counts, run.world).tolist()
        for _ in range(run.stage.updates(run.cfg)):
            stats = update(run, it, counts, micros)
        return {**stats, **figures}
    counts, micros = run.prefetched.pop(it) if it in run.prefetched else load_micros(run, it)
    counts = distributed.all_reduce_sum(counts, run.world).tolist()

    def prefetch():  # the next step's batches, read and copied while the device works on this one
        run.prefetched = {it + 1: load_micros(run, it + 1)}

    return update(run, it, counts, micros, while_busy=prefetch)


def update(run, it, counts, micros, while_busy=None):
    """One optimizer update on this rank's micro-batches; counts: losses.batch_counts summed over every rank,
    since the step's loss is a mean over the targets of every micro-batch on every rank."""
    cfg, model, opt = run.cfg, run.model, run.optimizer
    denom = max(counts[0], 1.0)
    opt.schedule(lr_at(it, cfg) / cfg["learning_rate"])
    loss_sum = torch.zeros((), device=run.device)
    stats_sum = {}
    for m, batch in enumerate(micros):
        # dropout: a function of (seed, global micro-batch index), so N ranks draw the masks of one process
        torch.manual_seed(cfg["seed"] * 1_000_003 + run.micro_index(it, m))
        with distributed.gradient_sync(model, run.world, run.fsdp, last=m == len(micros) - 1), run.autocast:
            loss, stats = run.stage.loss(run, batch, "train")
            if it in run.faults.get("nonfinite_iters", ()):
                loss = loss * float("nan")
        # DDP and FSDP average gradients over ranks: scale back up so the step's gradient is the global mean
        run.scaler.scale(loss * (run.world / denom)).backward()
        loss_sum += loss.detach()
        for k, v in stats.items():
            stats_sum[k] = stats_sum.get(k, 0.0) + v.detach().float()
    if while_busy is not None:  # the device is still busy with this step: read and copy the next step's batches
        while_busy()
    run.scaler.unscale_(opt)
    grad_norm = distributed.clip_grad_norm(model, cfg["grad_clip"])
    # every rank holds the same global norm: divided by world, the sum over ranks is that norm
    sums = {"loss": loss_sum / denom, "grad_norm": grad_norm.float() / run.world,
            "stop": torch.tensor(float(run.stop_requested), device=run.device), **stats_sum}
    sums = dict(zip(sums, distributed.all_reduce_sum(torch.stack(list(sums.values())), run.world).tolist()))
    loss, gnorm = sums["loss"], sums["grad_norm"]  # the line above is the one host sync of the step
    finite = math.isfinite(loss) and (math.isfinite(gnorm) or run.scaler.is_enabled())
    if finite:
        run.scaler.step(opt)
    run.scaler.update()  # after a skipped step too: float16's next unscale_ needs it (a no-op otherwise)
    opt.zero_grad(set_to_none=True)
    return {"loss": loss, "grad_norm": gnorm, "lr": lr_at(it, cfg), "finite": finite, "stop": sums["stop"] > 0,
            "target_tokens": counts[1], "fill": counts[2] / counts[3], "positions": counts[3],
            **run.stage.summary({k: sums[k] / denom for k in stats_sum})}


def load_micros(run, it):
    """(losses.batch_counts summed, micro-batches on the device) of this rank at iteration it."""
    micros = [run.train_batches.get(run.micro_index(it, m)) for m in range(run.local_micro)]
    pairs = run.stage.unit == "pair"
    return sum(losses.batch_counts(b, pairs) for b in micros), [b.to(run.device) for b in micros]


# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(run):
    """Validation figures over eval_iters micro-batches shared by the ranks: token-exact mean cross-entropy
    (unweighted), or the stage's loss and its statistics (DPO's rewards), or the stage's own figures (grpo's greedy
    rewards); and val_bpb, bits per UTF-8 byte of the targets (of the chosen replies, for pairs), which compares
    across tokenizers."""
    stage, model, n = run.stage, run.model, run.cfg["eval_iters"]
    if stage.evaluate is not None:
        return stage.evaluate(run)
    pairs = stage.unit == "pair"
    names = ("loss", "count", "bytes", *stage.stats(run.cfg))
    model.eval()
    sums = torch.zeros(len(names), device=run.device)
    for i in range(run.rank, -(-n // run.world) * run.world, run.world):
        # past the last batch a rank still runs a forward (the rule in llm_trainer/core/distributed.py), on a batch not counted
        batch = run.val_batches.get(i % n).to(run.device)
        with run.autocast:
            loss, stats = stage.loss(run, batch, "val")
        if i < n:
            count = torch.tensor(losses.target_count(batch, pairs, weighted=False), device=run.device)
            nbytes = (losses.target_bytes(batch, run.token_bytes, pairs) if run.token_bytes is not None
                      else torch.zeros((), device=run.device))
            sums += torch.stack([loss.float(), count, nbytes] + [stats[k].float() for k in names[3:]])
    sums = dict(zip(names, distributed.all_reduce_sum(sums, run.world).tolist()))
    model.train()
    count, nbytes = max(sums.pop("count"), 1.0), max(sums.pop("bytes"), 1.0)
    means = {k: v / count for k, v in sums.items()}
    figures = {"val_" + k: v for k, v in {"loss": means.pop("loss"), **stage.summary(means)}.items()}
    if run.token_bytes is not None and stage.bpb_nats is not None:  # no bytes without a tokenizer (bench.py's ids)
        figures["val_bpb"] = stage.bpb_nats(sums) / math.log(2) / nbytes
    return figures


# -----------------------------------------------------------------------------
# building a run


@dataclass
class Run:
    """Everything a step needs, built once by build() from a resolved config (bench.py builds one too)."""

    cfg: dict  # the resolved config (train.configure)
    stage: stages.Stage  # what a batch is, the loss, the evaluation (llm_trainer/stages.py)
    rank: int  # this process, 0 .. world-1
    world: int  # processes under torchrun (1 without)
    device: torch.device
    ptdtype: torch.dtype  # the compute dtype under autocast
    autocast: object  # the context the forward passes run in
    raw_model: Transformer  # the model itself: weights, shape, generation
    model: torch.nn.Module  # what the step calls: raw_model compiled and/or wrapped for DDP or FSDP2
    optimizer: optimizers.Optimizers  # AdamW, or Muon and AdamW, stepped as one
    scaler: torch.amp.GradScaler  # loss scaling for float16; disabled otherwise
    train_batches: Batches
    val_batches: Optional[Batches]  # None with eval_iters=0: no evaluation
    reference: Optional[losses.Reference]  # Stage.needs_reference: the frozen starting weights (or their log-probs)
    teacher: Optional[torch.nn.Module]  # Stage.teacher: the frozen model it distils from (wrapped as the policy is)
    data_identity: dict  # saved in checkpoints: a continued run must use the same tokenizer (a resumed one: data)
    frozen: dict  # saved in checkpoints: where each frozen model came from ({"reference", "teacher" or
    # "reward_models": weights_source}), to rebuild it; a resumed run starts with what its checkpoint recorded
    run_id: Optional[str]  # saved in checkpoints: rotation removes only this run's (rank 0's id is the one saved)
    faults: dict = field(default_factory=dict)  # TRAIN_FAULTS: faults tests inject (the module docstring)
    start_iter: int = 0
    resumed: bool = False
    best_val_loss: float = float("inf")
    stop_requested: bool = False  # set by SIGTERM/SIGINT; every rank stops after the same step
    phase: str = "startup"  # what the run is doing, for the line that reports a failed collective
    lora_base: Optional[dict] = None  # LoRA: the directory the adapters train on, and its weights' sha256
    token_bytes: Optional[torch.Tensor] = None  # the UTF-8 bytes of each token id, for val_bpb
    tokenizer: Optional[ChatTokenizer] = None  # a stage that decodes what it samples (grpo, for the reward)
    reward: Optional[Reward] = None  # a stage that scores what it samples (grpo)
    tools: Optional[Tools] = None  # what the policy may call in its rollouts (grpo_tools)
    margins: Optional[dict] = None  # rm: {split: each pair's margin}, for data with a margin column
    prefetched: dict = field(default_factory=dict)  # {iteration: (counts, micro-batches)} read while the device works
    tasks: Optional[object] = None  # eval_tasks: eval.TrainingTasks, called with the model

    @property
    def fsdp(self):
        return self.cfg["fsdp"] and self.world > 1

    @property
    def local_micro(self):
        """Micro-batches per step on this rank."""
        return self.cfg["gradient_accumulation_steps"] // self.world

    def micro_index(self, it, m):
        """The global index of this rank's micro-batch m of iteration it: what its batch and dropout derive from."""
        return it * self.cfg["gradient_accumulation_steps"] + self.rank * self.local_micro + m


def build(cfg):
    """The Run for a resolved config, in steps: the process group and device, the data, the weights it starts
    from, the model, the frozen reference, the wrapping (DDP or FSDP2, compile), and a resumed run's state."""
    stage = stages.get(cfg["stage"])
    faults = read_faults()
    check_config(cfg, stage, distributed.rank_and_world()[1])
    rank, local_rank, world = distributed.init_process_group(cfg["device"], cfg["dist_timeout_s"])
    dev = set_up_device(cfg["device"], local_rank)
    ptdtype = common.resolve_dtype(cfg["dtype"], dev)
    new_run = cfg["init_from"] != "resume"  # its checkpoints must not mix with another run's
    if new_run:
        distributed.together(lambda: checkpoint.check_out_dir(cfg["out_dir"], cfg["overwrite"], cfg["init_from"])
                             if rank == 0 else None, rank, world, "checking out_dir")
    meta, splits = open_data(cfg, stage, rank, world)
    start = load_start(cfg, meta)
    resumed = start is not None and start.resumed
    raw = make_model(cfg, stage, meta, start, dev)
    autocast = common.autocast(dev, ptdtype)
    train_batches, val_batches = make_batches(cfg, stage, meta, splits)

    reference, frozen, wants_reference = None, {}, stage.needs_reference(cfg)
    if wants_reference and not cfg["lora_rank"]:  # (a LoRA run's reference is its base, which lora_base records)
        used = {"train": train_batches, "val": val_batches} if val_batches else {"train": train_batches}
        reference, frozen = frozen_reference(cfg, stage, raw, start, used, dev, ptdtype, autocast, rank, world)
    teacher, teacher_source = frozen_teacher(cfg, stage, raw, start, meta, dev, ptdtype, world)
    frozen.update(teacher_source)
    model = distributed.wrap_model(raw, dev, ptdtype, world, local_rank, fsdp=cfg["fsdp"], compile=cfg["compile"],
                                   compile_mode=cfg["compile_mode"])
    if wants_reference and cfg["lora_rank"]:  # the reference is the base: the policy with its adapters off
        reference = losses.Reference(raw, {}, dev, autocast, rank, world, precompute=False, shared=model)

    run = Run(cfg=cfg, stage=stage, rank=rank, world=world, device=dev, ptdtype=ptdtype, autocast=autocast,
              raw_model=raw, model=model, optimizer=optimizers.build(model, cfg),
              scaler=torch.amp.GradScaler(dev.type, enabled=ptdtype == torch.float16),
              train_batches=train_batches, val_batches=val_batches, reference=reference, teacher=teacher,
              data_identity=checkpoint.data_identity(cfg, meta),
              frozen={**((start.saved.get("frozen") or {}) if resumed else {}), **frozen},
              run_id=start.saved.get("run_id") if resumed else uuid.uuid4().hex, faults=faults)
    if cfg["lora_rank"]:
        run.lora_base = start.saved["lora_base"] if resumed else checkpoint.lora_base(cfg["init_from"])
    if resumed:
        restore(run, start.saved)
    add_text_and_tasks(run, meta)
    first, last = distributed.spread(run.start_iter, world)
    if first != last:  # e.g. nodes whose out_dir is not the same directory: only rank 0 writes checkpoints
        fail(f"rank {rank}: the processes would start at different iterations ({first:.0f} to {last:.0f}): every "
             f"node must see the same out_dir ({cfg['out_dir']})")
    if new_run:
        distributed.together(lambda: checkpoint.clear_out_dir(cfg["out_dir"]) if rank == 0 else None,
                             rank, world, "clearing out_dir")
    return run


def set_up_device(name, local_rank):
    dev = common.resolve_device(name, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev


def open_data(cfg, stage, rank, world):
    """(meta.json, {split: shards.Split}) of data_dir, refused when prepared for another stage."""
    meta = shards.load_meta(cfg["data_dir"])
    stages.check_data(stage, meta["stage"], cfg["data_dir"])
    verify = cfg["verify_data"] and rank == 0  # rank 0 checks every byte; the others trust it
    splits = distributed.together(lambda: {s: shards.open_split(cfg["data_dir"], s, meta=meta, verify=verify)
                                           for s in shards.SPLITS}, rank, world, "checking the data")
    return meta, splits


def load_start(cfg, meta):
    """What the run starts from (checkpoint.Start, None from scratch), checked against the data and the config."""
    start = checkpoint.load_start(cfg)
    checkpoint.check_data_identity(cfg, meta, start)
    if start is not None and start.resumed:
        check_resumed_settings(cfg, meta, start)
    if cfg["lora_rank"] and start is None:
        fail("lora_rank > 0 trains adapters on a model: set init_from to a run or HF directory (or resume)")
    return start


def make_model(cfg, stage, meta, start, dev):
    """The model on dev: initialised from the seed, then given the starting weights (a language model's start a
    reward model, whose score head is new); LoRA: only adapters (and a new head) train."""
    torch.manual_seed(cfg["seed"])
    if start is not None and stage.head == "lm":
        checkpoint.check_head(ModelConfig(**start.model_config), cfg["init_from"], "lm")
    mcfg = checkpoint.model_config(cfg, meta, start, lora_parts(cfg["lora_targets"]), stage.head)
    if mcfg.vocab_size < meta["vocab_size"]:
        fail(f"the model's vocabulary ({mcfg.vocab_size}) does not cover the data's ({meta['vocab_size']} ids in "
             f"{cfg['data_dir']}): prepare the data with the model's tokenizer")
    raw = Transformer(mcfg)
    if start is not None:
        missing, unexpected = raw.load_state_dict(for_head(start.model, mcfg), strict=False)
        if unexpected or any(not lora_trained(k) for k in missing):  # only new adapters (or a new head) may be missing
            fail(f"the weights of {cfg['init_from']} do not fit the model (missing {missing[:3]}, unexpected "
                 f"{unexpected[:3]})")
    if cfg["lora_rank"]:  # only the adapters train; the base is frozen and stays out of the optimizer
        for name, p in raw.named_parameters():
            p.requires_grad_(lora_trained(name))
    return raw.to(dev)


def make_batches(cfg, stage, meta, splits):
    """(train Batches, val Batches or None without evaluation): rows of the stage's unit."""
    args = dict(unit=stage.unit, block_size=cfg["block_size"], batch_size=cfg["batch_size"],
                pad_id=meta["special_ids"].get("<|endoftext|>", 0), doc_mask=cfg["doc_mask"])
    train_batches = Batches(splits["train"], seed=cfg["seed"], tag_ids=meta.get("reasoning_tag_ids", ()),
                            tag_weight=cfg["think_tag_weight"], packing="epoch" if cfg["pack"] else None, **args)
    if not cfg["eval_iters"]:
        return train_batches, None
    if splits["val"].num_docs == 0:
        fail(f"{cfg['data_dir']} has no val split (prepared with val_fraction=0): prepare it again with "
             "--val_fraction=0.01 (or --val_input=FILE), or train without evaluation: --eval_iters=0")
    return train_batches, Batches(splits["val"], seed=cfg["seed"] + 1, packing="micro-batch" if cfg["pack"] else None,
                                  **args)


def frozen_reference(cfg, stage, raw, start, batches, dev, ptdtype, autocast, rank, world):
    """(losses.Reference, {"reference": where its weights came from}): a frozen copy of the starting weights (or
    their log-probs of every pair of `batches`), made before the model is wrapped; the source is saved in
    checkpoints, so that a resumed run rebuilds the same reference."""
    resumed = start is not None and start.resumed
    frozen = {"reference": start.saved.get("frozen", {}).get("reference") if resumed else
              checkpoint.weights_source(cfg["init_from"] if start is not None else "scratch", cfg["seed"])}
    reference = losses.Reference(reference_start(raw, frozen["reference"], resumed, cfg), batches, dev, autocast,
                                 rank, world, precompute=stage.precompute_reference(cfg),
                                 param_dtype=distributed.param_dtype(ptdtype, world, cfg["fsdp"]))
    return reference, frozen


def frozen_teacher(cfg, stage, raw, start, meta, dev, ptdtype, world):
    """(the frozen teacher the stage distils from, {"teacher": where its weights came from}), or (None, {}) for a
    stage without one. Its weights are bfloat16 when the run computes in bfloat16, else float32; it is sharded (and
    compiled) as the student is. The source is saved in checkpoints: a resumed run takes the same teacher, refused
    when it changed or is gone."""
    path = stage.teacher(cfg)
    if not path:
        return None, {}
    recorded = None
    if start is not None and start.resumed:
        recorded = start.saved.get("frozen", {}).get("teacher")
        if recorded is None or recorded["path"] != os.path.abspath(path):
            fail(f"teacher: the checkpoint in {cfg['out_dir']} was trained "
                 f"{'without a teacher' if recorded is None else 'with the teacher ' + recorded['path']}, not "
                 f"{os.path.abspath(path)}: resume with the teacher it started with")
    teacher, source = checkpoint.frozen_model(path, "the teacher of this run", dev,
                                              torch.bfloat16 if ptdtype == torch.bfloat16 else torch.float32,
                                              recorded=recorded)
    check_same_vocabulary(f"teacher {path}", path, (teacher.mcfg.vocab_size, raw.mcfg.vocab_size), "the student",
                          cfg["data_dir"] if meta.get("tokenizer_sha256") else None)
    return distributed.wrap_frozen(teacher, ptdtype, world, cfg["fsdp"], cfg["compile"], cfg["compile_mode"]), {
        "teacher": source}


def add_text_and_tasks(run, meta):
    """The tokenizer's bytes per token (val_bpb), what the stage's steps need besides (grpo: the reward), and the
    eval_tasks scorer."""
    cfg = run.cfg
    tokenizer = load_tokenizer(cfg["data_dir"]) if meta.get("tokenizer_sha256") else None  # bench.py's: random ids
    if tokenizer is not None:
        run.token_bytes = torch.from_numpy(tokenizer.token_bytes()).to(run.device)
    if run.stage.setup is not None:
        run.stage.setup(run, tokenizer)
    if cfg["eval_tasks"]:
        import eval as benchmarks  # lm-evaluation-harness, imported only when asked for

        if tokenizer is None:
            fail(f"eval_tasks needs text: {cfg['data_dir']} has no tokenizer")
        run.tasks = benchmarks.TrainingTasks(cfg, run.rank, run.world, run.device, run.ptdtype)


def restore(run, saved):
    """A resumed run's state from its checkpoint: weights and optimizer (each rank its shard under FSDP), the loss
    scale, the iteration and the best val loss."""
    distributed.load_full_state_dicts(run.model, run.optimizer, saved["model"], saved["optimizer"])
    if saved["scaler"]:  # empty when the checkpoint was not trained in float16: the scaler starts fresh
        run.scaler.load_state_dict(saved["scaler"])
    run.start_iter, run.resumed = int(saved["iter"]), True
    run.best_val_loss = float(saved.get("best_val_loss", float("inf")))


def read_faults():
    """The faults TRAIN_FAULTS asks to inject (the module docstring); {} when it is not set."""
    text = os.environ.get("TRAIN_FAULTS", "").strip()
    try:
        faults = ast.literal_eval(text) if text else {}
    except (ValueError, SyntaxError):
        faults = None
    if not isinstance(faults, dict) or not set(faults) <= set(FAULTS):
        fail(f"TRAIN_FAULTS={text!r}: expected a dict with keys among {', '.join(FAULTS)} (fault injection for tests)")
    return faults


def check_resumed_settings(cfg, meta, start):
    """A resumed run goes on as the run it resumes: what decides its model, reference or batches (RESUME_FIXED, the
    data's content) is the checkpoint's, else one line naming the key and both values."""
    saved, where = start.saved.get("config", {}), cfg["out_dir"]
    trained_with = saved.get("optimizer", "adamw")  # a checkpoint from before optimizer existed: AdamW's state
    if trained_with != cfg["optimizer"] and not cfg["lora_rank"]:  # (adapters train with AdamW either way)
        fail(f"optimizer: the checkpoint in {where} was trained with optimizer={trained_with}, not {cfg['optimizer']}, "
             f"whose state it does not hold: resume with --optimizer={trained_with}, or start a new run from its "
             f"weights with --init_from={where} (and another out_dir)")
    for key in sorted(RESUME_FIXED & saved.keys()):
        if saved[key] != cfg[key]:
            fail(f"{key}: the checkpoint in {where} was trained with {key}={saved[key]!r}, not {cfg[key]!r}: resume "
                 "with the settings that decide the model, the reference and the batches unchanged")
    theirs, ours = start.data.get("shards_sha256"), checkpoint.data_identity(cfg, meta)["shards_sha256"]
    if theirs and theirs != ours:
        fail(f"data_dir: {cfg['data_dir']} does not hold the data the checkpoint in {where} was trained on (shards "
             f"sha256 {ours[:12]}, not {theirs[:12]}: prepared again, or another set); resume on that data")


def reference_start(raw, source, resumed, cfg):
    """The weights the reference freezes: those the run starts from, the model itself before its first step; for a
    resumed run, rebuilt from where its checkpoint says they came from (refused when gone or changed)."""
    if not resumed:
        return raw
    if source is None:
        fail(f"the checkpoint in {cfg['out_dir']} does not record where the {cfg['stage']} reference came from (saved "
             "by an older version): start the run again")
    model = Transformer(raw.mcfg)
    model.load_state_dict(checkpoint.frozen_weights(source, raw.mcfg, f"the reference of this {cfg['stage']} run"))
    return model.to(next(raw.parameters()).device)


def check_optimizer(cfg):
    """The optimizer keys on their own; group_lr and group_weight_decay are checked against the model's groups
    when the optimizer is built (optimizers.check_group_keys), still before any step."""
    if cfg["optimizer"] not in optimizers.OPTIMIZERS:
        fail(f"optimizer must be one of {', '.join(optimizers.OPTIMIZERS)}, got {cfg['optimizer']!r}")
    if not cfg["muon_lr"] > 0 or not 0 <= cfg["muon_momentum"] < 1:
        fail(f"muon_lr must be > 0 and muon_momentum in [0, 1), got {cfg['muon_lr']} and {cfg['muon_momentum']}")
    if cfg["muon_adjust_lr"] not in optimizers.ADJUST_LR:
        fail(f"muon_adjust_lr must be one of {', '.join(optimizers.ADJUST_LR)}, got {cfg['muon_adjust_lr']!r}")


def check_config(cfg, stage, world):
    """Impossible combinations: one clear line, exit 2, before any work. The stage checks its own keys."""
    if cfg["dtype"] not in ("auto", *common.DTYPES):
        fail(f"dtype must be auto, bfloat16, float16 or float32, got {cfg['dtype']!r}")
    if cfg["lr_schedule"] not in ("cosine", "wsd"):
        fail(f"lr_schedule must be cosine or wsd, got {cfg['lr_schedule']!r}")
    if cfg["gradient_accumulation_steps"] % world:
        fail(f"gradient_accumulation_steps ({cfg['gradient_accumulation_steps']}) must be divisible by the "
             f"number of processes ({world}): it counts micro-batches over all ranks")
    if min(cfg["batch_size"], cfg["block_size"], cfg["gradient_accumulation_steps"], cfg["max_iters"]) < 1:
        fail("batch_size, block_size, gradient_accumulation_steps and max_iters must be >= 1")
    if cfg["compile_mode"] not in COMPILE_MODES:
        fail(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {cfg['compile_mode']!r}")
    if cfg["fsdp"] and world == 1:
        fail("fsdp=True shards the model over processes: launch with torchrun --nproc_per_node=N (N >= 2)")
    for key in ("eval_interval", "log_interval"):
        if cfg[key] < 1:
            fail(f"{key} must be >= 1, got {cfg[key]}")
    if cfg["eval_iters"] < 0:
        fail(f"eval_iters must be >= 0 (0: no evaluation), got {cfg['eval_iters']}")
    if cfg["eval_tasks"]:
        if cfg["eval_tasks_interval"] < 1 or cfg["eval_tasks_limit"] < 0:
            fail("eval_tasks_interval must be >= 1 (0: every eval_interval) and eval_tasks_limit >= 0 (0: every item)")
        if stage.head != "lm":
            fail(f"eval_tasks scores a language model; stage {stage.name} trains a reward model (its val_accuracy is "
                 "its evaluation)")
        if cfg["fsdp"] and world > 1:
            fail("eval_tasks with fsdp=True: the ranks score different items, which a sharded model cannot do; "
                 "evaluate the checkpoints with eval.py instead")
    if not cfg["dist_timeout_s"] > 0:
        fail(f"dist_timeout_s must be > 0 seconds, got {cfg['dist_timeout_s']}")
    if cfg["checkpoint_interval"] < 0 or cfg["keep_last"] < 0:
        fail("checkpoint_interval (0: every eval_interval) and keep_last must be >= 0")
    if not cfg["learning_rate"] > 0 or min(cfg["min_lr"], cfg["weight_decay"], cfg["grad_clip"]) < 0:
        fail("learning_rate must be > 0; min_lr, weight_decay and grad_clip (0: no clipping) must be >= 0")
    check_optimizer(cfg)
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
    stage.check(cfg)
    if cfg["lora_rank"] < 0 or (cfg["lora_rank"] and not (cfg["lora_alpha"] > 0 and 0 <= cfg["lora_dropout"] < 1)):
        fail("lora_rank must be >= 0 (0: no adapters); with adapters lora_alpha > 0 and lora_dropout in [0, 1)")
    if cfg["lora_rank"] and not stage.lora:
        fail(f"lora_rank > 0 adapts a trained model: use it for "
             f"{', '.join(s.name for s in stages.STAGES.values() if s.lora)}, not {stage.name}")
    if cfg["lora_rank"]:
        lora_parts(cfg["lora_targets"])
    if cfg["pack"] not in (True, False):
        fail(f"pack must be True, False or None (None: the stage's default), got {cfg['pack']!r}")
    if cfg["pack"] and not stage.packs:
        fail(f"pack=True packs {'/'.join(s.name for s in stages.STAGES.values() if s.packs)} documents; stage "
             f"{stage.name} " + ("rows are windows of the token stream: doc_mask=True keeps its documents apart"
                                 if stage.unit == "window" else f"rows stay one {stage.unit} each: set pack=False"))
    if cfg["doc_mask"] and stage.unit != "window":
        fail(f"doc_mask=True is for {'/'.join(s.name for s in stages.STAGES.values() if s.unit == 'window')} "
             f"windows; stage {stage.name} rows are documents already (pack=True packs documents, each kept apart)")
    stages.check_keys(stage, cfg, _DEFAULTS)
    # the model shape as far as the config decides it (a checkpoint being continued decides the rest)
    shape = {"dim": cfg["dim"], "n_heads": cfg["n_heads"], "n_kv_heads": cfg["n_kv_heads"] or None}
    try:
        ModelConfig(rope_scaling=scaling, **(shape if cfg["init_from"] == "scratch" else {}))
    except ValueError as e:
        fail(str(e))


# -----------------------------------------------------------------------------
# small pieces


def lr_at(it, cfg):
    """Linear warmup, then cosine (or WSD: stable, then linear over the last wsd_decay_frac) down to min_lr."""
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


def lora_parts(spec):
    """The projections a lora_targets value names (model.LORA_PARTS), or one line naming what matched nothing."""
    groups = {"attention": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down"), "all": LORA_PARTS}
    parts = []
    for name in (s.strip() for s in spec.split(",")):
        if name not in groups and name not in LORA_PARTS:
            fail(f"lora_targets {spec!r}: {name!r} matches no projection (give attention, mlp, all, or some of "
                 f"{', '.join(LORA_PARTS)})")
        parts += [p for p in groups.get(name, (name,)) if p not in parts]
    return tuple(parts)


def print_plan(run):
    if run.rank != 0:
        return
    cfg, raw = run.cfg, run.raw_model
    trainable = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    lora = (f", LoRA rank {raw.mcfg.lora_rank} on {'/'.join(raw.mcfg.lora_targets)} of {run.lora_base['path']}"
            if run.lora_base else "")
    print(f"model: {raw.num_params() / 1e6:.2f}M parameters ({trainable / 1e6:.3f}M trainable{lora}), "
          f"{raw.mcfg.n_layers} layers, dim {raw.mcfg.dim}, vocab {raw.mcfg.vocab_size}; device {run.device}, "
          f"{common.dtype_name(run.ptdtype)}, {run.world} process(es){', FSDP' if run.fsdp else ''}")
    print("optimizer: " + ", ".join(f"{s['name']} {'Muon' if s['kind'] == 'muon' else 'AdamW'} lr {s['lr']:g} "
                                    f"wd {s['weight_decay']:g}" for s in run.optimizer.specs), flush=True)
    if not cfg["eval_iters"]:
        print("no evaluation (eval_iters=0): no val figures, and no best val loss in the checkpoints", flush=True)
    first, *rest = run.stage.plan(run)
    for line in [first + (f", resuming at step {run.start_iter}" if run.resumed else ""), *rest]:
        print(line, flush=True)


def prepare_out_dir(run):
    """Rank 0: the run directory with the config and the tokenizer (a run directory is self-contained)."""
    if run.rank != 0:
        return
    configurator.print_config(run.cfg)
    try:
        os.makedirs(run.cfg["out_dir"], exist_ok=True)
    except OSError as e:
        fail(f"cannot create out_dir '{run.cfg['out_dir']}': {e.strerror}")
    checkpoint.copy_tokenizer(run.cfg["data_dir"], run.cfg["out_dir"])
    write_json(os.path.join(run.cfg["out_dir"], "config.json"), run.cfg)


def stop_on_collective_failure(cfg, phase, error):
    """One line for a collective that failed or timed out, then exit 3 at once: waiting on would hang."""
    rank, world = distributed.rank_and_world()
    reason = re.sub(r"^\[[^]]*\]\s*", "", str(error).strip().splitlines()[0])[:160]  # without gloo's file:line
    print(f"error: rank {rank} of {world}: a collective did not complete during {phase} "
          f"({reason}): another process is stuck or gone "
          f"(dist_timeout_s={cfg['dist_timeout_s']:g}). The last good checkpoint is in {cfg['out_dir']}; "
          "resume with --init_from=resume", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(3)  # not sys.exit: tearing down a process group whose peer is stuck can block


def request_stop(run, signum):
    run.stop_requested = True
    print(f"\nsignal {signal.Signals(signum).name}: saving a checkpoint after this step, then exiting", flush=True)


if __name__ == "__main__":
    main()
