"""
The stages train.py runs, each defined once, here: what prepare.py makes of a record, what a row holds, the loss
and its statistics, the evaluation figures, the frozen second model it needs, the plan line, and the config keys
only it uses. train.py and prepare.py look a stage up once (get) and ask it; the batcher (data/batches.py) and the
losses (training/losses.py) take what it says as arguments. Adding a stage is one more Stage in STAGES plus its
tests: the training loop does not change.

A Stage is plain data and plain functions: no classes to derive from, nothing registers itself.

What a row holds (Stage.unit) decides the rest of the batch: a "window" of block_size+1 tokens of the token stream;
a "document" from its start (padded, or packed with others when the stage packs); a "pair", chosen and rejected
documents in two rows (or, packed, whole pairs together in rows twice as long), whose loss is a mean over pairs
(losses.target_count) and whose val_bpb counts the chosen replies. A stage that samples its own rows from the model
(grpo's rollouts) says so with `sample`.

A stage trains on data prepared for any stage whose records are its kind (check_data): rm reads the pairs prepared
for dpo, and prepare.py --stage=rm makes the same set.
"""

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from configurator import fail
from llm_trainer.core import checkpoint, common
from llm_trainer.data.batches import positions_per_row
from llm_trainer.data.records import as_prompt, as_task
from llm_trainer.inference.tools import Tools
from llm_trainer.training import grpo, losses
from llm_trainer.training.rewards import RM_PREFIX, TEACHER, Reward, load_reward_model, parse, teacher_term


def _never(cfg):
    return False


def _always(cfg):
    return True


def _no_checks(cfg):
    pass


def _one_update(cfg):
    return 1


def _no_stats(cfg):
    return ()


def _no_teacher(cfg):
    return ""


def _loss_nats(val_sums):
    return val_sums["loss"]


def _means(means):
    return means


@dataclass(frozen=True)
class Stage:
    """One stage. The callables take train.Run (run), a resolved config (cfg) or a batches.Batch (batch)."""

    name: str
    record_kind: str  # prepare.py: the records (records.detect_record) a set of this stage holds; stage=auto picks it
    unit: str  # what a row holds: "window", "document" or "pair" (the module docstring)
    loss: Callable  # (run, batch, split) -> (summed loss, {statistic: sum}) of a micro-batch (training/losses.py)
    plan: Callable  # (run) -> the lines the run's plan prints for the stage, the first one its steps
    stats: Callable = _no_stats  # (cfg) -> the statistics loss reports: logged, and means over the targets in evaluation
    summary: Callable = _means  # (those means) -> the figures logged for them (rm: the scores' std from two moments)
    logged: tuple = ()  # the names of summary's figures, when they are not the stats' own
    keys: tuple = ()  # config keys of this stage only: another stage refuses them set away from their default
    requires: dict = field(default_factory=dict)  # {key: the key without which it does nothing}: set alone, refused
    fixed_on_resume: tuple = ()  # of those, the ones that decide the model, the reference or the batches
    record_converters: dict = field(default_factory=dict)  # prepare.py: other record kinds taken, made this kind
    mixes_text: bool = False  # prepare.py allow_mixed=True keeps plain-text records, every token a target
    any_data: bool = False  # trains on a set prepared for any stage (its tokens); else only on its own stage's
    packs: bool = False  # pack=True (its default) packs whole documents (of a pair unit: whole pairs) into each row
    lora: bool = True  # lora_rank > 0: adapters on a trained model
    head: str = "lm"  # what the model ends in (model.HEADS): next-token logits, or a reward model's score
    needs_reference: Callable = _never  # (cfg): a frozen copy of the starting weights beside the policy
    teacher: Callable = _no_teacher  # (cfg) -> the directory of the frozen teacher it distils from, "" for none
    precompute_reference: Callable = _never  # (cfg): the reference's log-probs computed once instead of a model
    bpb_nats: Optional[Callable] = _loss_nats  # (val sums) -> the nats of the targets whose bytes val_bpb divides
    # by; None: no val_bpb (a reward model models no text)
    sample: Optional[Callable] = None  # (run, it) -> (batch counts, micro-batches, logged figures): rows sampled
    updates: Callable = _one_update  # (cfg) -> optimizer updates on each step's sampled rows
    figures: tuple = ()  # the names of sample's logged figures
    evaluate: Optional[Callable] = None  # (run) -> val figures; None: the loss over eval_iters val micro-batches
    setup: Optional[Callable] = None  # (run, tokenizer): what else its steps need, set on the run
    check: Callable = _no_checks  # (cfg): settings this stage cannot run with: one line, exit 2


# -----------------------------------------------------------------------------
# the pieces the definitions name


def lm_loss(run, batch, split):
    """Validation counts every target once (no reasoning-tag weight)."""
    return losses.lm_loss(run.model, batch, weighted=split == "train")


def sft_loss(run, batch, split):
    """Plain SFT, or distilled from the run's teacher (validation: the plain cross-entropy, with the teacher's
    figures beside it)."""
    if run.teacher is None:
        return lm_loss(run, batch, split)
    cfg = run.cfg
    return losses.distill_loss(run.model, run.teacher, batch, cfg["kd_loss"], cfg["kd_temperature"], cfg["kd_weight"],
                               cfg["kd_chunk"], weighted=split == "train")


def dpo_loss(run, batch, split):
    cfg = run.cfg
    return losses.dpo_loss(run.model, batch, run.reference.logps(batch, split), cfg["dpo_beta"], cfg["dpo_loss"],
                           cfg["dpo_label_smoothing"])


def rm_loss(run, batch, split):
    """The margins, where the data gives them, are looked up by pair (run.margins, set by rm_setup)."""
    margins = run.margins[split][batch.units] if run.margins else torch.zeros(len(batch.units), device=batch.x.device)
    return losses.rm_loss(run.model, batch, run.train_batches.pad_id, margins, run.cfg["center_rewards_coefficient"])


def grpo_loss(run, batch, split):
    cfg = run.cfg
    return losses.grpo_loss(run.model, batch, cfg["temperature"], cfg["grpo_clip"], cfg["grpo_kl"])


def chosen_nats(val_sums):
    """DPO's val_bpb: the chosen replies' negative log-likelihood, over their bytes."""
    return -val_sums["logps/chosen"]


def no_dropout(cfg):
    if cfg["dropout"] > 0:
        fail(f"{cfg['stage']} needs dropout=0: the policy and the reference (or the rollout policy) must agree")


def check_dpo(cfg):
    no_dropout(cfg)
    if cfg["dpo_loss"] not in ("sigmoid", "ipo"):
        fail(f"dpo_loss must be sigmoid or ipo, got {cfg['dpo_loss']!r}")


def check_model_dir(path, key):
    """A frozen model (a teacher, a reward model) must be a model, named before any work starts."""
    if not (os.path.isdir(path) and checkpoint.holds_model(path)):
        fail(f"{key}: {path!r} holds no model (a run directory with {checkpoint.CKPT_NAME}, or an HF Llama directory "
             "with config.json and *.safetensors)")


def check_sft(cfg):
    if not 0 <= cfg["kd_weight"] <= 1:
        fail(f"kd_weight must be in [0, 1] (the loss is (1 - kd_weight) CE + kd_weight KD), got {cfg['kd_weight']}")
    if not cfg["kd_temperature"] > 0:
        fail(f"kd_temperature must be > 0, got {cfg['kd_temperature']}")
    if cfg["kd_loss"] not in losses.KD_KINDS:
        fail(f"kd_loss must be one of {', '.join(losses.KD_KINDS)}, got {cfg['kd_loss']!r}")
    if cfg["kd_chunk"] < 0:
        fail(f"kd_chunk must be >= 0 (positions per chunk; 0: all at once), got {cfg['kd_chunk']}")
    if cfg["teacher"]:
        check_model_dir(cfg["teacher"], "teacher")


def grpo_teacher(cfg):
    """The directory of the reward's teacher:DIR term, or ""."""
    term = teacher_term(cfg["reward"])
    return term[1] if term else ""


def check_grpo(cfg):
    no_dropout(cfg)
    teacher_alone = all(name.startswith(TEACHER) for _, name in parse(cfg["reward"]))
    if cfg["grpo_group"] < (1 if teacher_alone else 2) or cfg["grpo_epochs"] < 1 or cfg["max_new_tokens"] < 1:
        fail("grpo_group must be >= 2 (advantages compare a group's completions; 1 is enough for a reward that is a "
             "teacher alone, which grades each token), grpo_epochs and max_new_tokens >= 1")
    if term := teacher_term(cfg["reward"]):  # an empty DIR too: else the term would vanish, and the reward with it
        check_model_dir(term[1], f"reward {cfg['reward']!r}")
    for _, name in parse(cfg["reward"]):  # each reward model's, as the teacher's
        if name.startswith(RM_PREFIX):
            check_model_dir(name[len(RM_PREFIX):], f"reward {cfg['reward']!r}")
    if not cfg["temperature"] > 0 or not 0 < cfg["top_p"] <= 1 or not cfg["grpo_clip"] > 0 or cfg["grpo_kl"] < 0:
        fail("grpo samples: temperature must be > 0, top_p in (0, 1], grpo_clip > 0, grpo_kl >= 0")
    if cfg["max_new_tokens"] >= cfg["block_size"]:
        fail(f"max_new_tokens ({cfg['max_new_tokens']}) leaves no room for a prompt in block_size {cfg['block_size']}")
    if cfg["grpo_tool_calls"] < 1:
        fail("grpo_tool_calls must be >= 1 (calls run per completion, with grpo_tools)")


def check_rm(cfg):
    if cfg["center_rewards_coefficient"] < 0:
        fail(f"center_rewards_coefficient must be >= 0 (0: off), got {cfg['center_rewards_coefficient']}")


def rm_setup(run, tokenizer):
    """Each pair's margin, per split, from a set prepared with a margin column (prepare.py keeps it in the .ref
    sidecar); None without one (every margin 0)."""
    batches = {"train": run.train_batches, "val": run.val_batches}
    run.margins = {split: torch.tensor([r["margin"] for r in b.split.refs[0::2]], device=run.device)
                   for split, b in batches.items() if b is not None and b.split.refs is not None} or None


def grpo_setup(run, tokenizer):
    """Completions are decoded for the reward, which the config names, as are the tools the policy may call. The
    reward's models are loaded frozen (a resumed run: from the sources its checkpoint recorded, unchanged), recorded
    in run.frozen; a reward that reads reference answers is refused on prompts prepared without them."""
    cfg, recorded, sources = run.cfg, run.frozen.get("reward_models", {}), {}

    def load(path):
        source = recorded.get(os.path.abspath(path)) if run.resumed else None
        model, sources[os.path.abspath(path)] = load_reward_model(
            path, cfg["data_dir"], run.raw_model.mcfg.vocab_size, run.device, run.ptdtype, run.autocast,
            run.train_batches.pad_id, source)
        return model

    run.tokenizer, run.reward = tokenizer, Reward(cfg["reward"], load)
    run.tools = Tools(cfg["grpo_tools"]) if cfg["grpo_tools"] else None
    run.frozen.pop("reward_models", None)  # (what a resumed run's checkpoint recorded: these replace it)
    if sources:
        run.frozen["reward_models"] = sources
    val = run.val_batches  # an evaluation scores eval_iters micro-batches of prompts, each prompt at most once
    if val is not None and cfg["eval_iters"] * val.B > val.n_units:
        fail(f"eval_iters {cfg['eval_iters']} x batch_size {val.B} held-out prompts, and {cfg['data_dir']} (val) holds "
             f"{val.n_units:,}: some would be counted twice; set eval_iters * batch_size <= {val.n_units:,}")
    readers = run.reward.needs_reference
    for batches in (run.train_batches, run.val_batches):
        missing = sum(r["answer"] is None for r in batches.split.refs) if batches is not None else 0
        if readers and missing:
            fail(f"reward {cfg['reward']!r}: {', '.join(readers)} reads reference answers, and {missing:,} prompts "
                 f"of {cfg['data_dir']} ({batches.split.name}) have none (prepared from prompts alone): use a reward "
                 "that needs none (rm:DIR, think_format; a function of yours with needs_reference = False)")


def tokens_per_step(cfg):
    """Positions computed per optimizer step, padding included: batch_size x the positions of a row (of the two rows
    of an unpacked pair) x micro-steps; None for a stage that samples its rows, as long as their prompt and
    completion."""
    stage = get(cfg["stage"])
    if stage.sample is not None:
        return None
    per_row = positions_per_row(stage.unit, cfg["block_size"], cfg["pack"])
    return cfg["batch_size"] * per_row * cfg["gradient_accumulation_steps"]


def plan_rows(run):
    """The plan of a stage that reads its rows: tokens per step, and how full and how cut the rows are."""
    cfg, batches, unit = run.cfg, run.train_batches, run.stage.unit
    rows = (f"{cfg['batch_size']} rows x {positions_per_row(unit, cfg['block_size'], True)} (whole pairs, "
            f"2 x (block_size+1))" if unit == "pair" and cfg["pack"] else
            f"{cfg['batch_size']} pairs x 2 rows (chosen, rejected) x {cfg['block_size']}" if unit == "pair" else
            f"{cfg['batch_size']} rows x {cfg['block_size']}")
    steps = (f"stage {cfg['stage']}: {tokens_per_step(cfg):,} tokens per optimizer step "
             f"({rows} x {cfg['gradient_accumulation_steps']} micro-steps), {cfg['max_iters']} steps")
    layout = ("packed" if cfg["pack"] else "documents kept apart" if cfg["doc_mask"]
              else "one unit per row" if unit != "window" else "windows of the token stream")
    cut = (f"; {batches.truncated:,} of {batches.split.num_docs:,} documents are longer than block_size+1 = "
           f"{cfg['block_size'] + 1} and cut" if unit != "window" else "")
    if run.stage.head == "score":  # a score is read at a row's last input, so block_size+1 tokens lose their last too
        longer = int((batches.split.doc_ends - batches.split.doc_starts > cfg["block_size"]).sum())
        cut = (f"; {longer:,} of {batches.split.num_docs:,} documents are longer than block_size = {cfg['block_size']}: "
               f"each is scored at its token {cfg['block_size']}, not at its last")
    if unit == "pair":
        cut += (f"; {batches.untargeted:,} of {batches.n_units:,} pairs have a prompt that fills the row, no reply "
                "token left: they are left out of the loss")
    return [steps, f"rows: {layout}, fill {batches.expected_fill():.1%} (real tokens / computed positions), "
                   f"{batches.rows_per_epoch():,} rows per epoch{cut}"]


def plan_rollouts(run):
    cfg = run.cfg
    tools = (f"; tools {', '.join(run.tools.functions)}, {cfg['grpo_tool_calls']} call(s) per completion at most"
             if run.tools else "")
    lines = [f"stage {cfg['stage']}: {cfg['batch_size']} prompts x {cfg['grpo_group']} completions of at most "
             f"{cfg['max_new_tokens']} tokens x {cfg['gradient_accumulation_steps']} micro-steps per rollout batch, "
             f"{cfg['grpo_epochs']} update(s) on each, {cfg['max_iters']} steps; "
             f"{run.train_batches.split.num_docs:,} prompts; reward {cfg['reward']}{tools}"]
    if run.teacher is not None:
        lines.append(teacher_line(run, f"every completion token's advantage adds {run.reward.teacher[0]:g} x "
                                       "(log p_teacher - log p) of the token sampled"))
    for path, reward_model in run.reward.reward_models.items():
        lines.append(frozen_line(f"reward model rm:{path}", reward_model.model, cfg["block_size"],
                                 "scores each completion with its prompt, at its last token"))
    return lines


def plan_sft(run):
    cfg, lines = run.cfg, plan_rows(run)
    if run.teacher is not None:
        lines.append(teacher_line(run, f"loss (1 - {cfg['kd_weight']:g}) x CE + {cfg['kd_weight']:g} x "
                                       f"{cfg['kd_loss']} at temperature {cfg['kd_temperature']:g} (x T^2) on the same "
                                       f"targets, weighted alike; {cfg['kd_chunk'] or 'all'} positions per chunk"))
    return lines


def teacher_line(run, how):
    """The plan's line for the run's frozen teacher: what it is, and how it teaches."""
    return frozen_line(f"teacher: {run.frozen['teacher']['path']}", run.teacher, run.cfg["block_size"], how)


def frozen_line(what, model, block, how):
    """The plan's line for a frozen model beside the one trained (a teacher, a reward model): what it is, whether
    the run's rows are longer than it was trained on, and how it is used."""
    mcfg = model.mcfg
    short = (f"; trained at {mcfg.max_seq_len} positions, beyond which it extrapolates (block_size {block})"
             if block > mcfg.max_seq_len else "")
    return (f"{what}, {model.num_params() / 1e6:.2f}M parameters ({mcfg.n_layers} layers, dim {mcfg.dim}), frozen, "
            f"{common.dtype_name(next(model.parameters()).dtype)}{short}; {how}")


# -----------------------------------------------------------------------------
# the stages

STAGES = {s.name: s for s in (
    Stage(name="pretrain", record_kind="text", unit="window", loss=lm_loss, any_data=True, lora=False,
          keys=("doc_mask", "think_tag_weight"), fixed_on_resume=("doc_mask", "think_tag_weight"), plan=plan_rows),
    Stage(name="sft", record_kind="chat", unit="document", loss=sft_loss, mixes_text=True, packs=True,
          keys=("think_tag_weight", "teacher", "kd_weight", "kd_temperature", "kd_loss", "kd_chunk"),
          requires={k: "teacher" for k in ("kd_weight", "kd_temperature", "kd_loss", "kd_chunk")},
          fixed_on_resume=("think_tag_weight", "teacher"), teacher=lambda cfg: cfg["teacher"],
          stats=lambda cfg: losses.KD_STATS if cfg["teacher"] else (), check=check_sft, plan=plan_sft),
    Stage(name="dpo", record_kind="pair", unit="pair", loss=dpo_loss, stats=lambda cfg: losses.DPO_STATS,
          keys=("dpo_beta", "dpo_loss", "dpo_label_smoothing", "dpo_precompute_ref"), packs=True,
          needs_reference=_always, precompute_reference=lambda cfg: cfg["dpo_precompute_ref"], bpb_nats=chosen_nats,
          check=check_dpo, plan=plan_rows),
    Stage(name="rm", record_kind="pair", unit="pair", loss=rm_loss, head="score", stats=lambda cfg: losses.RM_STATS,
          summary=losses.rm_figures, logged=losses.RM_FIGURES, keys=("center_rewards_coefficient",), bpb_nats=None,
          packs=True, setup=rm_setup, check=check_rm, plan=plan_rows),
    Stage(name="grpo", record_kind="task", unit="document", loss=grpo_loss, teacher=grpo_teacher,
          stats=lambda cfg: losses.GRPO_STATS + (losses.TEACHER_STATS if grpo_teacher(cfg) else ()),
          # a chat's last reply is the task's reference answer; a prompt alone has none
          record_converters={"chat": as_task, "prompt": as_prompt},
          keys=("reward", "grpo_group", "grpo_epochs", "grpo_clip", "grpo_kl", "grpo_std_norm", "temperature",
                "top_p", "max_new_tokens", "grpo_tools", "grpo_tool_calls"),
          fixed_on_resume=("grpo_kl", "grpo_group", "max_new_tokens", "temperature", "top_p", "grpo_tools",
                           "grpo_tool_calls"),
          needs_reference=lambda cfg: cfg["grpo_kl"] > 0, sample=grpo.rollouts, updates=lambda cfg: cfg["grpo_epochs"],
          figures=grpo.FIGURES, evaluate=grpo.evaluate, setup=grpo_setup, check=check_grpo, plan=plan_rollouts),
)}

# keys that decide the model, the reference or the batches, of any stage: a resumed run keeps them (train.py)
FIXED_ON_RESUME = frozenset(k for s in STAGES.values() for k in s.fixed_on_resume)


def get(name):
    """The stage named `name`, or one line listing the stages."""
    if name not in STAGES:
        fail(f"stage must be one of {', '.join(STAGES)}, got {name!r}")
    return STAGES[name]


def of_record_kind(kind):
    """The first stage whose sets hold records of this kind (prepare.py stage=auto: pairs are dpo's)."""
    return next(s for s in STAGES.values() if s.record_kind == kind)


def check_data(stage, prepared_for, data_dir):
    """A stage trains on a set prepared for a stage of its record kind (rm on dpo's pairs, dpo on rm's), or on any
    set when any_data; else one line."""
    if stage.any_data or (prepared_for in STAGES and STAGES[prepared_for].record_kind == stage.record_kind):
        return
    fail(f"{data_dir} was prepared for stage {prepared_for!r}, not {stage.name!r} (prepare.py --stage={stage.name})")


def check_keys(stage, cfg, defaults):
    """A key only other stages use, or one of this stage's without the key it needs, set away from its default,
    would be ignored: refuse it, naming it."""
    for other in STAGES.values():
        for key in other.keys:
            if key not in stage.keys and cfg[key] != defaults[key]:
                fail(f"{key}={cfg[key]!r} is a setting of stage {other.name}; stage {stage.name} does not use it "
                     "(leave it at its default)")
    for key, needed in stage.requires.items():
        if cfg[key] != defaults[key] and cfg[needed] == defaults[needed]:
            fail(f"{key}={cfg[key]!r} does nothing without {needed}: set {needed} too, or leave {key} at its default")
