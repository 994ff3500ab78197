"""
Rewards for the grpo stage: a reward is a function (prompt, completion, reference) -> float, where
prompt is the user's text, completion the generated reply (its stop token removed) and reference
the answer the data gives (None for a prompt prepared alone); or a reward model, `rm:DIR`.

The config names one or a weighted sum, `reward = "exact_answer + 0.2 * think_format"`; each term
is a built-in (below), `module:function` (an importable module), `path/to/file.py:function` (a
file of yours) or `rm:DIR`, a reward model (a run of stage rm, or an HF LlamaForSequenceClassification
directory, exported or not). A reward is code that runs, like a config file: use your own.

A function reads the reference unless it says it needs none (`fn.needs_reference = False`, as
think_format does): such a reward on prompts without references is refused before any work.

A reward model shares the policy's tokenizer (checked: as many ids, and the tokenizer the data was
prepared with), so it scores the policy's own tokens, without a decode and re-encode (which need not
give back the sampled ids): each completion with its prompt as the chat template renders the conversation (the prompt's
messages and header, the reply, `<|im_end|>` and the line break after it, as its training pairs end),
in batches, without gradients, frozen in the run's compute dtype (bfloat16 on a GPU), never in the
optimizer. A resumed run rebuilds it from the same directory, refused if its weights changed since.

One term may be `teacher:DIR` (on-policy distillation): a frozen teacher model that grades every token
of a completion (llm_trainer/training/grpo.py) instead of the completion as a whole, so it is not one of
the terms Reward sums.
"""

import importlib
import math
import re
import unicodedata

import torch

from configurator import fail
from llm_trainer.core import checkpoint
from llm_trainer.core.files import load_python_file
from llm_trainer.data.tokenizer import check_same_vocabulary
from llm_trainer.inference.generation import chat_stop_ids

RM_PREFIX = "rm:"
SCORE_ROWS = 64  # conversations a reward model scores in one forward
THINK = re.compile(r"\s*<think>(.*?)</think>(.*)", re.S)


def normalise(text):
    """Full-width forms folded to ASCII (NFKC: "７８８" -> "788"), runs of white space to one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def answer_part(completion):
    """What follows the closed <think>...</think> block, or the whole completion when it has no block; None when
    a <think> is opened and never closed (no answer yet)."""
    if "<think>" in completion and "</think>" not in completion.split("<think>", 1)[1]:
        return None
    return completion.rsplit("</think>", 1)[-1]


def exact_answer(prompt, completion, reference):
    """1.0 when the answer part equals the reference (both normalised), else 0.0."""
    answer = answer_part(completion)
    return float(answer is not None and normalise(answer) == normalise(reference))


def think_format(prompt, completion, reference):
    """1.0 for one well-formed block: <think>, some reasoning, </think>, then a non-empty answer; else 0.0."""
    m = THINK.fullmatch(completion)
    return float(bool(m) and completion.count("<think>") == 1 and completion.count("</think>") == 1
                 and bool(m.group(1).strip()) and bool(m.group(2).strip()))


think_format.needs_reference = False
BUILTINS = {"exact_answer": exact_answer, "think_format": think_format}


TEACHER = "teacher:"  # the prefix of a teacher term: teacher:DIR


def parse(spec):
    """[(weight, name)] of the terms of a reward spec."""
    terms = []
    for term in (t.strip() for t in spec.split("+")):
        weight, _, name = term.rpartition("*")
        try:
            terms.append((float(weight) if weight.strip() else 1.0, name.strip()))
        except ValueError:
            fail(f"reward {spec!r}: {term!r} is not 'name' or 'weight * name'")
    return terms


def teacher_term(spec):
    """(weight, directory) of the teacher:DIR term of a reward spec, or None."""
    found = [(weight, name[len(TEACHER):]) for weight, name in parse(spec) if name.startswith(TEACHER)]
    if len(found) > 1:
        fail(f"reward {spec!r}: more than one teacher term (one teacher grades the tokens)")
    return found[0] if found else None


class Reward:
    """A weighted sum of reward functions and reward models from a spec such as "exact_answer + 0.2 * think_format"
    or "rm:out/rm + 0.5 * think_format". load_reward_model(path) -> RewardModel loads an rm: term's model (grpo's
    setup: on the run's device, with its vocabulary checked). teacher: the spec's (weight, directory) of teacher:DIR,
    or None."""

    def __init__(self, spec, load_reward_model=None):
        self.spec, self.teacher, self.terms, self.reward_models = spec, teacher_term(spec), [], {}
        for weight, name in parse(spec):
            if name.startswith(TEACHER):
                continue
            if name.startswith(RM_PREFIX):
                path = name[len(RM_PREFIX):]
                if load_reward_model is None:
                    fail(f"reward {spec!r}: {name} is a reward model, which scores conversations, not text alone")
                if path not in self.reward_models:
                    self.reward_models[path] = load_reward_model(path)
                self.terms.append((weight, name, self.reward_models[path]))
            else:
                self.terms.append((weight, name, load(name)))

    @property
    def needs_reference(self):
        """The names of the terms that read the reference answer."""
        return [name for _, name, fn in self.terms
                if not isinstance(fn, RewardModel) and getattr(fn, "needs_reference", True)]

    def __call__(self, prompt, completion, reference):
        return self.score([prompt], [completion], [reference])[0][0]

    def score(self, prompts, completions, references, conversations=None):
        """(the reward of each completion, the reward models' scores summed per completion or None without an rm:
        term); lists of one item per completion; conversations: each completion with its prompt as token ids
        (conversation()), which the reward models score."""
        totals, raw = [0.0] * len(completions), None
        for weight, name, fn in self.terms:
            if isinstance(fn, RewardModel):
                values = fn(conversations)
                raw = [a + b for a, b in zip(raw or [0.0] * len(values), values)]
            else:
                values = [self._call(name, fn, *item) for item in zip(prompts, completions, references)]
            totals = [t + weight * v for t, v in zip(totals, values)]
        return totals, raw

    @staticmethod
    def _call(name, fn, prompt, completion, reference):
        try:
            value = fn(prompt, completion, reference)
        except Exception as e:
            fail(f"reward {name} raised {type(e).__name__}: {e} (prompt {prompt[:80]!r})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail(f"reward {name} returned {value!r}, not a finite number (prompt {prompt[:80]!r})")
        return float(value)


class RewardModel:
    """A frozen reward model (a model with head "score") that scores conversations given as token ids: in batches of
    SCORE_ROWS, without gradients, each read at its last token, under the run's autocast."""

    def __init__(self, model, pad_id, autocast):
        self.model, self.pad_id, self.autocast = model, pad_id, autocast

    @torch.no_grad()
    def __call__(self, conversations):
        device, scores = self.model.model.embed_tokens.weight.device, []
        for i in range(0, len(conversations), SCORE_ROWS):
            chunk = conversations[i: i + SCORE_ROWS]
            lengths = torch.tensor([len(c) for c in chunk], device=device)
            x = torch.full((len(chunk), int(lengths.max())), self.pad_id, dtype=torch.long)
            for r, ids in enumerate(chunk):
                x[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            with self.autocast:
                scores += self.model(x.to(device), logits_at=lengths - 1)[:, 0].float().tolist()
        return scores


def conversation(tokenizer, prompt, completion):
    """The token ids of a completion with its prompt (rendered up to the assistant's header) as the chat template
    renders the conversation: the reply without its stop token, then <|im_end|> and the line break after it."""
    reply = completion[:-1] if completion and completion[-1] in chat_stop_ids(tokenizer) else completion
    return list(prompt) + list(reply) + [tokenizer.im_end_id] + tokenizer.encode("\n")


def load_reward_model(path, data_dir, vocab_size, device, dtype, autocast, pad_id, recorded=None):
    """(RewardModel, its weights_source for the checkpoints) of rm:path: a reward model with the policy's vocabulary
    (vocab_size ids, data_dir's tokenizer); recorded: the source a resumed run saved for it (the weights must be
    unchanged)."""
    what = f"the reward model {RM_PREFIX}{path}"
    model, source = checkpoint.frozen_model(path, what, device, dtype, head="score", recorded=recorded)
    check_same_vocabulary(what, path, (model.mcfg.vocab_size, vocab_size), "the policy", data_dir)
    return RewardModel(model, pad_id, autocast), source


def load(name):
    """The function a reward name stands for: a built-in, module:function or path/file.py:function."""
    if name in BUILTINS:
        return BUILTINS[name]
    where, _, attr = name.rpartition(":")
    if not where or not attr:
        fail(f"reward {name!r}: not a built-in ({', '.join(BUILTINS)}), module:function or file.py:function")
    if where.endswith(".py"):
        module = load_python_file(where, f"reward {name!r}")
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            fail(f"reward {name!r}: cannot import {where}: {e}")
    fn = getattr(module, attr, None)
    if not callable(fn):
        fail(f"reward {name!r}: {where} has no function {attr}")
    return fn
