"""
Files written so that a crash never leaves half of one, JSON as every script writes it, file digests, and the
Python files of a user's (rewards, tools) loaded as modules.
"""

import hashlib
import importlib.util
import json
import os

from configurator import fail


def write_synced(path, write, mode="wb"):
    """Write a file with write(f), then flush it to the disk: after a crash it is whole or absent."""
    with open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp, path):
    """Rename tmp over path and make the rename itself survive a power loss."""
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_json(path, obj, indent=2, durable=False):
    """JSON in UTF-8 (non-ASCII kept) with a final newline; durable: written beside, synced, then renamed."""
    def dump(f):
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")

    if not durable:
        with open(path, "w", encoding="utf-8") as f:
            dump(f)
        return
    write_synced(path + ".tmp", dump, mode="w")
    replace_durably(path + ".tmp", path)


def sha256_file(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_python_file(path, what):
    """The module a user's Python file defines, run as it is loaded (code that runs, like a config file); a missing
    file or one that raises as it loads: one line naming `what` asked for it."""
    if not os.path.isfile(path):
        fail(f"{what}: no file {path}")
    spec = importlib.util.spec_from_file_location(f"user_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        fail(f"{what}: loading {path} raised {type(e).__name__}: {e}")
    return module
