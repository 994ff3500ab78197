"""
Training rows from a prepared split (llm_trainer/data/shards.py): what a batch is, for the kind of unit a
stage's rows hold (llm_trainer/stages.py says which).

A unit is what a row holds: a "window" of block_size+1 tokens of the token
stream (pretrain), one "document" from its start (sft; a grpo prompt), whole
documents packed together (sft with pack=True), or a chosen/rejected "pair"
(dpo, two rows; whole pairs packed together with pack=True). Each
epoch orders the units by a seeded permutation, and row r of global
micro-batch g is unit g * batch_size + r of the sequence of epochs, so a batch
is a pure function of (seed, g): a resumed run, or N ranks taking their share
of the micro-batches, sees exactly what one uninterrupted process would.

Packing (pack=True): each epoch's documents, in their seeded order, are taken
a window of PACK_WINDOW at a time and placed by best-fit decreasing into rows
of block_size+1 tokens; the rows of the epoch are then shuffled (seeded). A
validation micro-batch packs exactly the documents its unpacked version holds,
so the val loss is the same packed or not. A packed row carries `segments`,
the document of every position, so that attention and positions never cross
documents (model.py); the label after a document's last token belongs to the
next document and is never a target. doc_mask=True (pretrain) gives windows of
the token stream the same segments: a segment starts at the <|endoftext|> that
precedes a document (where sample.py's complete mode starts a prompt) and
ends with the document's last text token, whose label, that <|endoftext|>
closing it, stays a target.

Packed pairs: what packing places is a whole pair, its chosen then its
rejected document, so that the loss of a micro-batch sees both. A row of pairs
holds 2 x (block_size+1) tokens, as many as the two rows of an unpacked pair:
any pair fits, each side cut at block_size+1 tokens as unpacked, and every
token of it is an input (a row has one more token, padding, for the last
label). Its Batch carries `doc_index`, where each document's positions are, so
that the losses sum per document what an unpacked row sums (losses.by_document).
"""

import bisect
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from configurator import fail

PACK_WINDOW = 1000  # documents packed together: rows come out nearly full, and packing an epoch stays fast


@dataclass
class Batch:
    """One micro-batch: inputs x and labels y (rows, T) int64, w (rows, T) float32 the loss weight of each label
    position (0 = not a target), units (the unit of each row; a DPO batch has all chosen rows, then all
    rejected rows, so 2 rows per unit; -1 for a packed row; for packed pairs the pairs, in the order of
    doc_index), segments (rows, T) int64 the document of every position of a packed row (None: one document,
    or a window, per row), real the number of x positions that are not padding; doc_index (packed pairs
    only): (documents, W) int64 for each document (the chosen of every pair of units, then the rejected) the
    flat index into x (rows x T) of its first W positions, as its own unpacked row holds them (W: the longest
    document's, at most block_size), and rows x T (nothing) past its end."""

    x: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor
    units: torch.Tensor
    segments: Optional[torch.Tensor] = None
    real: int = field(default=0)
    doc_index: Optional[torch.Tensor] = None
    # grpo rollouts (llm_trainer/training/grpo.py): each row's (or each token's) advantage, and the rollout policy's,
    # the reference's and the teacher's log-probs
    advantages: Optional[torch.Tensor] = None
    old_logps: Optional[torch.Tensor] = None
    ref_logps: Optional[torch.Tensor] = None
    teacher_logps: Optional[torch.Tensor] = None

    def to(self, dev):
        """The batch on `dev`; from pinned memory without blocking on CUDA, so the copy overlaps the step."""
        pin = dev.type == "cuda"
        moved = {k: (v.pin_memory() if pin else v).to(dev, non_blocking=pin) if torch.is_tensor(v) else v
                 for k, v in vars(self).items()}
        return Batch(**moved)


UNITS = ("window", "document", "pair")


def count_units(unit, num_tokens, num_docs, block_size):
    """Units of this kind in a split of num_tokens tokens in num_docs documents: an epoch (unpacked)."""
    if unit == "window":
        return (num_tokens - 1) // block_size
    return num_docs // 2 if unit == "pair" else num_docs


def positions_per_row(unit, block_size, packed):
    """Positions a micro-batch computes per unit of batch_size: a row of block_size, the two rows of an
    unpacked pair, or a packed row of pairs (2 x (block_size+1): see the module docstring)."""
    if unit == "pair":
        return 2 * (block_size + 1) if packed else 2 * block_size
    return block_size


def pack(lengths, capacity):
    """Best-fit decreasing: lists of indices into `lengths` (each <= capacity), each list's total <= capacity.
    Deterministic: the same lengths always give the same rows."""
    rows, free = [], []  # free: sorted (room left, row) of the rows still open
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = bisect.bisect_left(free, (lengths[i], -1))  # the fullest row it still fits in
        if k == len(free):
            rows.append([])
            room, r = capacity, len(rows) - 1
        else:
            room, r = free.pop(k)
        rows[r].append(i)
        bisect.insort(free, (room - lengths[i], r))
    return rows


class Batches:
    """Rows of one split, each holding a unit of this kind (UNITS), in a seeded order per epoch (see the module
    docstring).

    packing: None, "epoch" (training: documents packed over each epoch) or "micro-batch" (validation: each
    micro-batch packs the documents it holds unpacked). doc_mask: pretrain windows get segments."""

    def __init__(self, split, unit, block_size, batch_size, seed, pad_id, tag_ids=(), tag_weight=1.0,
                 packing=None, doc_mask=False):
        self.split, self.unit_kind, self.T, self.B = split, unit, block_size, batch_size
        self.seed, self.pad_id, self.packing, self.doc_mask = seed, pad_id, packing, doc_mask
        self.tag_ids, self.tag_weight = np.array(sorted(tag_ids), dtype=np.int64), tag_weight
        lengths = split.doc_ends - split.doc_starts
        self.lengths = np.minimum(lengths, block_size + 1)  # a longer document is cut to one row, as prepare.py cuts
        self.truncated = int((lengths > block_size + 1).sum()) if unit != "window" else 0
        # what packing places (whole pairs: chosen and rejected together), and the room for them in a packed row
        pairs = self.lengths[: 2 * (split.num_docs // 2)].reshape(-1, 2)
        self.sizes = pairs.sum(1) if unit == "pair" else self.lengths
        self.capacity = 2 * (block_size + 1) if unit == "pair" else block_size + 1
        self.row_tokens = self.capacity + (unit == "pair")  # a row of pairs: a last label after every document
        # pairs whose prompt fills the row, so that a row keeps no target: left out of the loss
        # (losses.pair_has_targets), counted here for the run's plan
        self.untargeted = 0
        if unit == "pair":
            kept = split.row_targets(block_size + 1)[: 2 * (split.num_docs // 2)] > 0
            self.untargeted = int((~(kept[0::2] & kept[1::2])).sum())
        self.n_units = count_units(unit, split.num_tokens, split.num_docs, block_size)
        if self.n_units < 1:
            fail(f"split '{split.name}' of {split.data_dir} is too small for one {unit} row with block_size "
                 f"{block_size} ({split.num_tokens} tokens, {split.num_docs} documents)"
                 + (": prepare it with a larger --val_fraction or a --val_input file, or train without evaluation "
                    "(--eval_iters=0)" if split.name == "val" else ""))
        self._epoch = self._order = None
        self._epoch_starts = [0]  # packing="epoch": the first unit of each epoch planned so far

    # -- the order of the units ------------------------------------------------------------------
    def _plan(self, epoch):
        """The units of an epoch, in order: document, window or pair numbers, or packed rows (lists of
        documents)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_units)
        if self.packing != "epoch":
            return order
        rows = []
        for w in range(0, len(order), PACK_WINDOW):
            rows += self.packed(order[w: w + PACK_WINDOW])
        shuffle = np.random.default_rng([self.seed, epoch, 1]).permutation(len(rows))
        return [rows[i] for i in shuffle]

    def _epoch_of(self, g):
        """(epoch, position in it) of unit number g of the sequence of epochs."""
        if self.packing != "epoch":
            return divmod(g, self.n_units)
        while self._epoch_starts[-1] <= g:  # plan the epochs up to g's, once each
            epoch = len(self._epoch_starts) - 1
            self._set_epoch(epoch)
            self._epoch_starts.append(self._epoch_starts[-1] + len(self._order))
        epoch = bisect.bisect_right(self._epoch_starts, g) - 1
        return epoch, g - self._epoch_starts[epoch]

    def _set_epoch(self, epoch):
        if epoch != self._epoch:
            self._order, self._epoch = self._plan(epoch), epoch

    def unit(self, g):
        """The unit at position g of the endless sequence of epochs."""
        epoch, pos = self._epoch_of(g)
        self._set_epoch(epoch)
        unit = self._order[pos]
        return unit if isinstance(unit, list) else int(unit)

    def epochs(self, g):
        """How many epochs the first g units of the sequence make, fractional."""
        epoch, pos = self._epoch_of(g)
        size = self._epoch_starts[epoch + 1] - self._epoch_starts[epoch] if self.packing == "epoch" else self.n_units
        return epoch + pos / size

    def rows_per_epoch(self):
        """Rows in the first epoch (packed: as many as the documents fill)."""
        self._set_epoch(0)
        return len(self._order)

    def packed(self, units):
        """These units (documents or pairs) in rows, packed by best-fit decreasing: a list of lists of units."""
        units = np.asarray(units)
        return [units[r].tolist() for r in pack(self.sizes[units].tolist(), self.capacity)]

    def expected_fill(self):
        """Real tokens / computed positions over the first epoch."""
        if self.unit_kind == "window":
            return 1.0
        if self.packing == "epoch":
            self._set_epoch(0)
            width = self.row_tokens - 1  # x positions of a packed row
            real = sum(min(int(self.sizes[row].sum()), width) for row in self._order)
            return real / (len(self._order) * width)
        return float(np.minimum(self.lengths, self.T).mean()) / self.T

    # -- rows ------------------------------------------------------------------------------------
    def _padded(self, tokens, mask, row_tokens):
        """tokens, mask padded to row_tokens (padding is never a target)."""
        n = row_tokens - len(tokens)
        if n > 0:
            tokens = np.concatenate([tokens, np.full(n, self.pad_id, dtype=np.int64)])
            mask = np.concatenate([mask, np.zeros(n, dtype=np.uint8)])
        return tokens, mask

    def rows(self, unit):
        """The rows a unit makes, one (two for a pair), each (tokens, mask, segment of every token or None,
        tokens before the padding), block_size+1 tokens long."""
        if self.unit_kind == "window":
            start = unit * self.T
            tokens, mask = self.split.read(start, self.T + 1)
            return [(tokens, mask, self._window_segments(start) if self.doc_mask else None, self.T + 1)]
        if isinstance(unit, list):
            return [self._packed_row(self.documents(unit))]
        return [(*self._padded(*self.split.document(d, self.T + 1), self.T + 1), None, int(self.lengths[d]))
                for d in self.documents([unit])]

    def documents(self, units):
        """The documents of these units, in order: a pair's chosen, then its rejected."""
        return [d for u in units for d in ((2 * u, 2 * u + 1) if self.unit_kind == "pair" else (u,))]

    def _packed_row(self, docs):
        parts = [self.split.document(d, self.T + 1) for d in docs]
        used = sum(len(t) for t, _ in parts)
        tokens, mask = self._padded(np.concatenate([t for t, _ in parts]), np.concatenate([m for _, m in parts]),
                                    self.row_tokens)
        # the padding after the documents is a segment of its own: it attends to itself only
        segments = np.repeat(np.arange(len(docs) + 1), [len(t) for t, _ in parts] + [len(tokens) - used])
        return tokens, mask, segments, used

    def _window_segments(self, start):
        """Segments of the window [start, start+T+1): each begins at the token before a document's start."""
        # a segment starts at doc_starts[k] - 1 (the <|endoftext|> closing the previous document): count the
        # starts at or before position + 1, on a view of the index (no copy of it per row)
        positions = np.arange(start, start + self.T + 1)
        return np.searchsorted(self.split.doc_starts[1:], positions + 1, side="right")

    def batch(self, units):
        """The Batch of these units, in this order."""
        rows = [self.rows(u) for u in units]
        packed_pairs = self.unit_kind == "pair" and isinstance(units[0], list)
        rows = [r[0] for r in rows] + ([r[1] for r in rows] if self.unit_kind == "pair" and not packed_pairs else [])
        tokens = np.stack([r[0] for r in rows])
        mask = np.stack([r[1] for r in rows])
        x, y = tokens[:, :-1], tokens[:, 1:]
        w = mask[:, 1:].astype(np.float32)  # the mask applies to label positions
        segments = None
        if rows[0][2] is not None:
            seg = np.stack([r[2] for r in rows])
            if self.unit_kind != "window":  # the label after a document's last token is the next document's
                w[seg[:, :-1] != seg[:, 1:]] = 0
            segments = torch.from_numpy(np.ascontiguousarray(seg[:, :-1]))
        if self.tag_weight != 1.0 and len(self.tag_ids):
            w[(w > 0) & np.isin(y, self.tag_ids)] *= self.tag_weight
        real = sum(min(r[3], x.shape[1]) for r in rows)  # x holds all but a row's last token
        ids = [p for row in units for p in row] if packed_pairs else [u if isinstance(u, int) else -1 for u in units]
        return Batch(x=torch.from_numpy(np.ascontiguousarray(x)), y=torch.from_numpy(np.ascontiguousarray(y)),
                     w=torch.from_numpy(w), units=torch.tensor(ids), segments=segments, real=real,
                     doc_index=self._doc_index(units, x.shape) if packed_pairs else None)

    def _doc_index(self, rows, shape):
        """Batch.doc_index of rows of packed pairs (lists of pairs), x of this shape."""
        docs, first = [], []  # the documents in row order, and the first position of each in the flat x
        for r, row in enumerate(rows):
            start = r * shape[1]
            for d in self.documents(row):
                docs.append(d)
                first.append(start)
                start += int(self.lengths[d])
        order = list(range(0, len(docs), 2)) + list(range(1, len(docs), 2))  # the chosen, then the rejected
        inputs = np.minimum(self.lengths[docs], self.T)[order]  # the x positions of a document's own row
        cols = np.arange(int(inputs.max()))
        index = np.array(first)[order][:, None] + cols
        index[cols >= inputs[:, None]] = shape[0] * shape[1]
        return torch.from_numpy(index)

    def get(self, g_micro):
        """Global micro-batch number g_micro."""
        units = [self.unit(g_micro * self.B + r) for r in range(self.B)]
        return self.batch(self.packed(units) if self.packing == "micro-batch" else units)
