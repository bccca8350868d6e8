"""The imports that must never exist (docs/architecture.md): the IAIS math knows no model, data and
model know neither each other, the config nor the trainer, evaluation runs without the trainer,
nothing imports the launchers, and no import circle exists. Every import statement counts, at
module level, inside a function or under ``TYPE_CHECKING``; every package is covered."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "iais_scale"
PACKAGES = ("iais_scale", "data_tools", "launchers", "benchmarks")
# The imports inside functions, on purpose: the command lines install their stop handling and parse
# their arguments before torch, DeepSpeed and transformers load (seconds), and `data_tools features`
# loads the model only when a backbone runs, so the converters start without it.
DEFERRED = {("iais_scale/cli.py", "train"): 1, ("iais_scale/cli.py", "evaluate"): 2,
            ("data_tools/features.py", "extract_backbone_features"): 2}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Absolute names of the project modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            found.add(name)
            found |= {f"{name}.{a.name}" for a in node.names}
    return {n for n in found if n.split(".")[0] in PACKAGES}


def modules(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


ABOVE_DATA_AND_MODEL = ["iais_scale.config", "iais_scale.cli", "iais_scale.engine", "iais_scale.objectives",
                        "iais_scale.evaluate", "iais_scale.checkpoint", "iais_scale.viz", "iais_scale.metrics",
                        "iais_scale.preemption", "data_tools"]
RULES = [
    # (modules, forbidden prefixes, why)
    ([PACKAGE / "iais.py"], ["iais_scale."], "the IAIS math is pure tensor functions"),
    (modules(PACKAGE / "data"), ["iais_scale.model", *ABOVE_DATA_AND_MODEL], "data knows no model, config or trainer"),
    (modules(PACKAGE / "model"), ["iais_scale.data", *ABOVE_DATA_AND_MODEL], "the model knows no data, config or trainer"),
    ([PACKAGE / "config.py"], ABOVE_DATA_AND_MODEL[1:], "the config knows no trainer, evaluation or command line"),
    ([PACKAGE / "evaluate.py", PACKAGE / "viz.py", PACKAGE / "checkpoint.py"], ["iais_scale.engine", "iais_scale.cli"],
     "evaluation, pictures and export run without the trainer"),
    (modules(ROOT / "data_tools"), ["iais_scale.engine", "iais_scale.objectives", "iais_scale.checkpoint",
                                    "iais_scale.evaluate", "iais_scale.config", "iais_scale.cli"],
     "the data tools know the data (and the model, for backbone features) only"),
    ([f for pkg in PACKAGES if pkg != "launchers" for f in modules(ROOT / pkg)], ["launchers"],
     "nothing imports the launchers"),
]


@pytest.mark.parametrize("files, forbidden, why", RULES, ids=[r[2] for r in RULES])
def test_forbidden_imports(files, forbidden, why):
    bad = {str(f.relative_to(ROOT)): sorted(n for n in imports(f) if any(n == p.rstrip(".") or n.startswith(p)
                                                                         for p in forbidden))
           for f in files}
    assert not {k: v for k, v in bad.items() if v}, why


def test_the_rules_see_relative_imports():
    assert "iais_scale.data.format" in imports(PACKAGE / "data" / "image_fields.py")
    assert "iais_scale.iais" in imports(PACKAGE / "model" / "encoder.py")


def graph() -> dict[str, set[str]]:
    """module -> the project modules its imports execute (a submodule also runs its packages'
    ``__init__``, except the packages the importer itself lives in)."""
    files = {module_name(f): f for pkg in PACKAGES for f in modules(ROOT / pkg)}
    edges = {}
    for name, f in files.items():
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        if f.name == "__init__.py":
            own.add(name)
        targets = set()
        for n in imports(f):
            parts = n.split(".")
            targets |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        edges[name] = {t for t in targets if t in files and t not in own and t != name}
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    edges = graph()
    assert {"iais_scale.data.storage", "iais_scale.model"} <= edges["iais_scale.config"]
    assert circles(edges) == []


def test_the_circle_check_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_inside_functions_are_the_few_deferred_on_purpose():
    found: dict[tuple[str, str], int] = {}
    for pkg in ("iais_scale", "data_tools"):
        for f in modules(ROOT / pkg):
            for fn in ast.walk(ast.parse(f.read_text(), str(f))):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in fn.body:  # statements of this function itself (nested functions count alone)
                    for sub in ast.walk(node):
                        own = (isinstance(sub, ast.ImportFrom) and (sub.level > 0 or (sub.module or "").split(".")[0] in PACKAGES)) or \
                            (isinstance(sub, ast.Import) and any(a.name.split(".")[0] in PACKAGES for a in sub.names))
                        if own:
                            key = (str(f.relative_to(ROOT)), fn.name)
                            found[key] = found.get(key, 0) + 1
    assert found == DEFERRED
    assert sum(found.values()) <= 5


def test_test_modules_share_helpers_not_each_other():
    """Shared helpers live in tests/helpers.py (fixtures in conftest.py): no test module imports another."""
    bad = {}
    for f in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0].startswith("test_") for n in names):
                bad.setdefault(f.name, []).extend(names)
    assert bad == {}
