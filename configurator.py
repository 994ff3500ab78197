"""
Configuration shared by every script, nanoGPT style.

A script defines its defaults as plain module globals, collects them once
right after, and resolves a config from them in main():

    _DEFAULTS = configurator.defaults(globals())
    ...
    config = configurator.configure(_DEFAULTS, argv)

Each bare command-line argument is a Python config file that is executed
(a config file is code, like a script: only run config files you trust); each
`--key=value` overrides one default. Values are parsed with ast.literal_eval,
falling back to a plain string. An unknown key or a value of the wrong type
is a one-line error naming the key (with close matches), exit status 2.
"""

import ast
import difflib
import sys
import traceback


class ConfigError(SystemExit):
    """A user error found before any work started: one line, exit status 2."""

    def __init__(self, message):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


def fail(message):
    """Stop with a one-line error and exit status 2 (bad config, bad input, bad data)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise ConfigError(message)


def defaults(namespace):
    """The configurable globals of a script and their values: plain values; not modules, functions,
    _private or CONSTANT names."""
    allowed = (int, float, bool, str, list, tuple, dict, type(None))
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not k.isupper() and isinstance(v, allowed)}


def _unknown_key(key, known, where=""):
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    fail(f"unknown config key '{key}'{where}{hint}")


def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def check_type(key, value, default):
    """Return value, converted where lossless (int -> float), or fail naming the key."""
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, (int, float)):
        return float(value)
    elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    elif isinstance(value, type(default)):
        return value
    fail(f"config key '{key}' expects {type(default).__name__} (default {default!r}), got {value!r}")


def configure(defaults, argv=None):
    """The cfg resolved from `defaults` (left unchanged), cfg files and --key=value overrides in argv."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = dict(defaults)
    known = list(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            _apply_file(arg, cfg, defaults)
            continue
        if "=" not in arg:
            fail(f"argument '{arg}' must look like --key=value")
        key, text = arg[2:].split("=", 1)
        if key not in defaults:
            _unknown_key(key, known)
        cfg[key] = check_type(key, _parse_value(text), defaults[key])
    return cfg


def _apply_file(path, config, defaults):
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except OSError as e:
        fail(f"cannot read config file '{path}': {e.strerror}")
    scope = dict(config)
    try:  # a config file is code: an error in it is still one line, saying where
        exec(compile(source, path, "exec"), scope)
    except SyntaxError as e:
        fail(f"config file '{path}', line {e.lineno}: SyntaxError: {e.msg}")
    except Exception as e:
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == path), "?")
        fail(f"config file '{path}', line {line}: {type(e).__name__}: {e}")
    for key in scope:
        if key.startswith("_") or key == "__builtins__":
            continue
        value = scope[key]
        if key not in defaults:
            if callable(value) or type(value).__name__ == "module":
                continue  # helpers a config file defines or imports for itself
            _unknown_key(key, list(defaults), f" in config file '{path}'")
        if value is not config[key]:
            config[key] = check_type(f"{key}' in '{path}", value, defaults[key])


def print_config(config):
    width = max((len(k) for k in config), default=0)
    print("config:")
    for k, v in config.items():
        print(f"  {k:<{width}} = {v!r}")
