"""
prepare.py: jsonl -> tokenizer (trained here or loaded) -> token shards with loss masks.

    python prepare.py --input='raw/*.jsonl' --out_dir=data/mine --tokenizer=train --vocab_size=6400
    python prepare.py --input=raw/sft.jsonl,raw/belle.jsonl --out_dir=data/sft --tokenizer=data/mine
    python prepare.py config/prepare_demo.py

Inputs (`input`, `val_input`: comma-separated paths or globs; an existing file
is taken as a path first, so `x[1].jsonl` works), one record per line:
.jsonl or .json; compressed .gz, .bz2, .xz, .zst (also `zstd --long=31`), read
as streams; Parquet (.parquet, one record per row, a null column absent, binary
values read as UTF-8) when pyarrow is installed; tar archives (.tar,
.tar.gz/.tgz, .tar.bz2, .tar.xz, .tar.zst), whose .jsonl/.json members are read
in order without unpacking (other members, links included, are named in a note
and skipped). Any other name is refused before any work. So the seq-monkey
corpus, `mobvoi_seq_monkey_general_open_corpus.jsonl.tar.bz2`, can be given as
it is; unpacking it first (`tar -xjf ...jsonl.tar.bz2`) and giving the .jsonl
makes the main pass faster, since bz2 decompression runs in the one reading
process. A .json file whose first non-blank character is "[" holds one JSON
array, in any layout (one line, pretty-printed), read element by element as a
stream. A file that ends early (truncated), is corrupt, or is not what its name
says stops the run with one line naming it and how far it got.

Memory is bounded by the longest line: a line (array element, Parquet row) over
max_line_bytes is read past in pieces, skipped and counted (line_too_long). A
longer text or chat is encoded piece by piece (byte-level BPE tokenizers: the
same ids), about 15-20x the line in memory per worker at most; other tokenizers
encode it whole, up to about 200x: lower max_line_bytes for them.

Records are detected one by one (records.detect_record): plain text
({"text"}, {"content"}, {"completion"} alone), chat (conversations/messages with
role/content or ShareGPT from/value, a bare list of messages, Alpaca
instruction/input/output with optional system and history, {"prompt",
"completion"} as user and assistant, assistant `reasoning_content`; tool
conversations in OpenAI's, ShareGPT's function-calling and MiniMind's shapes,
rendered with the tools' schemas in the system turn, targets on the replies and
their calls, never on the schemas or the results: llm_trainer/data/records.py),
preference pairs ({"chosen","rejected"}, optionally with "prompt" and a
"margin"), tasks for grpo ({"prompt", "answer"}, or with stage=grpo a chat whose
last assistant reply is the reference answer, or a prompt alone: {"prompt"}, or
a chat whose last message is the user's, for a reward that needs no reference).
stage=auto takes the stage from the first usable record (text -> pretrain,
chat -> sft, pair -> dpo, task -> grpo; stage=rm prepares pairs as dpo does,
and either stage trains on the set); a record of
another kind later is an error, except plain text in a chat set with
allow_mixed=True (all its tokens are targets). Bad records are skipped and
counted by reason (strict=True stops at the first bad line, naming file:line).
Records whose text holds special-token strings (`<|im_end|>` typed in content)
are counted: they are encoded as text, which some tools reading the export do
not follow (README, Export).

Documents: pretraining text is encode(text) + <|endoftext|>, every token a
target; a chat is its ChatML rendering with targets on the assistant replies;
a DPO pair is two documents (chosen, rejected) with targets on the final reply
only; a task is its prompt rendered up to the assistant's header, no targets,
with {"prompt": the last user message, "answer": the reference} in the .ref
sidecar ("answer": null for a prompt alone). A preference set has a margin
column or not, as a TRL data set: when its first record has a "margin", every
pair's margin goes to the .ref sidecar ({"margin": m} for each of its two
documents), and a record whose margin is missing (or present where the first
had none) is skipped and counted (margin_mismatch). max_len > 0 truncates longer documents (text keeps its final
<|endoftext|>), counted in the summary; a chat left with no target, or a pair
whose prompt alone reaches max_len, is skipped and counted. A record goes to
the val split when hash(seed, record number) < val_fraction, or when it comes
from a val_input file (val_fraction is then ignored).

Output: see llm_trainer/data/shards.py. The output does not depend on `workers`. meta.json is
removed first and written last, so an interrupted run leaves a directory that
every reader refuses; running again replaces it.
"""

import bz2
import codecs
import collections
import contextlib
import glob
import gzip
import hashlib
import io
import itertools
import json
import lzma
import multiprocessing
import os
import re
import signal
import sys
import tarfile
import time
import zlib

import numpy as np
from tqdm import tqdm

import configurator
from llm_trainer import stages
from llm_trainer.data import shards
from llm_trainer.data.records import BadRecord, detect_record, pair_margin
from llm_trainer.data.tokenizer import (TOOLS_POSTAMBLE, TOOLS_PREAMBLE, call_json, file_sha256, load_tokenizer,
                                        train_tokenizer)

# -----------------------------------------------------------------------------
# default config values
input = ""  # comma-separated paths or globs of jsonl/json(.gz/.bz2/.xz/.zst)/parquet/tar files
val_input = ""  # files whose records all go to the val split; when given, val_fraction is ignored
out_dir = "data/prepared"
tokenizer = "train"  # "train", or a path: prepared data dir, run dir, HF tokenizer dir, tokenizer.json, SentencePiece .model
vocab_size = 6400  # for tokenizer="train"
tokenizer_sample_bytes = 100_000_000  # train the tokenizer on the first this many bytes of input (0 = all)
stage = "auto"  # auto | pretrain | sft | dpo | rm | grpo (llm_trainer/stages.py); rm prepares pairs as dpo does
allow_mixed = False  # keep plain-text records in a chat (sft) set, every token a target
val_fraction = 0.01  # share of records (by document) in the val split
max_len = 0  # truncate documents to this many tokens (0 = no limit)
max_line_bytes = 16_000_000  # a longer line (JSON array element, Parquet row) is skipped and counted: bounded memory
shard_tokens = 100_000_000  # tokens per shard at most (a longer document gets a shard of its own)
workers = 0  # tokenizing processes (0 = all cores)
seed = 1337  # for the train/val split
strict = False  # stop at the first bad record
# -----------------------------------------------------------------------------
_DEFAULTS = configurator.defaults(globals())

_CHUNK_BYTES = 1 << 20  # input is handed to workers in chunks of about this many bytes
_EXAMPLES = 5  # file:line examples kept per skip reason
_COMPRESSED = (".gz", ".tgz", ".bz2", ".xz", ".zst", ".zstd")


# -----------------------------------------------------------------------------
# Reading input files

SUPPORTED = (".jsonl, .json (each also .gz, .bz2, .xz or .zst), .parquet, and tar archives of .jsonl/.json files "
             "(.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz, .tar.zst)")
_BOM = b"\xef\xbb\xbf"
_BLOCK = 1 << 16  # bytes read at a time from a JSON array


def resolve_inputs(spec, key):
    """The files named by a comma-separated list of paths and globs, in order; each of a format read here."""
    paths = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if os.path.isfile(item):  # before any glob: a file may be named x[1].jsonl
            found = [item]
        elif os.path.isdir(item):
            configurator.fail(f"{key} '{item}' is a directory: give files or a glob such as '{item}/*.jsonl'")
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                configurator.fail(f"{key} '{item}' matches no file")
        else:
            configurator.fail(f"{key} '{item}' does not exist")
        paths += found
    for path in paths:
        if _format(path) is None:
            compressed_parquet = ".parquet." in path.lower()
            hint = " (Parquet compresses inside the file: give the .parquet itself)" if compressed_parquet else ""
            configurator.fail(f"{key} '{path}': unsupported format{hint}; prepare.py reads {SUPPORTED}")
    return paths


def _strip_compression(name):
    lower = name.lower()
    if lower.endswith(".tgz"):
        return name[:-4] + ".tar"
    for ext in _COMPRESSED:
        if lower.endswith(ext):
            return name[: -len(ext)]
    return name


def _format(name):
    """"jsonl", "json", "parquet" or "tar" for the name of a file read here, None for any other."""
    inner = _strip_compression(name).lower()
    if inner.endswith((".jsonl", ".json", ".tar")):
        return inner.rsplit(".", 1)[1]
    if inner.endswith(".parquet") and inner == name.lower():
        return "parquet"
    return None


def _decompressed(name, raw):
    """A buffered binary stream of the decompressed content of file `name` read from `raw`. A stream that
    ends before its compressed data does raises EOFError when read."""
    lower = name.lower()
    if lower.endswith((".gz", ".tgz")):
        return gzip.GzipFile(fileobj=raw)
    if lower.endswith(".bz2"):
        return bz2.BZ2File(raw)
    if lower.endswith(".xz"):
        return lzma.LZMAFile(raw)
    if lower.endswith((".zst", ".zstd")):
        return io.BufferedReader(_ZstdReader(raw), buffer_size=_BLOCK)
    return raw if isinstance(raw, io.BufferedIOBase) else io.BufferedReader(raw)


class _ZstdReader(io.RawIOBase):
    """The content of a zstd stream of one or more frames. zstandard's own stream reader returns what it has
    when the file stops inside a frame; this one raises EOFError. Windows up to 2 GB (`zstd --long=31`) are read."""

    def __init__(self, raw):
        import zstandard

        self._raw, self._zstd = raw, zstandard.ZstdDecompressor(max_window_size=1 << 31)
        self._frame, self._out, self._at = None, b"", 0  # the frame being read, its output, what is handed on

    def readable(self):
        return True

    def readinto(self, b):
        while self._at == len(self._out):
            data = self._raw.read(_BLOCK)
            if self._frame is not None and self._frame.eof:
                data, self._frame = self._frame.unused_data + data, None
            if not data:
                if self._frame is not None:
                    raise EOFError("the zstd stream ends inside a frame")
                return 0
            self._frame = self._frame or self._zstd.decompressobj()
            self._out, self._at = self._frame.decompress(data), 0
        n = min(len(b), len(self._out) - self._at)
        b[:n] = self._out[self._at : self._at + n]
        self._at += n
        return n


def _read_errors():
    """What reading a corrupt, truncated or misnamed input raises."""
    errors = [EOFError, OSError, tarfile.TarError, lzma.LZMAError, zlib.error]
    with contextlib.suppress(ImportError):
        import zstandard

        errors.append(zstandard.ZstdError)
    with contextlib.suppress(ImportError):
        import pyarrow

        errors.append(pyarrow.ArrowException)
    return tuple(errors)


def _sources(path, cap):
    """(label, iterator of raw lines, on-disk file) of each record stream in `path`: the file
    itself, or each .jsonl/.json member of a tar archive. A line over `cap` bytes is given as its length."""
    with open(path, "rb") as raw:
        kind = _format(path)
        if kind == "parquet":
            yield path, _parquet_lines(path, cap), raw
        elif kind == "tar":
            with tarfile.open(fileobj=_decompressed(path, raw), mode="r|") as tar:
                for member in tar:
                    if member.isfile() and _format(member.name) in ("jsonl", "json"):
                        label = f"{path}/{member.name}"
                        yield label, _lines(label, _decompressed(member.name, tar.extractfile(member)), cap), raw
                    elif not member.isdir():
                        _note(f"{path}: skipping member '{member.name}' ({_not_read(member)})")
        else:
            yield path, _lines(path, _decompressed(path, raw), cap), raw


def _not_read(member):
    if member.issym() or member.islnk():
        kind = "a symbolic link" if member.issym() else "a hard link"
        return f"{kind} to '{member.linkname}': links are not followed, give the file itself"
    return "not .jsonl or .json" if member.isfile() else "not a regular file"


_noted = set()


def _note(message):
    """Print a note once per run, though the input is read more than once (first record, tokenizer sample)."""
    if message not in _noted:
        _noted.add(message)
        print(f"note: {message}", file=sys.stderr)


def _lines(label, stream, cap):
    """The lines of a jsonl stream; a .json whose first non-blank character is "[" holds one JSON array (whatever
    its layout), whose elements are yielded instead, one per line, each as its JSON text."""
    if stream.peek(3)[:3] == _BOM:
        stream.read(3)
    if _format(label) != "json":
        return _capped_lines(stream, cap)
    blank = _skip_blank(stream)
    if stream.peek(1)[:1] != b"[":
        return itertools.chain([b"\n"] * blank, _capped_lines(stream, cap))
    first = stream.readline(cap + 1)
    if first.endswith(b"\n") and _parses(first):  # an array on one line: the file's only one, or a jsonl line
        rest, read = _capped_lines(stream, cap), []
        for line in rest:
            read.append(line)
            if isinstance(line, int) or not line.isspace():  # more records: jsonl whose records are message lists
                return itertools.chain([b"\n"] * blank, [first], read, rest)
        return _JsonArray(label, [first], cap).elements()
    return _JsonArray(label, itertools.chain([first], iter(lambda: stream.read(_BLOCK), b"")), cap).elements()


def _skip_blank(stream):
    """Read past the whitespace a stream starts with; return how many line breaks it held."""
    breaks = 0
    while ahead := stream.peek(_BLOCK):
        blank = len(ahead) - len(ahead.lstrip())
        breaks += ahead.count(b"\n", 0, blank)
        stream.read(blank)
        if blank < len(ahead):
            break
    return breaks


def _capped_lines(stream, cap):
    """The lines of a binary stream; one longer than `cap` bytes is read past in pieces and given as its length."""
    while line := stream.readline(cap + 1):
        if len(line) > cap and not line.endswith(b"\n"):
            line = len(line) + _read_past_line(stream)
        yield line


def _read_past_line(stream):
    """Read to the end of the current line, a piece at a time; return how many bytes that was."""
    size = 0
    while piece := stream.readline(_BLOCK):
        size += len(piece)
        if piece.endswith(b"\n"):
            break
    return size


_BLANK = re.compile(r"[ \t\r\n]*")
_IN_STRING = re.compile(r'(?:[^"\\]|\\.)*', re.DOTALL)  # a string's characters up to its closing quote
_OUTSIDE_STRINGS = re.compile(r'[^"\[\]{}]*')


class _JsonArray:
    """The elements of one JSON array read from byte pieces, each as its UTF-8 JSON text (invalid UTF-8 kept as it is,
    for the workers to count), whatever the array's layout. Memory holds one element: one over `cap` bytes is read
    past and given as its length. Invalid JSON stops the run (nothing after it can be found again)."""

    def __init__(self, label, pieces, cap):
        self.label, self.cap, self.pieces = label, cap, iter(pieces)
        self.decode = codecs.getincrementaldecoder("utf-8")("surrogateescape").decode
        self.text, self.pos, self.count, self.ended = "", 0, 0, False

    def elements(self):
        self._punctuation("[")
        if self._next_char() == "]":
            self.pos += 1
        else:
            while True:
                yield self._element()
                self.count += 1
                if self._punctuation(",]") == "]":
                    break
        if self._next_char():
            self._fail(f"nothing expected after the array's ']', found {self._next_char()!r}")

    def _fail(self, message):
        configurator.fail(f"{self.label}: {message}")

    def _more(self, at_least=1):
        """Read at least `at_least` more characters into the text (fewer at the end of the input), dropping what was
        consumed; False when there was nothing more."""
        new, size = [], 0
        while size < at_least and not self.ended:
            piece = next(self.pieces, None)
            self.ended = piece is None
            new.append(self.decode(piece or b"", final=self.ended))
            size += len(new[-1])
        self.text, self.pos = self.text[self.pos :] + "".join(new), 0
        return size > 0

    def _next_char(self):
        """The next non-blank character, not consumed ("" at the end of the input)."""
        while (pos := _BLANK.match(self.text, self.pos).end()) == len(self.text):
            self.pos = pos
            if not self._more():
                return ""
        self.pos = pos
        return self.text[pos]

    def _punctuation(self, allowed):
        c = self._next_char()
        if not c:
            self._fail(f"the JSON array ends after element {self.count:,} without its ']' (truncated?)")
        if c not in allowed:
            expected = " or ".join(repr(a) for a in allowed)
            self._fail(f"not a JSON array: {expected} expected after element {self.count:,}, found {c!r}")
        self.pos += 1
        return c

    def _element(self):
        self._next_char()
        while True:
            pending = len(self.text) - self.pos
            try:
                end = _DECODER.raw_decode(self.text, self.pos)[1]
                if end < len(self.text) or self.ended:  # at the text's end, a number may go on
                    element = self.text[self.pos : end].encode("utf-8", "surrogateescape")
                    self.pos = end
                    return element if len(element) <= self.cap else len(element)
            except json.JSONDecodeError as e:
                cut = e.msg.startswith("Unterminated string") or e.pos >= len(self.text) - (0 if self.ended else 16)
                if not cut or self.ended:
                    why = "the file ends inside it (truncated?)" if cut else "not valid JSON"
                    self._fail(f"element {self.count + 1:,} of the JSON array: {why}: {e}")
                if pending > self.cap:
                    return self._skip()
            except RecursionError:
                self._fail(f"element {self.count + 1:,} of the JSON array is nested too deeply")
            self._more(max(pending, _BLOCK))  # parsed again with twice as much: linear time in the element

    def _skip(self):
        """Read past the element (an object or array) that starts here without holding it; return its length in
        characters."""
        size, depth, in_string = 0, 0, False
        while True:
            text, pos = self.text, self.pos
            while pos < len(text):
                if in_string:
                    pos = _IN_STRING.match(text, pos).end()
                    if pos == len(text) or text[pos] == "\\":  # an escape cut off at the end of the text
                        break
                    in_string, pos = False, pos + 1
                else:
                    pos = _OUTSIDE_STRINGS.match(text, pos).end()
                    if pos == len(text):
                        break
                    in_string = text[pos] == '"'
                    depth += 0 if in_string else 1 if text[pos] in "[{" else -1
                    pos += 1
                if depth == 0 and not in_string:
                    size, self.pos = size + pos - self.pos, pos
                    return size
            size += pos - self.pos
            self.pos = pos
            if not self._more():
                self._fail(f"element {self.count + 1:,} of the JSON array: the file ends inside it (truncated?)")


_DECODER = json.JSONDecoder()


def _parses(line):
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def _parquet_lines(path, cap):
    """Each row as a JSON line: a null column is an absent key, a binary value is its UTF-8 text (invalid UTF-8 kept
    as it is, for the workers to count)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        configurator.fail(f"reading '{path}' needs pyarrow: pip install pyarrow")
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            row = {k: v for k, v in row.items() if v is not None}
            line = json.dumps(row, ensure_ascii=False, default=_json_value).encode("utf-8", "surrogateescape")
            yield line if len(line) <= cap else len(line)


def _json_value(value):
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


def read_chunks(paths, to_val, progress, cap):
    """Chunks of about _CHUNK_BYTES of raw lines: (label, first line number, ordinal of the first
    line among all lines of `paths`, lines, to_val). `progress(n)` is told of on-disk bytes read.
    A line over `cap` bytes is handed on as its length; an input that cannot be read is a one-line error."""
    ordinal = 0
    for path in paths:
        seen, label, number = 0, path, 0
        try:
            for label, lines, raw in _sources(path, cap):
                buf, size, first, number = [], 0, 1, 0
                for number, line in enumerate(lines, 1):
                    buf.append(line)
                    size += _size(line)
                    if size >= _CHUNK_BYTES:
                        yield (label, first, ordinal, buf, to_val)
                        ordinal, first, buf, size = ordinal + len(buf), number + 1, [], 0
                        seen = _advance(progress, raw, seen)
                if buf:
                    yield (label, first, ordinal, buf, to_val)
                    ordinal += len(buf)
        except _read_errors() as e:
            where = f"after line {number:,}" if number else "before its first line"
            truncated = isinstance(e, EOFError) or "unexpected end of data" in str(e)  # tarfile's word for it
            what = "ends early (truncated?)" if truncated else "cannot be read (corrupt, or not what its name says)"
            configurator.fail(f"{label}: {what}, {where}: {type(e).__name__}: {e}")
        _advance(progress, None, seen, os.path.getsize(path))


def _size(line):
    return line if isinstance(line, int) else len(line)


def _advance(progress, raw, seen, now=None):
    now = raw.tell() if now is None else now
    progress(now - seen)
    return now


def iter_records(paths, cap, prompts=False):
    """(location, kind, payload, record) of the usable records of `paths`, and (location, "bad", reason, None)
    markers: a light, single-process pass for sampling and peeking. prompts: as detect_record's."""
    for label, first, _, lines, _ in read_chunks(paths, False, lambda n: None, cap):
        for i, line in enumerate(lines):
            if isinstance(line, int) or line.strip():
                loc = f"{label}:{first + i}"
                try:
                    obj = _parse_line(line)
                    kind, payload, _ = detect_record(obj, prompts)
                    yield loc, kind, payload, obj
                except BadRecord as e:
                    yield loc, "bad", e.reason, None


def _parse_line(line):
    if isinstance(line, int):
        raise BadRecord("line_too_long")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRecord("invalid_utf8") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise BadRecord("invalid_json") from None


# -----------------------------------------------------------------------------
# Tokenizing (in worker processes)

_worker = {}


def _init_worker(tok, settings):
    _worker.update(settings, tok=tok, stage_def=stages.get(settings["stage"]))


def _init_pool_worker(tok, settings):
    # a forked worker inherits its parent's Python signal handlers; one that ignores SIGTERM would make the pool's
    # terminate() wait forever
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init_worker(tok, settings)


def _is_val(seed, ordinal, fraction):
    digest = hashlib.blake2b(f"{seed}:{ordinal}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def _kind_fits(kind, w):
    stage = w["stage_def"]
    return (kind == stage.record_kind or kind in stage.record_converters
            or (stage.mixes_text and kind == "text" and w["allow_mixed"]))


def _kind_error(kind, loc, w):
    hint = ("set allow_mixed=True to keep plain text in a chat set, " if w["stage_def"].mixes_text and kind == "text"
            else "")
    return (f"{loc}: a {kind} record in a {w['stage']} dataset (stage {w['stage_origin']}); "
            f"{hint}set stage= or give records of one kind")


def process_chunk(chunk):
    """Parse, check, split and tokenize one chunk. Returns its documents as flat arrays, in
    record order, with the counts for the summary."""
    label, first, ordinal, lines, to_val = chunk
    w, tok = _worker, _worker["tok"]
    res = {"records": 0, "bytes": sum(map(_size, lines)), "bad": [], "dropped": [], "fatal": None,
           "by_format": collections.Counter(), "truncated": 0, "special_strings": 0}
    units = []  # (kind, payload, is_val, index of the line)
    for i, line in enumerate(lines):
        if not isinstance(line, int) and (line.isspace() or not line):
            continue
        res["records"] += 1
        margin = None
        try:
            obj = _parse_line(line)
            kind, payload, fmt = detect_record(obj, prompts="prompt" in w["stage_def"].record_converters)
            if kind == "pair":
                margin = pair_margin(obj)
                if (margin is not None) != w["margins"]:
                    raise BadRecord("margin_mismatch")
            if kind in w["stage_def"].record_converters:
                kind, payload = w["stage_def"].record_kind, w["stage_def"].record_converters[kind](payload)
        except BadRecord as e:
            res["bad"].append((e.reason, f"{label}:{first + i}"))
            if w["strict"]:  # the first bad line of the chunk, ahead of anything later in it
                res["fatal"] = f"{label}:{first + i}: {e.reason} (strict=True stops at the first bad record)"
                return res
            continue
        if not _kind_fits(kind, w):
            res["fatal"] = _kind_error(kind, f"{label}:{first + i}", w)
            return res
        res["by_format"][fmt] += 1
        res["special_strings"] += _holds_special_strings(tok, kind, payload)
        is_val = to_val if to_val is not None else _is_val(w["seed"], ordinal + i, w["val_fraction"])
        units.append((kind, payload, is_val, i, margin))

    texts = iter(tok.encode_arrays([p for k, p, *_ in units if k == "text"], w["max_len"]))
    chats = iter(tok.render_chats([p for k, p, *_ in units if k == "chat"]))
    pairs = iter(tok.render_chats([c for k, p, *_ in units if k == "pair" for c in p], last_reply_only=True))
    prompts = iter(tok.render_chats([p[0] for k, p, *_ in units if k == "task"], add_generation_prompt=True))
    docs, unit_docs, unit_val, refs = [], [], [], []
    for kind, payload, is_val, i, margin in units:
        if kind == "text":
            ids = np.append(next(texts), np.uint32(tok.eot_id))
            unit = [_truncate_text(ids, w["max_len"], tok.eot_id, res)]
        elif kind == "chat":
            unit = [_truncate_chat(next(chats), w["max_len"], res)]
        elif kind == "task":  # the prompt, ending in the assistant's header; its answer goes to the .ref line
            ids, mask = next(prompts)
            unit = [(ids, np.zeros_like(mask)) if not w["max_len"] or len(ids) < w["max_len"] else None]
        else:
            unit = _truncate_pair(next(pairs), next(pairs), w["max_len"], res)
        if unit[0] is None:  # skipped for max_len, not for bad input: strict does not stop here
            reason = "no_target_after_truncation" if kind == "chat" else "prompt_too_long"
            res["dropped"].append((reason, f"{label}:{first + i}"))
            continue
        docs += unit
        unit_docs.append(len(unit))
        unit_val.append(is_val)
        if kind == "task":
            refs.append({"prompt": payload[0][-1]["content"], "answer": payload[1]})
        elif w["margins"]:  # one line per document: the pair's margin on its chosen and its rejected document
            refs += [{"margin": margin}] * 2
    res["ids"] = np.concatenate([d[0] for d in docs]).astype(np.uint32) if docs else np.zeros(0, np.uint32)
    res["mask"] = np.concatenate([d[1] for d in docs]) if docs else np.zeros(0, np.uint8)
    res["doc_lens"] = np.array([len(d[0]) for d in docs], dtype=np.int64)
    res["unit_docs"], res["unit_val"], res["refs"] = unit_docs, unit_val, refs
    return res


def _holds_special_strings(tok, kind, payload):
    """Whether a record's content holds special-token strings, which are encoded as text (README: where the
    export's tools give other ids)."""
    if kind == "text":
        return tok.holds_special_strings(payload)
    conversations = {"chat": [payload], "pair": list(payload), "task": [payload[0]]}[kind]
    return any(tok.conversation_holds_special_strings(c) for c in conversations)


def _truncate_text(ids, limit, eot_id, res):
    mask = np.ones(len(ids), dtype=np.uint8)
    if limit and len(ids) > limit:
        res["truncated"] += 1
        ids = np.append(ids[: limit - 1], np.uint32(eot_id))
        mask = mask[:limit]
    return ids, mask


def _truncate_chat(doc, limit, res):
    ids, mask = doc
    if limit and len(ids) > limit:
        ids, mask = ids[:limit], mask[:limit]
        if not mask.any():
            return None
        res["truncated"] += 1
    return ids, mask


def _truncate_pair(chosen, rejected, limit, res):
    if not limit or max(len(chosen[0]), len(rejected[0])) <= limit:
        return [chosen, rejected]
    prompt_len = int(np.argmax(chosen[1]))  # the first target token starts the final reply
    if prompt_len >= limit:
        return [None]
    res["truncated"] += 1
    return [(ids[:limit], mask[:limit]) for ids, mask in (chosen, rejected)]


def _planned(chunks, n_workers):
    """(workers, chunks): at most `n_workers`, and no more than there are chunks (no idle processes for a small
    input; counted on the chunks themselves, since a compressed file's size on disk says little)."""
    head = list(itertools.islice(chunks, n_workers))
    return max(1, min(n_workers, len(head))), itertools.chain(head, chunks)


def _results(chunks, tok, settings, n_workers):
    """process_chunk() over `chunks`, in order, with at most a few chunks in flight (bounded memory)."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process; no fork warning
    try:
        if n_workers == 1:
            _init_worker(tok, settings)
            yield from map(process_chunk, chunks)
            return
        with multiprocessing.Pool(n_workers, initializer=_init_pool_worker, initargs=(tok, settings)) as pool:
            pending = collections.deque()
            for chunk in chunks:
                pending.append(pool.apply_async(process_chunk, (chunk,)))
                if len(pending) >= 2 * n_workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


# -----------------------------------------------------------------------------
# The run


def main(argv=None):
    cfg = configurator.configure(_DEFAULTS, argv)
    configurator.print_config(cfg)
    return prepare(**cfg)


def prepare(input, val_input, out_dir, tokenizer, vocab_size, tokenizer_sample_bytes, stage, allow_mixed,
            val_fraction, max_len, max_line_bytes, shard_tokens, workers, seed, strict):
    """The whole run, config keys as arguments; returns meta.json's content."""
    _noted.clear()
    if stage not in ("auto", *stages.STAGES):
        configurator.fail(f"stage must be one of auto, {', '.join(stages.STAGES)}; got '{stage}'")
    if not 0 <= val_fraction < 1:
        configurator.fail(f"val_fraction must be in [0, 1); got {val_fraction}")
    if (max_len < 0 or max_len == 1 or shard_tokens <= 0 or max_line_bytes <= 0 or workers < 0
            or tokenizer_sample_bytes < 0):
        configurator.fail("max_len must be 0 (no limit) or >= 2; shard_tokens and max_line_bytes > 0; "
                          "workers and tokenizer_sample_bytes >= 0")
    if not input.strip():
        configurator.fail("no input: set --input=PATH[,PATH...] (paths or globs)")
    inputs = resolve_inputs(input, "input")
    val_inputs = resolve_inputs(val_input, "val_input")
    _check_writable(out_dir)
    prompts = stage != "auto" and "prompt" in stages.get(stage).record_converters  # a prompt alone is a record
    first_kind, first_loc, first_margin = _first_record(inputs + val_inputs, max_line_bytes, prompts)
    settings = {"stage": stages.of_record_kind(first_kind).name if stage == "auto" else stage,
                "stage_origin": "given" if stage != "auto" else f"auto: from the first record, {first_loc}",
                "allow_mixed": allow_mixed, "seed": seed, "val_fraction": val_fraction, "max_len": max_len,
                "strict": strict, "margins": first_margin is not None}

    t0 = time.time()
    tok = _make_tokenizer(tokenizer, vocab_size, tokenizer_sample_bytes, inputs + val_inputs, max_line_bytes, prompts)
    tokenizer_seconds = time.time() - t0
    _clear_outputs(out_dir)  # from here on the directory is incomplete until meta.json is back
    tok.save(out_dir)
    dtype = shards.token_dtype(tok.vocab_size)
    t0 = time.time()
    splits, counts, input_bytes, n_workers = _write_shards(inputs, val_inputs, tok, settings, out_dir, dtype,
                                                           shard_tokens, workers, max_line_bytes)
    seconds = time.time() - t0

    meta = {
        "version": shards.FORMAT_VERSION,
        "stage": settings["stage"],
        "dtype": dtype,
        "vocab_size": tok.vocab_size,
        "special_ids": tok.special_ids,
        "reasoning_tag_ids": tok.reasoning_tag_ids,
        "tokenizer_sha256": file_sha256(os.path.join(out_dir, "tokenizer.json")),
        "tokenizer_source": tokenizer if tokenizer != "train" else f"trained here, vocab_size={vocab_size}",
        "added_special_tokens": tok.added_special_tokens,
        "max_len": max_len,
        "max_line_bytes": max_line_bytes,
        "seed": seed,
        "val_fraction": 0.0 if val_inputs else val_fraction,
        "allow_mixed": allow_mixed,
        "inputs": inputs,
        "val_inputs": val_inputs,
        "splits": splits,
        "counts": counts,
        "timing": {"tokenizer_seconds": round(tokenizer_seconds, 3), "seconds": round(seconds, 3),
                   "input_mb": round(input_bytes / 1e6, 3), "mb_per_s": round(input_bytes / 1e6 / max(seconds, 1e-9), 3),
                   "workers": n_workers},
    }
    shards.write_meta(out_dir, meta)
    print_summary(out_dir, meta)
    return meta


def _make_tokenizer(tokenizer, vocab_size, sample_bytes, paths, cap, prompts):
    if tokenizer != "train":
        tok = load_tokenizer(tokenizer)
        if tok.added_special_tokens:
            print(f"tokenizer {tokenizer}: added {tok.added_special_tokens} special tokens, vocab_size {tok.vocab_size}")
        return tok
    sample = f"the first {sample_bytes / 1e6:g} MB of input" if sample_bytes else "all of the input"
    print(f"training a byte-level BPE tokenizer, vocab_size={vocab_size}, on {sample}")
    return train_tokenizer(_sample_texts(paths, sample_bytes, cap, prompts), vocab_size)


def _write_shards(inputs, val_inputs, tok, settings, out_dir, dtype, shard_tokens, workers, cap):
    """The main pass: every record parsed, tokenized (in `workers` processes) and written.
    Returns (splits, counts) for meta.json, the bytes of input read and the workers used."""
    # a task's prompt and answer go to a .ref sidecar, and so do the margins of a preference set that has them
    refs = stages.get(settings["stage"]).record_kind == "task" or settings["margins"]
    writers = {s: shards.ShardWriter(out_dir, s, dtype, shard_tokens, refs=refs)
               for s in shards.SPLITS}
    counts = {"records": 0, "kept": 0, "skipped": collections.Counter(), "skipped_examples": {},
              "truncated": 0, "special_strings": 0, "by_format": collections.Counter()}
    total = sum(os.path.getsize(p) for p in inputs + val_inputs)
    n_workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    input_bytes = 0
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=None)  # on a terminal only
    chunks = itertools.chain(read_chunks(inputs, False if val_inputs else None, bar.update, cap),
                             read_chunks(val_inputs, True, bar.update, cap))
    n_workers, chunks = _planned(chunks, n_workers)
    # closing(): an error stops the worker processes at once
    with bar, contextlib.closing(_results(chunks, tok, settings, n_workers)) as results:
        for res in results:
            if res["fatal"]:
                configurator.fail(res["fatal"])
            _tally(counts, res)
            _write(writers, res)
            input_bytes += res["bytes"]
    splits = {s: {"tokens": w.tokens, "documents": w.documents, "targets": w.targets, "shards": w.close()}
              for s, w in writers.items()}
    if counts["kept"] == 0:
        reasons = ", ".join(f"{n} {r} (first at {counts['skipped_examples'][r][0]})"
                            for r, n in counts["skipped"].most_common())
        configurator.fail(f"no usable record in the input ({counts['records']} records read, all skipped: {reasons})")
    if splits["train"]["documents"] == 0:
        configurator.fail("the train split is empty: lower val_fraction or give more input")
    counts.update(skipped=dict(counts["skipped"]), by_format=dict(counts["by_format"]))
    return splits, counts, input_bytes, n_workers


def _check_writable(out_dir):
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".prepare-write-test-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        configurator.fail(f"out_dir '{out_dir}' is not writable: {e.strerror or e}")


def _clear_outputs(out_dir):
    """Remove meta.json first (the directory is incomplete from here on), then old shards."""
    for name in ["meta.json", "meta.json.tmp"] + sorted(os.listdir(out_dir)):
        if name.startswith("meta.json") or shards.SHARD_FILE.match(name):
            path = os.path.join(out_dir, name)
            if os.path.exists(path):
                os.remove(path)


def _first_record(paths, cap, prompts):
    """(kind, location, margin: of a preference pair, else None) of the first usable record; fails when there is
    none."""
    reasons, examples = collections.Counter(), {}
    for loc, kind, payload, obj in iter_records(paths, cap, prompts):
        try:  # a pair whose margin is bad is no usable record either: it must not decide the set has no margins
            margin = pair_margin(obj) if kind == "pair" else None
        except BadRecord as e:
            kind, payload = "bad", e.reason
        if kind != "bad":
            return kind, loc, margin
        reasons[payload] += 1
        examples.setdefault(payload, loc)
    if not reasons:
        configurator.fail(f"the input is empty: no record in {', '.join(paths)}")
    detail = ", ".join(f"{n} {r} (first at {examples[r]})" for r, n in reasons.most_common())
    configurator.fail(f"no usable record in the input: {detail}")


def _sample_texts(paths, limit, cap, prompts):
    """The text of the input's usable records, as the tokenizer will see it, up to `limit` bytes."""
    seen = 0
    for _, kind, payload, _ in iter_records(paths, cap, prompts):
        if kind == "bad":
            continue
        if kind == "text":
            texts = [payload]
        else:
            if kind == "task":
                messages = payload[0] + [{"role": "assistant", "content": payload[1]}]
            elif kind == "prompt":
                messages = payload
            else:
                messages = payload if kind == "chat" else payload[0] + payload[1][-1:]
            texts = [f"{m['role']}\n{m['content']}" for m in messages]
            texts += [f"\n{m['reasoning_content']}\n" for m in messages if m.get("reasoning_content")]
            texts += [call_json(c) for m in messages for c in m.get("tool_calls", [])]
            tools = [t for m in messages for t in m.get("tools", [])]  # the schemas, in the template's words
            texts += [TOOLS_PREAMBLE, *(json.dumps(t, ensure_ascii=False) for t in tools), TOOLS_POSTAMBLE] if tools else []
        for t in texts:
            yield t
            seen += len(t.encode("utf-8"))
        if limit and seen >= limit:
            return


def _tally(counts, res):
    counts["records"] += res["records"]
    counts["kept"] += len(res["unit_docs"])
    counts["truncated"] += res["truncated"]
    counts["special_strings"] += res["special_strings"]
    counts["by_format"].update(res["by_format"])
    for reason, loc in res["bad"] + res["dropped"]:
        counts["skipped"][reason] += 1
        examples = counts["skipped_examples"].setdefault(reason, [])
        if len(examples) < _EXAMPLES:
            examples.append(loc)


def _write(writers, res):
    """A chunk's documents, each unit (a document, or a DPO pair) to its split, in order."""
    unit_docs = np.asarray(res["unit_docs"], dtype=np.int64)
    unit_val = np.asarray(res["unit_val"], dtype=bool)
    doc_val = np.repeat(unit_val, unit_docs)
    token_val = np.repeat(doc_val, res["doc_lens"])
    refs = np.array(res["refs"] + [None], dtype=object)[:-1]  # one per document (a task's, a pair's margin)
    for split, units, docs, tokens in (("train", ~unit_val, ~doc_val, ~token_val), ("val", unit_val, doc_val, token_val)):
        if units.any():
            writers[split].add_units(res["ids"][tokens], res["mask"][tokens], res["doc_lens"][docs], unit_docs[units],
                                     refs=list(refs[docs]) if len(refs) else None)


def print_summary(out_dir, meta):
    c, t = meta["counts"], meta["timing"]
    rows = [
        ("stage", meta["stage"]),
        ("tokenizer", f"{meta['tokenizer_source']} (vocab {meta['vocab_size']:,}, {meta['dtype']})"),
        ("records read", f"{c['records']:,}   formats: " + ", ".join(f"{k} {v:,}" for k, v in sorted(c["by_format"].items()))),
        ("kept", f"{c['kept']:,}"),
        ("skipped", f"{sum(c['skipped'].values()):,}"),
    ]
    for reason, n in sorted(c["skipped"].items(), key=lambda kv: -kv[1]):
        rows.append((f"  {reason}", f"{n:,}   e.g. {', '.join(c['skipped_examples'][reason])}"))
    rows.append(("truncated", f"{c['truncated']:,}" + (f" (max_len {meta['max_len']})" if meta["max_len"] else "")))
    if c["special_strings"]:
        rows.append(("special strings", f"{c['special_strings']:,} records hold special-token strings such as "
                                        "<|im_end|> in their text: encoded as text (README: Exporting)"))
    for name, s in meta["splits"].items():
        rows.append((f"{name} split", f"{s['documents']:,} documents, {s['tokens']:,} tokens, "
                                      f"{s['targets']:,} targets, {len(s['shards'])} shards"))
    if not meta["splits"]["val"]["documents"]:
        rows.append(("note", "the val split is empty: raise val_fraction or give val_input to measure val loss"))
    per_worker = t["mb_per_s"] / t["workers"]
    rows.append(("speed", f"{t['input_mb']:.1f} MB of jsonl in {t['seconds']:.1f} s: {t['mb_per_s']:.2f} MB/s "
                          f"({t['workers']} workers, {per_worker:.2f} MB/s per worker)"))
    width = max(len(k) for k, _ in rows)
    print(f"prepared {out_dir}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


if __name__ == "__main__":
    main()
