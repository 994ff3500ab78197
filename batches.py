"""
Training rows from a prepared split (shards.py): what a batch is for each stage.

A unit is what a row holds: a window of block_size+1 tokens of the token
stream (pretrain), one document from its start (sft), or a chosen/rejected
pair (dpo, two rows). The order of the units is a seeded permutation per
epoch, and row r of global micro-batch g is unit g * batch_size + r of it, so
a batch is a pure function of (seed, g): a resumed run, or N ranks taking
their share of the micro-batches, sees exactly what one uninterrupted process
would.
"""

from dataclasses import dataclass

import numpy as np
import torch

from configurator import fail


@dataclass
class Batch:
    """One micro-batch: inputs x and labels y (rows, T) int64, w (rows, T) float32 the loss weight of each label
    position (0 = not a target), units (the unit of each row; a DPO batch has all chosen rows, then all
    rejected rows, so 2 rows per unit)."""

    x: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor
    units: torch.Tensor

    def to(self, dev):
        """The batch on `dev`; from pinned memory without blocking on CUDA, so the copy overlaps the step."""
        pin = dev.type == "cuda"
        return Batch(**{k: (v.pin_memory() if pin else v).to(dev, non_blocking=pin) for k, v in vars(self).items()})


def count_units(stage, num_tokens, num_docs, block_size):
    """Units in a split of num_tokens tokens in num_docs documents: an epoch of the stage."""
    if stage == "pretrain":
        return (num_tokens - 1) // block_size
    return num_docs if stage == "sft" else num_docs // 2


class Batches:
    """Rows of one split for one stage, in a seeded order per epoch (see the module docstring)."""

    def __init__(self, split, stage, block_size, batch_size, seed, pad_id, tag_ids=(), tag_weight=1.0):
        self.split, self.stage, self.T, self.B = split, stage, block_size, batch_size
        self.seed, self.pad_id = seed, pad_id
        self.tag_ids, self.tag_weight = np.array(sorted(tag_ids), dtype=np.int64), tag_weight
        self.n_units = count_units(stage, split.num_tokens, split.num_docs, block_size)
        if self.n_units < 1:
            fail(f"split '{split.name}' of {split.meta.get('data_dir', 'the data')} is too small for "
                 f"stage {stage} with block_size {block_size} ({split.num_tokens} tokens, {split.num_docs} documents)")
        self._epoch, self._order = None, None

    def unit(self, g):
        """The unit at position g of the endless sequence of epochs."""
        epoch, pos = divmod(g, self.n_units)
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_units)
            self._epoch = epoch
        return int(self._order[pos])

    def _padded(self, tokens, mask):
        """tokens, mask padded to block_size+1 (padding is never a target)."""
        n = self.T + 1 - len(tokens)
        if n > 0:
            tokens = np.concatenate([tokens, np.full(n, self.pad_id, dtype=np.int64)])
            mask = np.concatenate([mask, np.zeros(n, dtype=np.uint8)])
        return tokens, mask

    def rows(self, unit):
        """The rows (tokens, mask), each of block_size+1, that a unit makes: one, or two for a DPO pair."""
        if self.stage == "pretrain":
            return [self.split.read(unit * self.T, self.T + 1)]
        docs = [unit] if self.stage == "sft" else [2 * unit, 2 * unit + 1]
        return [self._padded(*self.split.document(d, self.T + 1)) for d in docs]

    def batch(self, units):
        """The Batch of these units, in this order."""
        rows = [self.rows(u) for u in units]
        rows = [r[0] for r in rows] + ([r[1] for r in rows] if self.stage == "dpo" else [])
        tokens = np.stack([t for t, _ in rows])
        mask = np.stack([m for _, m in rows])
        x, y = tokens[:, :-1], tokens[:, 1:]
        w = mask[:, 1:].astype(np.float32)  # the mask applies to label positions
        if self.tag_weight != 1.0 and len(self.tag_ids):
            w[(w > 0) & np.isin(y, self.tag_ids)] *= self.tag_weight
        return Batch(x=torch.from_numpy(np.ascontiguousarray(x)), y=torch.from_numpy(np.ascontiguousarray(y)),
                     w=torch.from_numpy(w), units=torch.tensor(units))

    def get(self, g_micro):
        """Global micro-batch number g_micro."""
        return self.batch([self.unit(g_micro * self.B + r) for r in range(self.B)])
