"""
What each stage minimises, per micro-batch, and the statistics it reports (llm_trainer/stages.py says which
stage uses which).

- pretrain, sft: the cross-entropy of every label position times its weight
  (batches.Batch.w: 0 off the targets, think_tag_weight on reasoning tags in
  replies, 1 elsewhere); the step divides the sum by the sum of the weights.
- sft with a teacher (logit distillation): at every target position,
  (1 - kd_weight) times the cross-entropy plus kd_weight times a divergence
  of the student's distribution from a frozen teacher's (forward KL, reverse
  KL or Jensen-Shannon, both softened by a temperature T, times T^2), each
  position weighted as its cross-entropy is: the step's division by the sum
  of the weights makes both terms means over the same targets. The logits
  of both models exist kd_chunk positions at a time (distill_loss).
- dpo: the sigmoid (or IPO) loss of the difference between the policy's and
  the reference's log-ratio of chosen over rejected reply; the step divides
  by the number of pairs, a pair whose rows were cut to no target (a prompt
  as long as the row) left out of both. The reference is the starting weights, frozen, or
  their log-probabilities of every pair computed once (Reference). Pairs
  packed into rows are summed per document (by_document), so a packed batch
  gives what its pairs unpacked give.
- rm: the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin) of
  the reward model's scores, read at the last token of each sequence (the
  last that is not padding: where transformers' LlamaForSequenceClassification
  reads it), plus center_rewards_coefficient * (r_chosen + r_rejected)^2 as
  TRL; the step divides by the number of pairs, as DPO's.
- grpo: on every completion token of a rollout (llm_trainer/training/grpo.py), the clipped policy
  gradient -min(ratio * A, clip(ratio) * A) with the completion's advantage A
  (or the token's own: on-policy distillation) and ratio = p / p_rollout, plus grpo_kl times the k3 estimate of the KL to
  the starting weights; the step divides by the completion tokens of the
  step (token-level normalisation).

Each function returns sums, never means: the step's loss is a mean over all
of its targets, across micro-batches and ranks, which only sums can give.
"""

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llm_trainer.core import distributed
from model import Transformer, adapters_off, token_cross_entropy

# DPO statistics as TRL names them; each is a mean over pairs
DPO_STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected")


GRPO_STATS = ("kl", "clip_fraction")  # means over the step's completion tokens
TEACHER_STATS = ("teacher_kl",)  # grpo with a teacher: the mean of log p - log p_teacher over the completion tokens

# distillation: the student's cross-entropy, the divergence from the teacher and the teacher's own cross-entropy on
# the same targets; means over the step's targets, weighted as the loss is
KD_STATS = ("ce", "kd", "teacher_ce")
KD_KINDS = ("forward_kl", "reverse_kl", "jsd")

# reward-model statistics, means over pairs: how often chosen scores above rejected, by how much, and the first two
# moments of the scores (of chosen and rejected alike), which rm_figures turns into their mean and std
RM_STATS = ("accuracy", "margin", "rewards/chosen", "rewards/rejected", "rewards/mean", "rewards/square")
RM_FIGURES = ("accuracy", "margin", "rewards/chosen", "rewards/rejected", "rewards/mean", "rewards/std")


def token_losses(model, x, y, segments=None, temperature=1.0):
    """Cross-entropy of every label position, float32, shape (B, T), computed inside the (compiled) model;
    segments: the documents of packed rows (batches.Batch); temperature: of the distribution scored."""
    return model(x, targets=y, segments=segments, temperature=temperature)


def by_document(batch, values):
    """values (rows, T) of a batch, one row per document as the unpacked batch lays them out: the rows themselves,
    or those of packed pairs gathered from where their documents lie (batches.Batch.doc_index), zero past each
    document's end. A gather, not a scatter: the same sums on every device, run after run."""
    if batch.doc_index is None:
        return values
    return torch.cat([values.flatten(), values.new_zeros(1)])[batch.doc_index]


def sequence_logps(model, batch):
    """Summed log-probability of each document's target tokens (the final reply, for DPO data), chosen rows first
    for pairs."""
    ce = token_losses(model, batch.x, batch.y, batch.segments)
    return -by_document(batch, ce * (batch.w > 0)).sum(-1)


def lm_loss(model, batch, weighted=True):
    """(summed loss, {}) of a pretrain/sft micro-batch; weighted=False counts every target once (validation)."""
    w = batch.w if weighted else (batch.w > 0).float()
    return (token_losses(model, batch.x, batch.y, batch.segments) * w).sum(), {}


def divergence(student_logits, teacher_logits, kind, temperature):
    """(N,) float32: the divergence of the student's distribution from the teacher's at each of N positions, both
    softened by the temperature T, times T^2 (Hinton et al. 2015: its gradient keeps the cross-entropy's scale as T
    changes). forward_kl is KL(teacher || student): the student spreads over every token the teacher gives mass;
    reverse_kl is KL(student || teacher): it settles on the teacher's likeliest tokens; jsd, the Jensen-Shannon
    divergence (beta 1/2) to their mixture, lies between the two and is at most ln 2 (before the T^2)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = functools.partial(F.kl_div, reduction="none", log_target=True)  # kl(log q, log p) = p (log p - log q)
    if kind == "forward_kl":
        d = kl(s, t)
    elif kind == "reverse_kl":
        d = kl(t, s)
    else:
        mixture = torch.logsumexp(torch.stack([s, t]), dim=0) - math.log(2)
        d = 0.5 * (kl(mixture, t) + kl(mixture, s))
    return d.sum(-1) * temperature**2


def _head_terms(h, head_weight, teacher_h, teacher_weight, targets, kind, temperature):
    """(divergence, the teacher's cross-entropy), each (N,), of N positions from both models' final hidden states
    and heads."""
    student, teacher = F.linear(h, head_weight), F.linear(teacher_h, teacher_weight)
    return divergence(student, teacher, kind, temperature), token_cross_entropy(teacher, targets)


# Eager, also inside a compiled student: the number of chunks changes with each batch's targets, and a compiled loop
# would be compiled again for every count.
@torch.compiler.disable
def kd_terms(h, head_weight, positions, teacher_h, teacher_weight, targets, kind, temperature, chunk):
    """(divergence, the teacher's cross-entropy), each (N,) float32, at N positions (flat indices into the student's
    hidden states h (B, T, dim)); teacher_h (N, teacher dim): the teacher's at the same positions. Both heads run
    `chunk` positions at a time, and each chunk's logits are computed again in the backward pass (activation
    checkpointing) instead of kept: the logits of both models exist one chunk at a time, at the cost of a second
    pass through both heads. chunk=0, or no more positions than chunk: all at once, every logit kept for the
    backward pass (one chunk would save nothing, and recomputing it costs a pass)."""
    h = h.flatten(0, 1)[positions]
    if not chunk or len(positions) <= chunk:
        return _head_terms(h, head_weight, teacher_h, teacher_weight, targets, kind, temperature)
    parts = [checkpoint(_head_terms, hc, head_weight, tc, teacher_weight, yc, kind, temperature, use_reentrant=False)
             for hc, tc, yc in zip(h.split(chunk), teacher_h.split(chunk), targets.split(chunk))]
    return tuple(torch.cat(p) for p in zip(*parts))


def distill_loss(model, teacher, batch, kind, temperature, alpha, chunk, weighted=True):
    """(summed loss, {KD_STATS: sums}) of an sft micro-batch distilled from a frozen teacher: at every target
    position (1 - alpha) times the cross-entropy plus alpha times the divergence (kd_terms), each weighted by the
    position's weight (Batch.w: think_tag_weight on reasoning tags), so that the step's division by the weight sum
    makes both means over the same targets. The cross-entropy is lm_loss's own, so alpha = 0 is plain SFT exactly.
    weighted=False (validation): the loss is the cross-entropy alone, every target counted once, as without a
    teacher. The teacher's head is applied inside the student's forward (Transformer.forward's head_loss), to the
    hidden states of the targets only; under FSDP the teacher's root (embedding, final norm, head) stays gathered
    after its forward (distributed.wrap_frozen)."""
    w = batch.w if weighted else (batch.w > 0).float()
    positions = (w.flatten() > 0).nonzero().squeeze(1)
    targets = batch.y.flatten()[positions]
    with torch.no_grad():
        teacher_h = teacher(batch.x, segments=batch.segments, hidden=True).flatten(0, 1)[positions]
    head_loss = functools.partial(kd_terms, positions=positions, teacher_h=teacher_h,
                                  teacher_weight=teacher.lm_head.weight, targets=targets, kind=kind,
                                  temperature=temperature, chunk=chunk)
    ce, (kd, teacher_ce) = model(batch.x, targets=batch.y, segments=batch.segments, head_loss=head_loss)
    wt = w.flatten()[positions]
    sums = {"ce": (ce * w).sum(), "kd": (kd * wt).sum(), "teacher_ce": (teacher_ce * wt).sum()}
    loss = (1 - alpha) * sums["ce"] + alpha * sums["kd"] if weighted else sums["ce"]
    return loss, {k: v.detach() for k, v in sums.items()}


def dpo_terms(policy_logps, ref_logps, beta, kind="sigmoid", label_smoothing=0.0):
    """Per-pair DPO loss (kind: sigmoid or ipo) and the DPO_STATS per pair, from (2B,) summed log-probs, chosen rows
    first."""
    pc, pr = policy_logps.chunk(2)
    rc, rr = ref_logps.chunk(2)
    logits = (pc - pr) - (rc - rr)
    if kind == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        eps = label_smoothing
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    chosen_r, rejected_r = beta * (pc - rc).detach(), beta * (pr - rr).detach()
    stats = (chosen_r, rejected_r, (chosen_r > rejected_r).float(), chosen_r - rejected_r, pc.detach(), pr.detach())
    return losses, dict(zip(DPO_STATS, stats))


def pair_has_targets(batch):
    """(B,) bool: whether both rows of each pair of a DPO batch keep a target (a prompt that fills the row leaves
    none: such a pair would add ln 2 to the loss and count in its divisor without teaching anything)."""
    chosen, rejected = by_document(batch, batch.w > 0).any(-1).chunk(2)
    return chosen & rejected


def dpo_loss(model, batch, ref_logps, beta, kind="sigmoid", label_smoothing=0.0):
    """(summed loss, {statistic: sum over pairs}) of a DPO micro-batch, over its pairs with targets."""
    losses, stats = dpo_terms(sequence_logps(model, batch), ref_logps, beta, kind, label_smoothing)
    kept = pair_has_targets(batch).float()
    return (losses * kept).sum(), {k: (v * kept).sum() for k, v in stats.items()}


def last_tokens(x, pad_id):
    """(B,) the position of the last token of each row of x (B, T) that is not pad_id, padding on either side: where
    a reward model reads its score (transformers' rule; no rendered conversation holds <|endoftext|>)."""
    positions = torch.arange(x.shape[1], device=x.device)
    return (positions * (x != pad_id)).argmax(-1)


def scores(model, x, pad_id):
    """(B,) float32 scores of a reward model for rows x (B, T), each read at its last token."""
    return model(x, logits_at=last_tokens(x, pad_id))[:, 0]


def document_scores(model, batch, pad_id):
    """(2B,) float32 scores of a reward model for the documents of a batch of pairs, chosen first, each read at its
    last token that is not padding; packed pairs: the scores of every position of the packed rows, read where each
    document's own row would have its last token (by_document), so that they equal the unpacked pairs' scores."""
    if batch.doc_index is None:
        return scores(model, batch.x, pad_id)
    every = model(batch.x, segments=batch.segments).flatten()
    real = by_document(batch, batch.x != pad_id)
    last = (torch.arange(real.shape[1], device=real.device) * real).argmax(-1, keepdim=True)
    return every[batch.doc_index.gather(1, last).squeeze(1)]


def rm_terms(rewards, margins, center=0.0):
    """Per-pair Bradley-Terry loss and the RM_STATS per pair, from (2B,) scores, chosen rows first, and (B,) margins
    the chosen reply should win by (0 without)."""
    rc, rr = rewards.chunk(2)
    losses = -F.logsigmoid(rc - rr - margins)
    if center:
        losses = losses + center * (rc + rr) ** 2
    rc, rr = rc.detach(), rr.detach()
    stats = ((rc > rr).float(), rc - rr, rc, rr, (rc + rr) / 2, (rc**2 + rr**2) / 2)
    return losses, dict(zip(RM_STATS, stats))


def rm_loss(model, batch, pad_id, margins, center=0.0):
    """(summed loss, {statistic: sum over pairs}) of a reward-model micro-batch, over its pairs with targets."""
    losses, stats = rm_terms(document_scores(model, batch, pad_id), margins, center)
    kept = pair_has_targets(batch).float()
    return (losses * kept).sum(), {k: (v * kept).sum() for k, v in stats.items()}


def rm_figures(means):
    """The logged figures (RM_FIGURES) of the means of RM_STATS: the scores' std from their first two moments."""
    figures = {k: v for k, v in means.items() if k != "rewards/square"}
    figures["rewards/std"] = max(means["rewards/square"] - means["rewards/mean"] ** 2, 0.0) ** 0.5
    return figures


def grpo_terms(logp, old_logp, ref_logp, adv, w, clip, kl_coef):
    """(summed loss, {GRPO_STATS: sums}) over the target tokens (w > 0) of rows of per-token log-probs (N, T):
    the clipped policy gradient with each row's advantage adv (N,), or each token's (N, T), plus kl_coef times the
    k3 KL estimate exp(ref - logp) - (ref - logp) - 1 when ref_logp is given."""
    mask = (w > 0).float()
    ratio = torch.exp(logp - old_logp)
    a = adv if adv.dim() == 2 else adv[:, None]
    pg = -torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
    clipped = ((ratio - 1).abs() > clip).float()
    stats = {"kl": (kl.detach() * mask).sum(), "clip_fraction": (clipped * mask).sum()}
    return ((pg + kl_coef * kl) * mask).sum(), stats


def grpo_loss(model, batch, temperature, clip, kl_coef):
    """(summed loss, {GRPO_STATS: sums}) of a micro-batch of rollouts. The policy is the distribution the
    completions were sampled from (the logits divided by the sampling temperature). Without rollout log-probs
    (one update per rollout batch) the ratio is p / p.detach(): 1, with the policy gradient's gradient."""
    logp = -token_losses(model, batch.x, batch.y, temperature=temperature)
    old = batch.old_logps if batch.old_logps is not None else logp.detach()
    loss, stats = grpo_terms(logp, old, batch.ref_logps, batch.advantages, batch.w, clip, kl_coef)
    if batch.teacher_logps is not None:  # on-policy distillation: how far the policy is from the teacher
        stats["teacher_kl"] = ((logp.detach() - batch.teacher_logps) * (batch.w > 0)).sum()
    return loss, stats


def target_count(batch, pairs=False, weighted=True):
    """What the step's loss is a mean over, for this micro-batch: target weight (tokens) or, for rows of pairs,
    pairs with targets."""
    if pairs:
        return float(pair_has_targets(batch).sum())
    return float(batch.w.sum() if weighted else (batch.w > 0).sum())


def target_bytes(batch, token_bytes, pairs=False):
    """The UTF-8 bytes of text the micro-batch's targets hold (tokenizer.token_bytes: each id's bytes, less the
    dummy prefix of a text's first token), those of the chosen documents for pairs: the denominator of bits per
    byte."""
    sizes, prefix, opens = token_bytes
    y = batch.y.clamp(min=0)
    size = (sizes[y] - prefix[y] * opens[batch.x]) * (batch.w > 0)
    return (by_document(batch, size).chunk(2)[0] if pairs else size).sum().float()


def batch_counts(batch, pairs=False):
    """float64 [loss normaliser (target_count), target tokens, real positions, computed positions] of a
    micro-batch, taken on the host: the step's mean, and how full its rows are."""
    return torch.tensor([target_count(batch, pairs), float((batch.w > 0).sum()), batch.real, batch.x.numel()],
                        dtype=torch.float64)


class Reference:
    """The reference of DPO (and of GRPO's KL): a frozen copy of the starting weights; or (precompute=True) their
    log-probs of every pair of each split, computed once, so that no second model stays in memory; or, for a
    LoRA run, `shared`, the policy itself with its adapters off: its base, which is the starting weights.
    param_dtype: the dtype the policy's parameters compute in (distributed.param_dtype): the reference's too, so
    that it equals the policy at step 0."""

    def __init__(self, raw_model, batches, device, autocast, rank, world, precompute, shared=None,
                 param_dtype=torch.float32):
        self.model, self.tables, self.shared = None, {}, shared
        if shared is not None:
            return
        if precompute:
            scorer = raw_model if param_dtype == torch.float32 else frozen_copy(raw_model, device, param_dtype)
            self.tables = {split: _precompute(scorer, b, device, autocast, rank, world)
                           for split, b in batches.items()}
        else:
            self.model = frozen_copy(raw_model, device, param_dtype)

    @contextlib.contextmanager
    def module(self):
        """The module that computes as the reference, for the time of the block."""
        if self.shared is None:
            yield self.model
        else:
            with adapters_off(self.shared) as base:
                yield base

    @torch.no_grad()
    def logps(self, batch, split):
        """(2B,) reference log-probs of a batch of `split`, chosen rows first (as sequence_logps)."""
        if self.tables:
            pairs = self.tables[split][batch.units.cpu()].to(batch.x.device)  # (B, 2)
            return pairs.T.reshape(-1)
        with self.module() as reference:
            return sequence_logps(reference, batch)


def frozen_copy(raw_model, device, param_dtype):
    """A frozen copy of a model in eval mode, its parameters in param_dtype (its buffers, the rotary frequencies,
    stay float32, as under FSDP's mixed precision, which casts parameters only)."""
    model = Transformer(raw_model.mcfg).to(device)
    model.load_state_dict(raw_model.state_dict())
    for p in model.parameters():
        p.data = p.data.to(param_dtype)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def _precompute(model, batches, device, autocast, rank, world):
    """(n_pairs, 2) log-probs of every pair of a split, chosen then rejected, by the (not yet wrapped, whole on
    every rank) starting weights; ranks share the pairs and sum the table."""
    out = torch.zeros(batches.n_units, 2, dtype=torch.float32)
    model.eval()
    B = batches.B
    for first in range(rank * B, batches.n_units, world * B):
        units = list(range(first, min(first + B, batches.n_units)))
        batch = batches.batch(batches.packed(units) if batches.packing else units)
        with autocast:
            logps = sequence_logps(model, batch.to(device)).float().cpu()
        out[batch.units] = logps.view(2, -1).T
    model.train()
    return distributed.all_reduce_sum(out.to(device), world).cpu()

