"""
Benchmarks on any run directory or HF Llama directory, through lm-evaluation-harness: the harness builds the
prompts and computes the metrics exactly as everyone reports them; this file is the model side, an lm_eval `LM`.

    python eval.py --out_dir=out/demo/sft --tasks=demo_add,demo_tasks --include_path=data/lm_eval
    python eval.py --hf_dir=hf/mine --tasks=small --limit=500 --json=small.json
    python eval.py --out_dir=out/run --tasks=small --compare=before.json   # differences within 2 SE: "noise"

--tasks takes lm-eval task or group names and the suites below; --include_path a folder of local YAML tasks (as
lm_eval's flag). A run directory may be any stage, a LoRA run too (its base is loaded and the adapters merged in
memory: nothing to export first). --apply_chat_template defaults to on for chat models (sft, dpo, grpo, HF
directories with a chat template), off for base models; the gsm8k suite always uses it.

The figures: every metric with its standard error (lm_eval's), a table and --json; for multiple choice also the
chance-adjusted score (acc - chance) / (1 - chance), chance being the mean of 1 / choices over the items scored
(as CORE does), and the mean of it over the multiple-choice tasks. With --compare=EARLIER.json a difference within
two standard errors of the difference (sqrt(se_a^2 + se_b^2)) is called noise.

The model side, checked against lm_eval's hf backend on the exported model (tests/test_eval.py):
- text is tokenized by the transformers tokenizer the export writes (the same ids as `lm_eval --model hf`);
- loglikelihood: requests sorted by length, batched; the choices of an item share one forward of their context:
  one row holds the context, then every choice side by side (up to twice the model's context in all), each
  attending to the context and to itself, at the positions it would have alone (model.hidden_states' positions
  and mask); only the scored positions reach the last layer's MLP and the head (the context's are read by
  attention alone); a request cut to max_length shares a row with those of the same cut context;
- loglikelihood_rolling: lm_eval's disjoint windows of max_length, scored the same way;
- generate_until: our batched KV-cache generator, stopping at the end-of-turn ids and at the stop strings,
  rows sorted by length; greedy unless the task samples.

Without Hub access a task whose data set is not in the cache is one line naming it and what to download; local
YAML tasks (data_files on disk) need nothing.
"""

import contextlib
import json as jsonlib
import math
import os
import random
import sys
import tempfile

import numpy as np
import torch

import configurator
from llm_trainer.core.checkpoint import hf_config_dict, load_model
from llm_trainer.core.common import autocast, resolve_device, resolve_dtype
from configurator import fail
from llm_trainer.core.files import write_json
from llm_trainer.inference.generation import is_chat_model
from llm_trainer.data.tokenizer import REASONING_TAGS, load_tokenizer

# -----------------------------------------------------------------------------
out_dir = ""  # a run directory (ckpt.pt + tokenizer files) of any stage, a LoRA run too ...
hf_dir = ""  # ... or an HF Llama directory
tasks = ""  # comma-separated lm-eval task or group names, and the suites in SUITES
include_path = ""  # a folder of local YAML tasks (as lm_eval --include_path)
num_fewshot = -1  # -1: each task's own
limit = 0  # items per task at most (0: all); a float < 1 is a share of each task
batch_size = 16  # rows per forward (an item's choices share one row)
device = "auto"
dtype = "auto"  # auto: bfloat16 on a GPU that has it, float32 on CPU
apply_chat_template = None  # None: on for chat models, off for base models
json = ""  # write every figure here
compare = ""  # an earlier --json file: each difference against it, called noise when within two standard errors
seed = 1234  # lm_eval's seeds (few-shot sampling, sampled generation)
# -----------------------------------------------------------------------------
_DEFAULTS = configurator.defaults(globals())

# Named suites: lm-eval task names. Download sizes and costs are in README.md (eval section).
SUITES = {
    "small": {"tasks": ["hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "boolq", "lambada_openai",
                        "openbookqa"]},
    "zh": {"tasks": ["ceval-valid", "cmmlu"]},
    "gsm8k": {"tasks": ["gsm8k"], "chat": True},
}
MAX_GEN_TOKS = 256  # lm_eval's hf backend's default for tasks that set none
# A shared row may be longer than the model's context: each choice keeps the positions it has alone (at most
# max_length), so only the row's attention grows. Twice max_length holds the choices of HellaSwag-like items at
# once (a context computed once, not once per row) with a forward's attention at most 4x a max_length row's.
ROW_SPAN = 2


# -----------------------------------------------------------------------------
# the model as an lm_eval LM


def lm_class():
    """OurLM, defined on first use: lm_eval is imported only by what evaluates."""
    global _LM
    if _LM is None:
        _LM = _define_lm()
    return _LM


_LM = None


def _define_lm():
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import (handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                      postprocess_generated_text)
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class OurLM(TemplateLM):
        """Our Transformer under lm_eval. tokenizer: the transformers tokenizer of the export; stop_ids: the ids
        generation ends at (the export's generation_config eos ids)."""

        def __init__(self, model, tokenizer, max_length, stop_ids, batch_size=16, device="cpu", ptdtype=torch.float32,
                     rank=0, world=1, keep_think_tags=False):
            super().__init__()
            self.model, self.tokenizer, self.max_length, self.stop_ids = model, tokenizer, max_length, tuple(stop_ids)
            self.batch_size, self._device, self.autocast = batch_size, torch.device(device), autocast(
                torch.device(device), ptdtype)
            self._rank, self._world_size = rank, world
            # generated text is decoded without special tokens, as the hf backend does; keep_think_tags keeps the
            # reasoning tags in it (the demo checks a reply's <think> form)
            kept = set(tokenizer.convert_tokens_to_ids(REASONING_TAGS)) if keep_think_tags else set()
            self.hidden_ids = set(tokenizer.all_special_ids) - kept
            self.bos_text = tokenizer.decode(self.prefix_token_id)

        # -- tokens, as lm_eval's hf backend makes them ---------------------------------------------
        @property
        def eot_token_id(self):
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self):
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.tokenizer.eos_token_id

        def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
            special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            if add_special_tokens is None and has_bos_prefix(string, self.bos_text):
                special = {"add_special_tokens": False}  # the text already starts with BOS
            ids = self.tokenizer.encode(string, **special)
            return ids[-left_truncate_len:] if left_truncate_len else ids

        @property
        def tokenizer_name(self):
            return self.tokenizer.name_or_path.replace("/", "__")

        def chat_template(self, chat_template=False):
            return self.tokenizer.chat_template

        def apply_chat_template(self, chat_history, add_generation_prompt=True):
            return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)

        # -- distributed: lm_eval spreads the items over the ranks and gathers them on rank 0 -----------
        def all_gather(self, tensor):
            if self.world_size == 1:
                return tensor
            out = [torch.zeros_like(tensor) for _ in range(self.world_size)]
            torch.distributed.all_gather(out, tensor)
            return torch.cat([t.reshape(-1, *tensor.shape[1:]) if tensor.dim() else t.view(1) for t in out])

        def gather_object(self, obj, dst=0):
            if self.world_size == 1:
                return [obj]
            out = [None] * self.world_size if self.rank == dst else None
            torch.distributed.gather_object(obj, out, dst=dst)
            return out

        def barrier(self):
            if self.world_size > 1:
                torch.distributed.barrier()

        # -- scoring -----------------------------------------------------------------------------------
        def _loglikelihood_tokens(self, requests, disable_tqdm=False, span=ROW_SPAN, **kwargs):
            """[(log-probability, greedy)] of each (key, context ids, continuation ids); span: shared_context_rows'."""
            results = [None] * len(requests)
            rows = shared_context_rows([(ctx, cont) for _, ctx, cont in requests], self.max_length, span)
            for batch in length_batches(rows, self.batch_size):
                for i, answer in zip((i for _, branches in batch for i, _ in branches), self._score(batch)):
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            return results

        @torch.no_grad()
        def _score(self, batch):
            ids, positions, mask, where, targets, owner = pack_rows(batch, self._device)
            with self.autocast:
                # only the positions that predict a continuation token reach the last layer's MLP and the head
                h = self.model.hidden_states(ids, positions=positions, mask=mask, at=where)
                logits = self.model.lm_head(h)
            logp = torch.log_softmax(logits.float(), dim=-1)
            picked = logp.gather(1, targets[:, None])[:, 0]
            n = int(owner.max()) + 1
            sums = torch.zeros(n, dtype=torch.float64, device=logp.device).index_add_(0, owner, picked.double())
            misses = torch.zeros(n, device=logp.device).index_add_(0, owner, (logp.argmax(-1) != targets).float())
            return [(float(s), bool(m == 0)) for s, m in zip(sums.tolist(), misses.tolist())]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            windows, owners = [], []
            for r, (text,) in enumerate(req.args for req in requests):
                for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                        token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length, context_len=1)):
                    windows.append((None, ctx, cont))
                    owners.append(r)
            totals = [0.0] * len(requests)
            # a window's context is the text before it, shared by no other window but the documents' first ones
            # (BOS alone): rows of max_length, a longer one would save a position and cost attention
            for r, (logp, _) in zip(owners, self._loglikelihood_tokens(windows, span=1)):
                totals[r] += logp
            for req, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            return totals

        # -- generation ----------------------------------------------------------------------------------
        def generate_until(self, requests, disable_tqdm=False):
            results = [None] * len(requests)
            by_kwargs = {}
            for i, req in enumerate(requests):
                by_kwargs.setdefault(jsonlib.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
            eos = self.tokenizer.decode(self.eot_token_id)
            for group in by_kwargs.values():
                kwargs = normalize_gen_kwargs(requests[group[0]].args[1], MAX_GEN_TOKS)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_gen = kwargs.pop("max_gen_toks")
                if max_gen >= self.max_length:
                    fail(f"a task asks for {max_gen} new tokens, as many as the model's context ({self.max_length})")
                sampling = sampling_args(kwargs)
                prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_gen)
                           for i in group}
                order = sorted(group, key=lambda i: -len(prompts[i]))
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start:start + self.batch_size]
                    for i, text in zip(chunk, self._generate([prompts[i] for i in chunk], max_gen, until, sampling)):
                        results[i] = postprocess_generated_text(text, until, None)
                        self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
            return results

        def _generate(self, prompts, max_gen, until, sampling):
            def stopped(tokens):  # a stop string in a row's text so far
                texts = self.tokenizer.batch_decode(tokens.tolist())
                return torch.tensor([any(u and u in t for u in until) for t in texts], device=tokens.device)

            with self.autocast:
                outs = self.model.generate_batch(prompts, max_gen, stop_ids=self.stop_ids, max_len=self.max_length,
                                                 pad_id=self.tokenizer.pad_token_id or 0, rows_done=stopped,
                                                 **sampling)
            return [self.tokenizer.decode([t for t in o if t not in self.hidden_ids]) for o in outs]

    return OurLM


def sampling_args(kwargs):
    """generate_batch's sampling keywords from lm_eval's normalised generation kwargs: greedy unless do_sample."""
    if not kwargs.get("do_sample"):
        return {"temperature": 0.0}
    return {"temperature": float(kwargs.get("temperature", 1.0)), "top_k": kwargs.get("top_k"),
            "top_p": kwargs.get("top_p"), "generator": torch.Generator().manual_seed(0)}


def shared_context_rows(pairs, max_length, span=ROW_SPAN):
    """Rows of (context ids, [(request index, continuation ids)]): the continuations of one context together, as
    many as fit span * max_length; a context + continuation longer than max_length + 1 is cut from the left (as
    lm_eval does) first, so it shares a row only with the continuations of its cut context (those as long)."""
    rows, open_rows = [], {}
    for i, (ctx, cont) in enumerate(pairs):
        if len(cont) > max_length:  # no token of context would be left to predict its first token from
            fail(f"a task asks for the log-likelihood of a continuation of {len(cont)} tokens, longer than the "
                 f"model's context ({max_length}): it cannot be scored whole")
        if len(ctx) + len(cont) > max_length + 1:
            whole = (ctx + cont)[-(max_length + 1):]
            ctx = whole[: len(whole) - len(cont)]
        key = tuple(ctx)
        row = open_rows.get(key)
        if row is None or row_length(row) + len(cont) - 1 > span * max_length:
            row = (list(ctx), [])
            open_rows[key] = row
            rows.append(row)
        row[1].append((i, cont))
    return rows


def row_length(row):
    """Input positions of a row: the context, then every continuation but its last token (only a target)."""
    ctx, branches = row
    return len(ctx) + sum(len(cont) - 1 for _, cont in branches)


def length_batches(rows, batch_size):
    """Batches of rows, longest first (similar lengths pad little)."""
    rows = sorted(rows, key=lambda r: -row_length(r))
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def pack_rows(batch, device):
    """Tensors for one forward of a batch of rows: ids, positions (B, T); mask (B, 1, T, T); where (the (row,
    position) of every scored prediction), targets (the token it predicts) and owner (the index of its
    continuation in the batch, 0..)."""
    T = max(row_length(r) for r in batch)
    ids = np.zeros((len(batch), T), dtype=np.int64)
    positions = np.zeros((len(batch), T), dtype=np.int64)
    part = np.full((len(batch), T), -1, dtype=np.int64)  # 0: the context, k: continuation k, -1: padding
    where_b, where_t, targets, owner = [], [], [], []
    n = 0
    for b, (ctx, branches) in enumerate(batch):
        ids[b, :len(ctx)], positions[b, :len(ctx)], part[b, :len(ctx)] = ctx, np.arange(len(ctx)), 0
        t = len(ctx)
        for k, (_, cont) in enumerate(branches, start=1):
            inputs = cont[:-1]
            ids[b, t:t + len(inputs)] = inputs
            positions[b, t:t + len(inputs)] = np.arange(len(ctx), len(ctx) + len(inputs))
            part[b, t:t + len(inputs)] = k
            where_b += [b] * len(cont)
            where_t += [len(ctx) - 1] + list(range(t, t + len(inputs)))  # the context's last token predicts the first
            targets += cont
            owner += [n] * len(cont)
            t += len(inputs)
            n += 1
    part_t = torch.from_numpy(part)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    keys, queries = part_t[:, None, :], part_t[:, :, None]
    # a continuation sees the context and itself; padding sees the context and padding (never a real position)
    mask = causal & ((keys == 0) | (keys == queries))
    as_tensor = lambda a: torch.as_tensor(a, dtype=torch.long).to(device)  # noqa: E731
    return (torch.from_numpy(ids).to(device), torch.from_numpy(positions).to(device), mask[:, None].to(device),
            (as_tensor(where_b), as_tensor(where_t)), as_tensor(targets), as_tensor(owner))


# -----------------------------------------------------------------------------
# the model and its tokenizer


def hf_tokenizer(path, chat, ours=True):
    """The transformers tokenizer lm_eval's hf backend would see: for our directories (a run, a prepared data set)
    the one export.py writes (BOS, and eos for a chat or a base model), built in a scratch directory; an HF
    directory's own (ours=False)."""
    from transformers import AutoTokenizer

    if not ours:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        load_tokenizer(path).save(tmp, chat=chat)
        tok = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    tok.name_or_path = os.path.abspath(path)
    return tok


def chat_stop_ids(tokenizer, chat):
    """export.py's generation_config eos ids: <|im_end|> and <|endoftext|> for a chat model, <|endoftext|> else."""
    return sorted({tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(
        ["<|im_end|>", "<|endoftext|>"] if chat else ["<|endoftext|>"])})


def hf_stop_ids(path, tokenizer):
    """Where transformers' generate stops on an HF directory: its generation_config's (or config's) eos ids, and the
    tokenizer's eos."""
    ids = {tokenizer.eos_token_id}
    for name in ("generation_config.json", "config.json"):
        try:
            with open(os.path.join(path, name), encoding="utf-8") as f:
                eos = jsonlib.load(f).get("eos_token_id")
        except (OSError, ValueError):
            continue
        ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return sorted(i for i in ids if i is not None)


def max_length_of(path, model, info):
    """The context lm_eval's hf backend gives the export: config.json's max_position_embeddings."""
    if info["kind"] == "hf":
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return int(jsonlib.load(f).get("max_position_embeddings") or model.mcfg.max_seq_len)
    return int(hf_config_dict(model.mcfg)["max_position_embeddings"])


def load_lm(path, batch_size=16, device="cpu", dtype="auto", keep_think_tags=False):
    """(OurLM for the model in `path`, whether it is a chat model)."""
    dev = resolve_device(device)
    model, info = load_model(path, dev, head="lm")
    chat, ours = is_chat_model(path, info), info["kind"] == "run"
    tok = hf_tokenizer(path, chat, ours)
    stop_ids = chat_stop_ids(tok, chat) if ours else hf_stop_ids(path, tok)
    lm = lm_class()(model, tok, max_length_of(path, model, info), stop_ids, batch_size, dev,
                    resolve_dtype(dtype, dev), keep_think_tags=keep_think_tags)
    return lm, chat


# -----------------------------------------------------------------------------
# tasks


def task_manager(include, names=()):
    """lm_eval's index of the tasks: of include_path alone when it holds every name asked for (indexing lm_eval's
    own thousands of YAML files takes seconds), else of both."""
    from lm_eval.tasks import TaskManager

    if include and not os.path.isdir(include):
        fail(f"include_path {include} is not a directory")
    if include and names:
        local = TaskManager(include_path=include, include_defaults=False)
        if set(names) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=include or None)


def expand_tasks(spec):
    """(lm-eval task names, chat template forced on) of a --tasks value: suites expanded, duplicates dropped."""
    names, chat = [], False
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        suite = SUITES.get(name)
        chat |= bool(suite and suite.get("chat"))
        names += [t for t in (suite["tasks"] if suite else [name]) if t not in names]
    if not names:
        fail("tasks is empty: give lm-eval task names, or a suite: " + ", ".join(SUITES))
    return names, chat


def load_tasks(names, manager):
    """lm_eval's tasks (Task and Group objects) for the names; an unknown name, or a data set that cannot be had
    (offline and not cached), is one line naming the task and what to download, before any model is loaded."""
    unknown = [n for n in names if n not in set(manager.all_tasks)]
    if unknown:
        fail(f"unknown task {unknown[0]!r}: not an lm-eval task, group or tag, nor a suite ({', '.join(SUITES)}), nor "
             "a YAML task under include_path (lm_eval ls tasks lists them)")
    built = []
    for name in names:
        try:
            with quiet():
                obj = manager._load_spec(name)
        except Exception as e:  # datasets raises many kinds when the Hub cannot be reached
            fail(f"task {name}: its data set ({dataset_of(name, manager)}) could not be loaded ({type(e).__name__}: "
                 f"{first_line(e)}); without Hub access, load it once where there is access (lm_eval --tasks {name} "
                 "--limit 1, or datasets.load_dataset) and copy the Hugging Face cache (~/.cache/huggingface, or "
                 "$HF_HOME) here")
        built += obj if isinstance(obj, list) else [obj]  # a tag is a list of tasks
    return built


def dataset_of(name, manager):
    """The Hub data set a task (or the first task of a group) reads, for the line that says it is missing."""
    entry = manager._entry(name)
    cfg = (entry.cfg or {}) if entry else {}
    if "dataset_path" not in cfg and isinstance(cfg.get("task"), list) and cfg["task"]:
        first = cfg["task"][0]
        return dataset_of(first, manager) if isinstance(first, str) else "its Hub data set"
    if "dataset_path" not in cfg:
        return "its Hub data set"
    return cfg["dataset_path"] + (f", {cfg['dataset_name']}" if cfg.get("dataset_name") else "")


def first_line(e):
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "no message"


@contextlib.contextmanager
def quiet():
    """lm_eval and datasets log a lot at INFO, and datasets draws progress bars: only warnings get through."""
    import logging

    import datasets

    datasets.disable_progress_bars()

    loggers = [logging.getLogger(n) for n in ("lm-eval", "lm_eval", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# -----------------------------------------------------------------------------
# evaluation and its figures


def run_tasks(lm, built, manager, num_fewshot=-1, limit=0, chat=False, seed=1234):
    """lm_eval's results (with the samples) of the tasks (load_tasks) on lm; None on ranks other than 0."""
    from lm_eval.evaluator import simple_evaluate

    with quiet(), preserved_rng(), without_environment_report():
        return simple_evaluate(model=lm, tasks=built, task_manager=manager, limit=limit or None, log_samples=True,
                               num_fewshot=None if num_fewshot < 0 else num_fewshot, apply_chat_template=chat,
                               random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                               fewshot_random_seed=seed)


@contextlib.contextmanager
def without_environment_report():
    """lm_eval ends every evaluation by collecting an environment report (torch.utils.collect_env: pip and other
    subprocesses, ~0.7 s a call on 2 CPU cores, 2.5 s the first) into results that eval.py never writes: it would
    be paid at every in-training evaluation. Our --json records lm_eval's version."""
    from lm_eval import evaluator

    report = evaluator.add_env_info
    evaluator.add_env_info = lambda results: None
    try:
        yield
    finally:
        evaluator.add_env_info = report


@contextlib.contextmanager
def preserved_rng():
    """lm_eval seeds Python's, numpy's and torch's generators: put them back afterwards (training goes on)."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def figures(results):
    """{"tasks": {task: {"n", "metrics": {metric: {"value", "stderr"}}, and for multiple choice "chance" and
    "centered"}}, "mean_centered"} from lm_eval's results: every task and group it reports."""
    out = {}
    for task, res in results["results"].items():
        metrics = {}
        for key, value in res.items():
            metric, _, filt = key.partition(",")
            if not filt or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            name = metric if filt == "none" else f"{metric},{filt}"
            se = res.get(f"{metric}_stderr,{filt}")
            metrics[name] = {"value": float(value), "stderr": float(se) if isinstance(se, (int, float)) else None}
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        entry = {"n": n, "metrics": metrics}
        samples = results.get("samples", {}).get(task)
        if samples and results["configs"].get(task, {}).get("output_type") == "multiple_choice":
            entry["chance"] = float(np.mean([1 / len(s["arguments"]) for s in samples]))
            main = metrics.get("acc_norm") or metrics.get("acc")
            if main is not None:
                entry["centered"] = (main["value"] - entry["chance"]) / (1 - entry["chance"])
        out[task] = entry
    centered = [e["centered"] for e in out.values() if "centered" in e]
    return {"tasks": out, "mean_centered": float(np.mean(centered)) if centered else None}


def differences(ours, theirs):
    """{task: {metric: {"diff", "se", "noise"}}} for the metrics both carry, se = sqrt(se_a^2 + se_b^2)."""
    out = {}
    for task, entry in ours["tasks"].items():
        other = theirs["tasks"].get(task, {}).get("metrics", {})
        for metric, m in entry["metrics"].items():
            o = other.get(metric)
            if o is None:
                continue
            se = math.sqrt(m["stderr"] ** 2 + o["stderr"] ** 2) if m["stderr"] is not None and o["stderr"] is not None \
                else None
            diff = m["value"] - o["value"]
            out.setdefault(task, {})[metric] = {"diff": diff, "se": se, "noise": se is not None and abs(diff) <= 2 * se}
    return out


def table(fig, diffs=None):
    """The figures as text: task, metric, value ± standard error, items, chance-adjusted, and the difference."""
    lines = [f"{'task':28s} {'metric':18s} {'value':>8s} {'± se':>8s} {'items':>6s} {'adjusted':>9s}"
             + ("  vs compare" if diffs is not None else "")]
    for task, e in fig["tasks"].items():
        for metric, m in e["metrics"].items():
            se = "" if m["stderr"] is None else f"{m['stderr']:.4f}"
            adj = f"{e['centered']:.4f}" if "centered" in e and metric in ("acc", "acc_norm") else ""
            line = f"{task[:28]:28s} {metric[:18]:18s} {m['value']:8.4f} {se:>8s} {e['n'] or '':>6} {adj:>9s}"
            d = (diffs or {}).get(task, {}).get(metric)
            if d is not None:
                line += f"  {d['diff']:+.4f}" + (" (noise: within 2 SE)" if d["noise"] else "")
            lines.append(line)
    if fig["mean_centered"] is not None:
        lines.append(f"mean chance-adjusted score over the multiple-choice tasks: {fig['mean_centered']:.4f}")
    return "\n".join(lines)


def flat(fig, prefix="tasks/"):
    """{"tasks/<task>/<metric>": value, ".../<metric>_se": stderr}: the figures as a training log record."""
    out = {}
    for task, e in fig["tasks"].items():
        for metric, m in e["metrics"].items():
            out[f"{prefix}{task}/{metric}"] = m["value"]
            if m["stderr"] is not None:
                out[f"{prefix}{task}/{metric}_se"] = m["stderr"]
        if "centered" in e:
            out[f"{prefix}{task}/centered"] = e["centered"]
    if fig["mean_centered"] is not None:
        out[f"{prefix}mean_centered"] = fig["mean_centered"]
    return out


def chat_template_on(forced, chat, setting):
    """Whether prompts go through the chat template: always for a suite that wants it, else as asked (None: for
    chat models)."""
    return forced or (chat if setting is None else bool(setting))


def evaluate(path, task_spec, include="", num_fewshot=-1, limit=0, batch_size=16, device="cpu", dtype="auto",
             chat_template=None, seed=1234, keep_think_tags=False, max_gen_toks=0):
    """(figures, lm_eval's results) of the model in `path` on the tasks: what demo.py and main() call.
    max_gen_toks > 0: the generative tasks' new tokens at most, instead of their own."""
    names, forced = expand_tasks(task_spec)
    manager = task_manager(include, names)
    built = load_tasks(names, manager)
    for task in (t for obj in built for t in (obj.get_all_tasks() if hasattr(obj, "get_all_tasks") else [obj])):
        if max_gen_toks and task.get_config("output_type") == "generate_until":
            task.set_config(key="generation_kwargs", value={"max_gen_toks": max_gen_toks}, update=True)
    lm, chat = load_lm(path, batch_size, device, dtype, keep_think_tags)
    results = run_tasks(lm, built, manager, num_fewshot, limit, chat_template_on(forced, chat, chat_template), seed)
    return figures(results), results


class TrainingTasks:
    """The tasks train.py evaluates during training (eval_tasks): loaded once, before the first step (a task
    without its data stops the run there); called with the model being trained, it returns the figures as log
    keys (flat) on rank 0, {} on the others. The items are spread over the ranks (lm_eval's rank/world split); the
    random generators are put back afterwards and the model's train/eval mode too, so that training goes on as if
    nothing had happened."""

    def __init__(self, cfg, rank, world, device, ptdtype):
        from llm_trainer.inference.generation import CHAT_STAGES

        names, forced = expand_tasks(cfg["eval_tasks"])
        self.manager = task_manager(cfg["eval_tasks_include"], names)
        self.tasks = load_tasks(names, self.manager)
        self.chat = chat_template_on(forced, cfg["stage"] in CHAT_STAGES, None)
        self.tokenizer = hf_tokenizer(cfg["data_dir"], cfg["stage"] in CHAT_STAGES)
        self.stop_ids = chat_stop_ids(self.tokenizer, cfg["stage"] in CHAT_STAGES)
        self.limit, self.batch_size = cfg["eval_tasks_limit"], cfg["batch_size"]
        self.rank, self.world, self.device, self.ptdtype = rank, world, device, ptdtype

    def __call__(self, model):
        lm = lm_class()(model, self.tokenizer, int(hf_config_dict(model.mcfg)["max_position_embeddings"]),
                        self.stop_ids, self.batch_size, self.device, self.ptdtype, self.rank, self.world)
        was_training = model.training
        model.eval()
        try:
            results = run_tasks(lm, self.tasks, self.manager, limit=self.limit, chat=self.chat)
        finally:
            model.train(was_training)
        return flat(figures(results)) if results is not None else {}


def main(argv=None):
    cfg = configurator.configure(_DEFAULTS, argv)
    if bool(cfg["out_dir"]) == bool(cfg["hf_dir"]):
        fail("give one of out_dir (a run directory) or hf_dir (an HF Llama directory)")
    if cfg["batch_size"] < 1:
        fail(f"batch_size must be >= 1, got {cfg['batch_size']}")
    earlier = None
    if cfg["compare"]:
        try:
            with open(cfg["compare"], encoding="utf-8") as f:
                earlier = jsonlib.load(f)["figures"]
        except (OSError, ValueError, KeyError) as e:
            fail(f"compare={cfg['compare']}: not an eval.py --json file ({type(e).__name__}: {first_line(e)})")
    path = cfg["out_dir"] or cfg["hf_dir"]
    fig, results = evaluate(path, cfg["tasks"], cfg["include_path"], cfg["num_fewshot"], cfg["limit"], cfg["batch_size"],
                            cfg["device"], cfg["dtype"], cfg["apply_chat_template"], cfg["seed"])
    diffs = differences(fig, earlier) if earlier is not None else None
    print(table(fig, diffs))
    if cfg["json"]:
        write_json(cfg["json"], {"model": os.path.abspath(path), "config": cfg, "lm_eval": lm_eval_version(),
                               "figures": fig, "differences": diffs}, indent=1)
        print(f"(written to {cfg['json']})", file=sys.stderr)


def lm_eval_version():
    from importlib.metadata import version

    return version("lm_eval")


if __name__ == "__main__":
    main()
