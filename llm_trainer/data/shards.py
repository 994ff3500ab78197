"""
The on-disk format of a prepared dataset: written by prepare.py, read by train.py.

    meta.json              written last, atomically; a directory without it is incomplete
    tokenizer.json (+ tokenizer_config.json, chat_template.jinja, special_tokens_map.json)
    {split}_{NNNNN}.bin    token ids, uint16 (uint32 when vocab_size > 65535)
    {split}_{NNNNN}.mask   uint8 per token, 1 = this token is a training target
    {split}_{NNNNN}.idx    uint64 start offset of each document within the shard
    {split}_{NNNNN}.ref    grpo sets: one JSON line per document, {"prompt": ..., "answer": ... or null},
                           the text a reward function reads; preference sets with a margin column:
                           {"margin": m} on each document of a pair

Splits are "train" and "val". A document never spans two shards; a DPO pair
is two consecutive documents (chosen, then rejected) of one shard. Readers
address a split as one long array: document offsets and read() positions
are global over the concatenation of its shards.
"""

import hashlib
import json
import os
import re

import numpy as np

import configurator
from llm_trainer.core import files
from llm_trainer.core.files import sha256_file

FORMAT_VERSION = 1
SPLITS = ("train", "val")
SUFFIXES = ("bin", "mask", "idx")
SHARD_FILE = re.compile(r"^(train|val)_\d{5}\.(bin|mask|idx|ref)$")


def token_dtype(vocab_size):
    return "uint16" if vocab_size <= 65535 else "uint32"


def shard_name(split, index):
    return f"{split}_{index:05d}"


# ---------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Streams documents of one split into shards of at most `shard_tokens` tokens (a longer
    document gets a shard of its own), hashing every byte as it is written."""

    _FLUSH_TOKENS = 1 << 20

    def __init__(self, out_dir, split, dtype, shard_tokens, refs=False):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, np.dtype(dtype), shard_tokens
        self.suffixes = SUFFIXES + (("ref",) if refs else ())  # refs: a .ref line per document too
        self.shards = []  # finished shard dicts, as they go into meta.json
        self.tokens = self.documents = self.targets = 0
        self._files = None

    def add(self, ids, mask):
        """Append one document."""
        self.add_units(ids, mask, [len(ids)], [1])

    def add_units(self, ids, mask, doc_lens, unit_docs, refs=None):
        """Append many documents at once: `ids` and `mask` concatenated, `doc_lens` tokens each; the
        documents of a unit (`unit_docs` per unit: 1, or 2 for a DPO pair) stay in one shard. The same
        shards as adding them one by one, without a Python step per document. refs: the .ref line
        (a JSON-able value) of each document, for a writer made with refs=True."""
        ids, mask = np.asarray(ids), np.asarray(mask, dtype=np.uint8)
        doc_lens = np.asarray(doc_lens, dtype=np.int64)
        if len(ids) != len(mask) or len(ids) != doc_lens.sum() or len(doc_lens) != sum(unit_docs):
            raise ValueError(f"{len(ids)} tokens, {len(mask)} mask values, {int(doc_lens.sum())} in documents, "
                             f"{len(doc_lens)} documents, {sum(unit_docs)} in units")
        doc_ends = np.cumsum(doc_lens)
        unit_doc_ends = np.cumsum(np.asarray(unit_docs, dtype=np.int64))
        unit_ends = doc_ends[unit_doc_ends - 1]
        u = d = t = 0  # next unit, document and token
        while u < len(unit_ends):
            if self._files is None:
                self._start_shard()
            # units that fit in this shard; a shard starts with at least one, however long
            fit = int(np.searchsorted(unit_ends[u:] - t, self.shard_tokens - self._shard_tokens, side="right"))
            if fit == 0 and self._shard_tokens > 0:
                self._finish_shard()
                continue
            u_end = u + max(fit, 1)
            d_end, t_end = int(unit_doc_ends[u_end - 1]), int(unit_ends[u_end - 1])
            self._put(ids[t:t_end], mask[t:t_end], doc_lens[d:d_end], refs[d:d_end] if refs is not None else ())
            u, d, t = u_end, d_end, t_end

    def close(self):
        """Finish the last shard; return the list of shard dicts."""
        if self._files is not None:
            self._finish_shard()
        return self.shards

    def _start_shard(self):
        self._name = shard_name(self.split, len(self.shards))
        self._files = {s: open(os.path.join(self.out_dir, f"{self._name}.{s}"), "wb") for s in self.suffixes}
        self._hashes = {s: hashlib.sha256() for s in self.suffixes}
        self._pending = {s: [] for s in self.suffixes}
        self._ref_bytes = 0
        self._pending_tokens = 0
        self._shard_tokens = self._shard_docs = 0

    def _put(self, ids, mask, doc_lens, refs):
        n = len(ids)
        if "ref" in self.suffixes:
            self._pending["ref"] += [(json.dumps(r, ensure_ascii=False) + "\n").encode() for r in refs]
        self._pending["idx"].append(self._shard_tokens + np.cumsum(doc_lens) - doc_lens)
        self._pending["bin"].append(ids.astype(self.dtype, copy=False))
        self._pending["mask"].append(mask)
        self._shard_tokens += n
        self._shard_docs += len(doc_lens)
        self.tokens += n
        self.documents += len(doc_lens)
        self.targets += int(np.count_nonzero(mask))
        self._pending_tokens += n
        if self._pending_tokens >= self._FLUSH_TOKENS:
            self._flush()

    def _flush(self):
        arrays = {
            "bin": np.concatenate(self._pending["bin"]) if self._pending["bin"] else np.zeros(0, self.dtype),
            "mask": np.concatenate(self._pending["mask"]) if self._pending["mask"] else np.zeros(0, np.uint8),
            "idx": (np.concatenate(self._pending["idx"]) if self._pending["idx"] else np.zeros(0)).astype(np.uint64),
        }
        if "ref" in self.suffixes:
            arrays["ref"] = b"".join(self._pending["ref"])
            self._ref_bytes += len(arrays["ref"])
        for s, a in arrays.items():
            data = a if isinstance(a, bytes) else a.tobytes()
            self._files[s].write(data)
            self._hashes[s].update(data)
            self._pending[s] = []
        self._pending_tokens = 0

    def _finish_shard(self):
        self._flush()
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self.shards.append({
            "name": self._name,
            "tokens": self._shard_tokens,
            "documents": self._shard_docs,
            **({"ref_bytes": self._ref_bytes} if "ref" in self.suffixes else {}),
            "sha256": {s: h.hexdigest() for s, h in self._hashes.items()},
        })
        self._files = None


def write_meta(out_dir, meta):
    """Write meta.json atomically: a temporary file, fsync, rename, fsync of the directory."""
    files.write_json(os.path.join(out_dir, "meta.json"), meta, indent=1, durable=True)


# ---------------------------------------------------------------------------------------------
# Reading


def load_meta(data_dir):
    """meta.json of a complete prepared directory, or a one-line error (exit 2)."""
    data_dir = str(data_dir)
    if not os.path.isdir(data_dir):
        configurator.fail(f"data directory '{data_dir}' does not exist (run prepare.py first)")
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        configurator.fail(f"data directory '{data_dir}' is incomplete (no meta.json): prepare.py did not finish; re-run prepare.py")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        configurator.fail(f"cannot read '{path}': {e}")
    if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
        version = meta.get("version") if isinstance(meta, dict) else None
        configurator.fail(f"'{path}' has format version {version!r}; this code reads version {FORMAT_VERSION}: re-run prepare.py")
    return meta


class Split:
    """One split of a prepared dataset, memory-mapped, addressed by global token positions."""

    def __init__(self, data_dir, name, meta, verify=False):
        if name not in meta["splits"]:
            configurator.fail(f"data directory '{data_dir}' has no split '{name}'")
        self.name, self.meta, self.data_dir = name, meta, data_dir
        dtype = np.dtype(meta["dtype"])
        self._bins, self._masks, starts = [], [], []
        # per document of a set of tasks (a .ref sidecar beside each shard): {"prompt", "answer"}; of pairs: {"margin"}
        self.refs = [] if any("ref_bytes" in s for sp in meta["splits"].values() for s in sp["shards"]) else None
        offset = 0
        for shard in meta["splits"][name]["shards"]:
            suffixes = SUFFIXES + (("ref",) if self.refs is not None else ())
            paths = {s: os.path.join(data_dir, f"{shard['name']}.{s}") for s in suffixes}
            expected = {"bin": shard["tokens"] * dtype.itemsize, "mask": shard["tokens"], "idx": shard["documents"] * 8,
                        "ref": shard.get("ref_bytes")}
            for s, path in paths.items():
                if not os.path.isfile(path):
                    configurator.fail(f"shard file '{path}' is missing (listed in meta.json): re-run prepare.py")
                size = os.path.getsize(path)
                if size != expected[s]:
                    configurator.fail(f"shard file '{path}' has {size} bytes, meta.json says {expected[s]}: re-run prepare.py")
                if verify and sha256_file(path) != shard["sha256"][s]:
                    configurator.fail(f"shard file '{path}' fails its sha256 checksum (meta.json): re-run prepare.py")
            tokens = np.memmap(paths["bin"], dtype=dtype, mode="r", shape=(shard["tokens"],))
            if verify:
                _check_ids(tokens, meta["vocab_size"], paths["bin"])
            self._bins.append(tokens)
            self._masks.append(np.memmap(paths["mask"], dtype=np.uint8, mode="r", shape=(shard["tokens"],)))
            starts.append(np.fromfile(paths["idx"], dtype=np.uint64).astype(np.int64) + offset)
            if self.refs is not None:
                with open(paths["ref"], encoding="utf-8") as f:
                    self.refs += [json.loads(line) for line in f]
            offset += shard["tokens"]
        self._offsets = np.cumsum([0] + [len(b) for b in self._bins])
        self.num_tokens = int(offset)
        self.doc_starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        # Documents fill their shards back to back, so each ends where the next starts.
        self.doc_ends = np.append(self.doc_starts[1:], self.num_tokens)[: len(self.doc_starts)].astype(np.int64)
        self.num_docs = len(self.doc_starts)

    def read(self, start, length):
        """(tokens int64, mask uint8) of global positions [start, start + length), across shards."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"read({start}, {length}) outside split '{self.name}' of {self.num_tokens} tokens")
        tokens = np.empty(length, dtype=np.int64)
        mask = np.empty(length, dtype=np.uint8)
        i = int(np.searchsorted(self._offsets, start, side="right")) - 1
        done = 0
        while done < length:
            local = start + done - int(self._offsets[i])
            n = min(length - done, len(self._bins[i]) - local)
            tokens[done : done + n] = self._bins[i][local : local + n]
            mask[done : done + n] = self._masks[i][local : local + n]
            done += n
            i += 1
        return tokens, mask

    def document(self, i, max_tokens=None):
        """(tokens, mask) of document i, its first max_tokens only when given (for DPO: 2k is the chosen,
        2k+1 the rejected of pair k)."""
        start = int(self.doc_starts[i])
        length = int(self.doc_ends[i]) - start
        return self.read(start, length if max_tokens is None else min(length, max_tokens))

    def row_targets(self, row_tokens):
        """int64 per document: its targets among the labels of a row of its first row_tokens tokens (tokens 1 ..
        row_tokens-1: a row's first token is no label), summed per shard without a Python step per document."""
        out = np.zeros(self.num_docs, dtype=np.int64)
        shard = np.searchsorted(self._offsets, self.doc_starts, side="right") - 1
        for i, mask in enumerate(self._masks):
            docs = np.flatnonzero(shard == i)
            lo, hi = self.doc_starts[docs] + 1, np.minimum(self.doc_ends[docs], self.doc_starts[docs] + row_tokens)
            docs, lo, hi = docs[hi > lo], lo[hi > lo] - self._offsets[i], hi[hi > lo] - self._offsets[i]
            if len(docs):  # windows [lo, hi) are disjoint and in order: reduceat sums each, slots between ignored
                bounds = np.stack([lo, hi], axis=1).ravel()
                out[docs] = np.add.reduceat(mask, bounds[:-1] if bounds[-1] == len(mask) else bounds,
                                            dtype=np.int64)[::2]
        return out


def _check_ids(tokens, vocab_size, path, chunk=1 << 24):
    for lo in range(0, len(tokens), chunk):
        top = int(tokens[lo : lo + chunk].max())
        if top >= vocab_size:
            configurator.fail(f"shard file '{path}' holds token id {top} >= vocab_size {vocab_size}: re-run prepare.py")


def open_split(data_dir, split, meta=None, verify=False):
    """A Split of a prepared directory. Always checks that every shard file exists with the size
    meta.json gives; verify=True also checks sha256 checksums and that every id < vocab_size."""
    meta = load_meta(data_dir) if meta is None else meta
    return Split(str(data_dir), split, meta, verify=verify)
