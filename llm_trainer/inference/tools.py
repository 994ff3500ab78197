"""
The tools a model may call: the built-in calculator, or the functions of a Python file of yours, each offered to the
model with its JSON schema (from its signature and docstring, by transformers.utils.get_json_schema: type hints
and a Google-style docstring with an `Args:` line per argument), and run on a call, its result the text of the tool
message. sample.py's --tools and grpo's grpo_tools name them the same way: "calculator", "path/to/tools.py" (every
public function the file defines), or several, comma-separated.

A call never stops anything: an unknown name, arguments that do not fit, or an exception in the function come back
as the result's text ("error: ..."), for the model to read. A tools file is code that runs, like a config file: use
your own.
"""

import ast
import inspect
import json
import math
import operator

from configurator import fail
from llm_trainer.core.files import load_python_file

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_CHARS = 200  # an expression longer than this is refused (deep nesting, huge literals)
_MAX_BITS = 1000  # an integer past 2**1000 (a power tower) is refused before it is computed further
_MAX_EXPONENT = 1000
_SYMBOLS = {"×": "*", "÷": "/", "^": "**", "（": "(", "）": ")"}


def calculator(expression: str):
    """Evaluate an arithmetic expression.

    Args:
        expression: e.g. 147 + 85
    """
    for symbol, op in _SYMBOLS.items():
        expression = expression.replace(symbol, op)
    if len(expression) > _MAX_CHARS:
        raise ValueError(f"an expression of at most {_MAX_CHARS} characters")
    value = _evaluate(ast.parse(expression.strip(), mode="eval").body)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(value)


def _evaluate(node):
    """The value of an arithmetic expression tree: numbers and the operators above, nothing else (no names, no
    calls, no attribute access: no code runs)."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)  # 1e999 is inf
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        a, b = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(b) > _MAX_EXPONENT:
            raise ValueError(f"an exponent of at most {_MAX_EXPONENT}")
        return _bounded(_BINARY[type(node.op)](a, b))
    raise ValueError(f"not arithmetic: {ast.unparse(node)}")


def _bounded(value):
    """value, a real number of bounded size; else ValueError. (-8) ** (1 / 3) is complex in Python: refused, as
    anything it would go on to compute would be."""
    if isinstance(value, complex):
        raise ValueError("the result is not a real number")
    if (isinstance(value, int) and value.bit_length() > _MAX_BITS) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise ValueError("the result is too large")
    return value


BUILTINS = {"calculator": calculator}


class Tools:
    """The functions named by a spec ("calculator", "tools.py", comma-separated), their schemas (OpenAI's
    {"type": "function", "function": {...}}, as the chat template takes them) and run()."""

    def __init__(self, spec):
        self.spec, self.functions = spec, {}
        for item in (s.strip() for s in spec.split(",") if s.strip()):
            for fn in [BUILTINS[item]] if item in BUILTINS else _functions_of(item, spec):
                if fn.__name__ in self.functions:
                    fail(f"tools {spec!r}: two tools are named {fn.__name__}")
                self.functions[fn.__name__] = fn
        if not self.functions:
            fail(f"tools {spec!r}: no tool named")
        self.schemas = [_schema(fn, spec) for fn in self.functions.values()]

    def run(self, call):
        """The result of a call ({"name", "arguments"}) as the text of a tool message: a string as it is, anything
        else as JSON; what went wrong as "error: ..."."""
        fn = self.functions.get(call["name"])
        if fn is None:
            return f"error: no tool named {call['name']!r} (there are {', '.join(self.functions)})"
        try:
            result = fn(**call["arguments"])
        except Exception as e:  # the model's mistake (or the tool's) is the model's to read, not a crash
            return f"error: {type(e).__name__}: {e}"
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)


def _functions_of(path, spec):
    """The public functions a Python file defines, in order."""
    if not path.endswith(".py"):
        fail(f"tools {spec!r}: {path!r} is neither a built-in ({', '.join(BUILTINS)}) nor a .py file")
    module = load_python_file(path, f"tools {spec!r}")
    functions = [f for name, f in vars(module).items()
                 if inspect.isfunction(f) and f.__module__ == module.__name__ and not name.startswith("_")]
    if not functions:
        fail(f"tools {spec!r}: {path} defines no public function")
    return functions


def _schema(fn, spec):
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as e:  # no docstring, an argument without a type hint or an Args: line
        fail(f"tools {spec!r}: no schema for {fn.__name__}: {e} (a tool needs type hints and a docstring with an "
             "Args: line per argument)")
