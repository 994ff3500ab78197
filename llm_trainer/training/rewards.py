"""
Rewards for the grpo stage: a reward is a function (prompt, completion, reference) -> float, where
prompt is the user's text, completion the generated reply (its stop token removed) and reference
the answer the data gives.

The config names one or a weighted sum, `reward = "exact_answer + 0.2 * think_format"`; each term
is a built-in (below), `module:function` (an importable module) or `path/to/file.py:function` (a
file of yours). A reward is code that runs, like a config file: use your own.
"""

import importlib
import math
import re
import unicodedata

from configurator import fail
from llm_trainer.core.files import load_python_file

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


BUILTINS = {"exact_answer": exact_answer, "think_format": think_format}


class Reward:
    """A weighted sum of reward functions from a spec such as "exact_answer + 0.2 * think_format"."""

    def __init__(self, spec):
        self.spec, self.terms = spec, []
        for term in (t.strip() for t in spec.split("+")):
            weight, _, name = term.rpartition("*")
            try:
                weight = float(weight) if weight.strip() else 1.0
            except ValueError:
                fail(f"reward {spec!r}: {term!r} is not 'name' or 'weight * name'")
            self.terms.append((weight, name.strip(), load(name.strip())))

    def __call__(self, prompt, completion, reference):
        total = 0.0
        for weight, name, fn in self.terms:
            try:
                value = fn(prompt, completion, reference)
            except Exception as e:
                fail(f"reward {name} raised {type(e).__name__}: {e} (prompt {prompt[:80]!r})")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(f"reward {name} returned {value!r}, not a finite number (prompt {prompt[:80]!r})")
            total += weight * float(value)
        return total


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
