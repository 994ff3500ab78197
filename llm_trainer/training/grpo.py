"""
The grpo stage's batches: rollouts. For each prompt of a micro-batch (a prompt of the prepared grpo
set, rendered up to the assistant's header), grpo_group completions are sampled together with the
KV-cache generator, scored by the reward (llm_trainer/training/rewards.py: functions against the prompt's reference
answer, a reward model on the conversation), and
turned into training rows (prompt + completion; targets on the completion only) that carry each
completion's advantage: its reward minus its group's mean (divided by the group's std when
grpo_std_norm). With a teacher in the reward (`teacher:DIR`, on-policy distillation), every completion
token's advantage adds the term's weight times log p_teacher - log p of the token sampled: minus the
per-token estimate of the reverse KL from the teacher, on the policy's own samples (GKD, Agarwal et al.
2024). losses.grpo_loss is what the rows are trained on.

A rollout is a pure function of (seed, global micro-batch, weights): the sampler's generator is seeded
by the micro-batch number, so a resumed run samples the same completions, and N ranks sample what
one process sampling every micro-batch would. Generation keeps every rank in step (the rule in
llm_trainer/core/distributed.py): all ranks decode until all are done.

With tools (grpo_tools), a completion that writes a call stops at its </tool_call>; the call runs and the tool turn
holding its result (and the next reply's header) is appended, never sampled: no target, so no loss and no
log-probability of it in the update. A call is read as sample.py and the server read one (generation.split_reply):
a <tool_call> block inside the <think> block, or one that is not a call, is text, and the completion goes on after
it in the next round, nothing appended. The completions go on together, in rounds, until they answer or
max_new_tokens is spent: each of the first grpo_tool_calls rounds stops at a </tool_call> (so that at most that
many calls run), the last one goes on to the answer's end; each round's sampler is seeded by (micro-batch, round),
and every rank runs every round (one with nothing left to generate decodes a placeholder), so that N ranks still
sample what one process does. The reward sees the final answer: the text after the last tool result.
"""

import time

import numpy as np
import torch

from llm_trainer.core import distributed
from llm_trainer.training import losses
from llm_trainer.data.batches import Batch
from llm_trainer.inference.generation import chat_stop_ids, completion_text, split_reply
from llm_trainer.training.rewards import conversation, exact_answer

# per-rollout figures, summed over micro-batches and ranks before they are logged
ROLLOUT_SUMS = ("reward", "reward_sq", "correct", "answered", "rm_score", "rm_scored", "completions",
                "completion_tokens", "no_signal_groups", "groups", "gen_s", "tool_calls")
# logged per step; accuracy (exact answers) where the prompts have references, rm_score (the reward models' raw
# score, before its weight) where the reward has an rm: term
FIGURES = ("reward", "reward_std", "accuracy", "rm_score", "no_signal", "completion_len", "gen_s", "tool_calls")


def advantages(rewards, group, std_norm=True):
    """(N,) advantages of rewards (N,) in consecutive groups of `group`: reward minus the group's mean, divided by
    the group's standard deviation (plus 1e-6) when std_norm."""
    r = rewards.view(-1, group)
    a = r - r.mean(dim=1, keepdim=True)
    if std_norm:
        a = a / (r.std(dim=1, unbiased=False, keepdim=True) + 1e-6)
    return a.reshape(-1)


def teacher_advantages(adv, logps, teacher_logps, w, weight):
    """(N, T) per-token advantages: each row's own adv (N,) plus weight times teacher_logps - logps (N, T), the
    teacher's and the policy's log-probabilities of each sampled token, on the target tokens (w > 0); 0 elsewhere."""
    return (adv[:, None] + weight * (teacher_logps - logps)) * (w > 0)


def generate(run, prompts, greedy=False, seed=0, stop=(), rows_done=None):
    """Completions (token lists, a final stop token kept) of prompts (token lists), every rank decoding in step;
    stop: stop ids besides the chat's; rows_done: as model.generate_batch."""
    cfg, model = run.cfg, run.raw_model
    gen = torch.Generator(run.device).manual_seed(seed)
    model.eval()
    with run.autocast:
        out = model.generate_batch(prompts, cfg["max_new_tokens"], temperature=0.0 if greedy else cfg["temperature"],
                                   top_p=cfg["top_p"], stop_ids=chat_stop_ids(run.tokenizer) + tuple(stop),
                                   generator=gen, max_len=cfg["block_size"], pad_id=run.train_batches.pad_id,
                                   all_done=lambda done: not distributed.any_rank(not bool(done.all()), run.world),
                                   rows_done=rows_done)
    model.train()
    return out


def generate_with_tools(run, prompts, greedy, seed):
    """(completions, their masks: 1 where sampled, 0 on the tool turns appended, the final answers' token lists,
    the calls run): generate() in rounds, the module docstring's."""
    cfg, tok, close = run.cfg, run.tokenizer, run.tokenizer.tool_tag_ids["</tool_call>"]
    completions, masks, answers = [[] for _ in prompts], [[] for _ in prompts], [0] * len(prompts)  # answer: start
    active, calls, limit = list(range(len(prompts))), 0, cfg["grpo_tool_calls"]
    for k in range(limit + 1):
        if not distributed.any_rank(bool(active), run.world):
            break
        # every round decodes up to max_new_tokens on every rank (the same steps); a row keeps what its budget leaves
        idle = None if active else (lambda tokens: torch.ones(len(tokens), dtype=torch.bool, device=tokens.device))
        outs = generate(run, [prompts[r] + completions[r] for r in active] or [[run.train_batches.pad_id]], greedy,
                        seed + k * 2**40, stop=(close,) if k < limit else (), rows_done=idle)
        going = []
        for r, out in zip(active, outs):
            out = out[: cfg["max_new_tokens"] - len(completions[r])]
            completions[r] += out
            masks[r] += [1] * len(out)
            if out[-1:] != [close] or k == limit:
                continue  # it answered, or spent its tokens (the last round stops at no </tool_call>)
            found = split_reply(tok.decode(completions[r][answers[r]:]))[2]
            results = tok.tool_results_ids([run.tools.run(c) for c in found]) if found else []
            if len(completions[r]) + len(results) < min(cfg["max_new_tokens"], cfg["block_size"] - len(prompts[r])):
                completions[r] += results
                masks[r] += [0] * len(results)
                if found:
                    answers[r], calls = len(completions[r]), calls + 1
                going.append(r)
        active = going
    return completions, masks, [c[a:] for c, a in zip(completions, answers)], calls


def rollout(run, batches, g, group, greedy=False):
    """(Batch on the device, {ROLLOUT_SUMS}) of global micro-batch g of `batches`: `group` completions per prompt."""
    cfg, tok = run.cfg, run.tokenizer
    docs = [batches.unit(g * batches.B + r) for r in range(batches.B)]
    prompts = [batches.split.document(d)[0].tolist() for d in docs]
    t0 = time.perf_counter()
    seed, repeated = cfg["seed"] * 1_000_003 + g, [p for p in prompts for _ in range(group)]
    if run.tools is None:
        completions = generate(run, repeated, greedy, seed)
        masks, answers, calls = [[1] * len(c) for c in completions], completions, 0
    else:
        completions, masks, answers, calls = generate_with_tools(run, repeated, greedy, seed)
    gen_s = time.perf_counter() - t0
    refs = [batches.split.refs[d] for d in docs for _ in range(group)]
    texts = [completion_text(tok, c, chat_stop_ids(tok)) for c in answers]
    # a reward model reads the whole exchange the policy produced (its calls and their results included)
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
            "completions": len(texts), "completion_tokens": sum(sum(m) for m in masks),
            "no_signal_groups": int((spread.max(1).values == spread.min(1).values).sum()), "groups": len(docs),
            "gen_s": gen_s, "tool_calls": calls}
    batch = rows(run, repeated, completions, masks, docs, group)
    batch.advantages = advantages(rewards, group, cfg["grpo_std_norm"])
    return batch.to(run.device), sums


def rows(run, prompts, completions, masks, docs, group):
    """Training rows of prompt + completion, padded to the longest; targets (weight 1) where a completion's mask is
    1 (the tokens sampled)."""
    length = max(len(p) + len(c) for p, c in zip(prompts, completions))
    tokens = np.full((len(prompts), length), run.train_batches.pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), length), dtype=np.float32)
    for r, (p, c, m) in enumerate(zip(prompts, completions, masks)):
        tokens[r, : len(p) + len(c)] = p + c
        mask[r, len(p): len(p) + len(c)] = m
    real = sum(min(len(p) + len(c), length - 1) for p, c in zip(prompts, completions))
    return Batch(x=torch.from_numpy(tokens[:, :-1].copy()), y=torch.from_numpy(tokens[:, 1:].copy()),
                 w=torch.from_numpy(mask[:, 1:].copy()), units=torch.tensor([d for d in docs for _ in range(group)]),
                 real=real)


@torch.no_grad()
def add_logps(run, batch):
    """The log-probs a grpo update needs besides its own: the rollout policy's (grpo_epochs > 1: the ratio's
    denominator; with a teacher: the policy's side of the per-token advantages), the reference's (grpo_kl > 0)
    and the teacher's (at temperature 1: its own distribution), which the advantages then include."""
    with run.autocast:
        t = run.cfg["temperature"]
        if run.cfg["grpo_epochs"] > 1 or run.teacher is not None:
            run.raw_model.eval()
            rollout_logps = -losses.token_losses(run.model, batch.x, batch.y, temperature=t).float()
            run.raw_model.train()
            if run.cfg["grpo_epochs"] > 1:
                batch.old_logps = rollout_logps
        if run.reference is not None:
            with run.reference.module() as reference:
                batch.ref_logps = -losses.token_losses(reference, batch.x, batch.y, temperature=t).float()
        if run.teacher is not None:
            batch.teacher_logps = -losses.token_losses(run.teacher, batch.x, batch.y).float()
            batch.advantages = teacher_advantages(batch.advantages, rollout_logps, batch.teacher_logps, batch.w,
                                                  run.reward.teacher[0])
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
            "gen_s": s["gen_s"] / world, "tool_calls": s["tool_calls"] / n}


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
