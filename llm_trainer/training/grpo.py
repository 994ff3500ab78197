"""
The grpo stage's batches: rollouts. For each prompt of a micro-batch (a prompt of the prepared grpo
set, rendered up to the assistant's header), grpo_group completions are sampled together with the
KV-cache generator, scored by the reward (llm_trainer/training/rewards.py: functions against the prompt's reference
answer, a reward model on the conversation), and
turned into training rows (prompt + completion; targets on the completion only) that carry each
completion's advantage: its reward minus its group's mean (divided by the group's std when
grpo_std_norm). losses.grpo_loss is what the rows are trained on.

A rollout is a pure function of (seed, global micro-batch, weights): the sampler's generator is seeded
by the micro-batch number, so a resumed run samples the same completions, and N ranks sample what
one process sampling every micro-batch would. Generation keeps every rank in step (the rule in
llm_trainer/core/distributed.py): all ranks decode until all are done.
"""

import time

import numpy as np
import torch

from llm_trainer.core import distributed
from llm_trainer.training import losses
from llm_trainer.data.batches import Batch
from llm_trainer.inference.generation import chat_stop_ids, completion_text
from llm_trainer.training.rewards import conversation, exact_answer

# per-rollout figures, summed over micro-batches and ranks before they are logged
ROLLOUT_SUMS = ("reward", "reward_sq", "correct", "answered", "rm_score", "rm_scored", "completions",
                "completion_tokens", "no_signal_groups", "groups", "gen_s")
# logged per step; accuracy (exact answers) where the prompts have references, rm_score (the reward models' raw
# score, before its weight) where the reward has an rm: term
FIGURES = ("reward", "reward_std", "accuracy", "rm_score", "no_signal", "completion_len", "gen_s")


def advantages(rewards, group, std_norm=True):
    """(N,) advantages of rewards (N,) in consecutive groups of `group`: reward minus the group's mean, divided by
    the group's standard deviation (plus 1e-6) when std_norm."""
    r = rewards.view(-1, group)
    a = r - r.mean(dim=1, keepdim=True)
    if std_norm:
        a = a / (r.std(dim=1, unbiased=False, keepdim=True) + 1e-6)
    return a.reshape(-1)


def generate(run, prompts, greedy=False, seed=0):
    """Completions (token lists, a final stop token kept) of prompts (token lists), every rank decoding in step."""
    cfg, model = run.cfg, run.raw_model
    gen = torch.Generator(run.device).manual_seed(seed)
    stop = chat_stop_ids(run.tokenizer)
    model.eval()
    with run.autocast:
        out = model.generate_batch(prompts, cfg["max_new_tokens"], temperature=0.0 if greedy else cfg["temperature"],
                                   top_p=cfg["top_p"], stop_ids=stop, generator=gen, max_len=cfg["block_size"],
                                   pad_id=run.train_batches.pad_id,
                                   all_done=lambda done: not distributed.any_rank(not bool(done.all()), run.world))
    model.train()
    return out


def rollout(run, batches, g, group, greedy=False):
    """(Batch on the device, {ROLLOUT_SUMS}) of global micro-batch g of `batches`: `group` completions per prompt."""
    cfg, tok = run.cfg, run.tokenizer
    docs = [batches.unit(g * batches.B + r) for r in range(batches.B)]
    prompts = [batches.split.document(d)[0].tolist() for d in docs]
    t0 = time.perf_counter()
    completions = generate(run, [p for p in prompts for _ in range(group)], greedy, seed=cfg["seed"] * 1_000_003 + g)
    gen_s = time.perf_counter() - t0
    refs = [batches.split.refs[d] for d in docs for _ in range(group)]
    texts = [completion_text(tok, c, chat_stop_ids(tok)) for c in completions]
    chats = ([conversation(tok, prompts[i // group], c) for i, c in enumerate(completions)]
             if run.reward.reward_models else None)
    scored, raw = distributed.together(lambda: run.reward.score([r["prompt"] for r in refs], texts,
                                                                [r["answer"] for r in refs], chats),
                                       run.rank, run.world, "the reward function")
    rewards = torch.tensor(scored, dtype=torch.float32)
    answered = [(r, t) for r, t in zip(refs, texts) if r["answer"] is not None]
    spread = rewards.view(-1, group)
    sums = {"reward": float(rewards.sum()), "reward_sq": float((rewards**2).sum()),
            "correct": sum(exact_answer(r["prompt"], t, r["answer"]) for r, t in answered), "answered": len(answered),
            "rm_score": sum(raw or ()), "rm_scored": len(raw or ()),
            "completions": len(texts), "completion_tokens": sum(len(c) for c in completions),
            "no_signal_groups": int((spread.max(1).values == spread.min(1).values).sum()), "groups": len(docs),
            "gen_s": gen_s}
    batch = rows(run, [p for p in prompts for _ in range(group)], completions, docs, group)
    batch.advantages = advantages(rewards, group, cfg["grpo_std_norm"])
    return batch.to(run.device), sums


def rows(run, prompts, completions, docs, group):
    """Training rows of prompt + completion, padded to the longest; targets (weight 1) on completion tokens."""
    length = max(len(p) + len(c) for p, c in zip(prompts, completions))
    tokens = np.full((len(prompts), length), run.train_batches.pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), length), dtype=np.float32)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        tokens[r, : len(p) + len(c)] = p + c
        mask[r, len(p): len(p) + len(c)] = 1
    real = sum(min(len(p) + len(c), length - 1) for p, c in zip(prompts, completions))
    return Batch(x=torch.from_numpy(tokens[:, :-1].copy()), y=torch.from_numpy(tokens[:, 1:].copy()),
                 w=torch.from_numpy(mask[:, 1:].copy()), units=torch.tensor([d for d in docs for _ in range(group)]),
                 real=real)


@torch.no_grad()
def add_logps(run, batch):
    """The log-probs a grpo update needs besides its own: the rollout policy's (grpo_epochs > 1: the ratio's
    denominator) and the reference's (grpo_kl > 0)."""
    with run.autocast:
        t = run.cfg["temperature"]
        if run.cfg["grpo_epochs"] > 1:
            run.raw_model.eval()
            batch.old_logps = -losses.token_losses(run.model, batch.x, batch.y, temperature=t).float()
            run.raw_model.train()
        if run.reference is not None:
            with run.reference.module() as reference:
                batch.ref_logps = -losses.token_losses(reference, batch.x, batch.y, temperature=t).float()
    return batch


def rollouts(run, it):
    """(losses.batch_counts summed, this rank's micro-batches, the FIGURES of every rank's rollouts) of
    iteration it."""
    micros, sums = [], dict.fromkeys(ROLLOUT_SUMS, 0.0)
    for m in range(run.local_micro):
        batch, s = rollout(run, run.train_batches, run.micro_index(it, m), run.cfg["grpo_group"])
        micros.append(add_logps(run, batch))
        sums = {k: sums[k] + s[k] for k in ROLLOUT_SUMS}
    return sum(losses.batch_counts(b) for b in micros), micros, rollout_figures(sums, run.world)


def rollout_figures(sums, world):
    """The logged figures of a step's rollouts, from the sums of every rank."""
    s = dict(zip(ROLLOUT_SUMS, distributed.all_reduce_sum(torch.tensor([sums[k] for k in ROLLOUT_SUMS],
                                                                        dtype=torch.float64), world).tolist()))
    n = max(s["completions"], 1.0)
    mean = s["reward"] / n
    return {"reward": mean, "reward_std": max(s["reward_sq"] / n - mean**2, 0.0) ** 0.5,
            "accuracy": s["correct"] / s["answered"] if s["answered"] else None,
            "rm_score": s["rm_score"] / s["rm_scored"] if s["rm_scored"] else None,
            "no_signal": s["no_signal_groups"] / max(s["groups"], 1.0), "completion_len": s["completion_tokens"] / n,
            "gen_s": s["gen_s"] / world}


@torch.no_grad()
def evaluate(run):
    """Greedy completions to eval_iters micro-batches of val prompts (one each), shared by the ranks as train.evaluate
    shares its batches: val_reward, val_accuracy (prompts with references), val_rm_score (a reward with an rm: term),
    val_completion_len, and val_loss = -val_reward (what best-val bookkeeping minimises)."""
    n, sums = run.cfg["eval_iters"], dict.fromkeys(ROLLOUT_SUMS, 0.0)
    for i in range(run.rank, -(-n // run.world) * run.world, run.world):
        _, s = rollout(run, run.val_batches, i % n, group=1, greedy=True)  # past the end: in step, not counted
        if i < n:
            sums = {k: sums[k] + s[k] for k in ROLLOUT_SUMS}
    fig = rollout_figures(sums, run.world)
    figures = {"val_loss": -fig["reward"], "val_reward": fig["reward"], "val_accuracy": fig["accuracy"],
               "val_rm_score": fig["rm_score"], "val_completion_len": fig["completion_len"]}
    return {k: v for k, v in figures.items() if v is not None}
