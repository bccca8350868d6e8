"""The imports that must never exist (docs/architecture.md): the IAIS math knows no model, data and
model know neither each other nor the trainer, evaluation runs without the trainer, and nothing
imports the launchers. Every import statement counts, at module level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "iais_scale"


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
    return {n for n in found if n.split(".")[0] in ("iais_scale", "launchers", "data_tools")}


def modules(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


RULES = [
    # (modules, forbidden prefixes, why)
    ([PACKAGE / "iais.py"], ["iais_scale."], "the IAIS math is pure tensor functions"),
    (modules(PACKAGE / "data"), ["iais_scale.model", "iais_scale.engine", "iais_scale.objectives",
                                 "iais_scale.evaluate", "iais_scale.checkpoint"], "data knows no model and no trainer"),
    (modules(PACKAGE / "model"), ["iais_scale.data", "iais_scale.engine", "iais_scale.objectives",
                                  "iais_scale.evaluate"], "the model knows no data and no trainer"),
    ([PACKAGE / "evaluate.py", PACKAGE / "viz.py", PACKAGE / "checkpoint.py"], ["iais_scale.engine"],
     "evaluation, pictures and export run without the trainer"),
    (modules(PACKAGE) + modules(ROOT / "data_tools") + modules(ROOT / "benchmarks"), ["launchers"],
     "nothing imports the launchers"),
]


@pytest.mark.parametrize("files, forbidden, why", RULES, ids=[r[2] for r in RULES])
def test_forbidden_imports(files, forbidden, why):
    bad = {str(f.relative_to(ROOT)): sorted(n for n in imports(f) if any(n == p.rstrip(".") or n.startswith(p)
                                                                         for p in forbidden))
           for f in files}
    assert not {k: v for k, v in bad.items() if v}, why


def test_the_rules_see_relative_imports():
    assert "iais_scale.data.format" in imports(PACKAGE / "data" / "collate.py")
    assert "iais_scale.iais" in imports(PACKAGE / "model" / "encoder.py")
