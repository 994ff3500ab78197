"""The import picture of the library: llm_trainer's layers import only downwards, and nothing circles."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "llm_trainer"
LAYERS = ["core", "data", "inference", "training", ""]  # bottom to top; "": modules at the package's top
BELOW_ALL = {"model", "configurator"}  # the two top-level files the package builds on


def _imports(path):
    """The llm_trainer modules and top-level project files one source file imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:  # `from package import module` names the module, else the module itself
                full = f"{node.module}.{alias.name}"
                names.add(full if (ROOT / (full.replace(".", "/") + ".py")).exists() else node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    top = {p.stem for p in ROOT.glob("*.py")}
    return {n for n in names if n.startswith("llm_trainer.") or n.split(".")[0] in top}


def _layer(name):
    """The layer of llm_trainer.<layer>.<module>, or of llm_trainer.<module> at the top."""
    parts = name.split(".")
    return LAYERS.index(parts[1] if len(parts) == 3 else "")


def _modules():
    found = {f"llm_trainer.{p.parent.name}.{p.stem}": p for p in PKG.glob("*/*.py") if p.stem != "__init__"}
    return found | {f"llm_trainer.{p.stem}": p for p in PKG.glob("*.py") if p.stem != "__init__"}


def test_every_package_module_sits_in_a_layer():
    assert {p.parent.name for p in PKG.glob("*/*.py")} == set(LAYERS[:-1])


def test_layers_import_only_downwards():
    problems = []
    for name, path in _modules().items():
        for imported in _imports(path):
            if imported.startswith("llm_trainer."):
                # a module of the package: its own layer or one below
                if _layer(imported) > _layer(name):
                    problems.append(f"{name} imports {imported} from a layer above")
            elif imported.split(".")[0] not in BELOW_ALL:
                problems.append(f"{name} imports the command {imported}")
    for top in BELOW_ALL:
        if any(i.startswith("llm_trainer") for i in _imports(ROOT / f"{top}.py")):
            problems.append(f"{top}.py imports the package it sits below")
    assert not problems, "\n".join(problems)


def test_no_import_circles_inside_a_layer():
    modules = _modules()
    graph = {n: {i for i in _imports(p) if i in modules} for n, p in modules.items()}
    state = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", "import circle: " + " -> ".join(path + [node])
        state[node] = "open"
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])
        state[node] = "done"

    for n in sorted(graph):
        visit(n, [])
