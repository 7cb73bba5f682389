"""Dependencies point one way: cli -> jobs -> stages -> evaluation / analysis -> pruning, attacks,
models, data. Every import of the package, at module level or inside a function, is checked."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "s2ap_lightning"

#: Layer of each top-level module or package; a module may import from its own layer or below.
LAYERS = {
    "data": 0,
    "models": 0,
    "checkpoint": 0,
    "checks": 0,
    "quiet": 0,
    "attacks": 1,
    "pruning": 1,
    "export": 2,
    "evaluation": 2,
    "analysis": 2,
    "stages": 3,
    "jobs": 4,
    "demo": 4,
    "tools": 5,
    "cli": 5,
}


def imports_of(path: Path, package: str | None = None) -> list[str]:
    """Every ``s2ap_lightning.*`` module ``path`` imports: absolute, ``from s2ap_lightning import x``
    and relative, resolved against ``package`` (default: the package the file sits in)."""
    if package is None:
        package = ".".join(["s2ap_lightning", *path.relative_to(PACKAGE).parent.parts])
    parts = package.split(".")
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x, from ..stages import y
                parent = parts[: len(parts) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            if base == "s2ap_lightning":
                found += [f"s2ap_lightning.{a.name}" for a in node.names]
            elif base.startswith("s2ap_lightning."):
                found.append(base)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("s2ap_lightning.")]
    return found


def upward_imports(path: Path, source: str, package: str | None = None) -> list[str]:
    """Imports of ``path`` (a module of layer ``source``) from a layer above it."""
    return [m for m in imports_of(path, package) if LAYERS[m.split(".")[1]] > LAYERS[source]]


def test_every_module_has_a_layer():
    tops = {p.relative_to(PACKAGE).with_suffix("").parts[0] for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert tops <= set(LAYERS), f"give these a layer: {sorted(tops - set(LAYERS))}"


def test_no_module_imports_from_a_layer_above_it():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        source = path.relative_to(PACKAGE).with_suffix("").parts[0]
        if source == "__init__":
            continue
        upward += [f"{path.relative_to(PACKAGE)} imports {m}" for m in upward_imports(path, source)]
    assert not upward, "\n".join(upward)


def test_the_check_would_catch_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import s2ap_lightning.models\n"
        "from s2ap_lightning import jobs\n"
        "def f():\n    from s2ap_lightning.stages import RobustTask\n"
    )
    pkg = "s2ap_lightning.pruning"
    assert imports_of(bad, pkg) == ["s2ap_lightning.models", "s2ap_lightning.jobs", "s2ap_lightning.stages"]
    # As a pruning module (layer 1): stages and jobs are above it, models is below.
    assert upward_imports(bad, "pruning", pkg) == ["s2ap_lightning.jobs", "s2ap_lightning.stages"]
    assert upward_imports(bad, "cli", "s2ap_lightning") == []


def test_relative_imports_are_resolved_against_the_package(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from . import scores\nfrom .masks import topk_mask\nfrom ..stages import RobustTask\n")
    found = imports_of(bad, package="s2ap_lightning.pruning")
    assert found == ["s2ap_lightning.pruning", "s2ap_lightning.pruning.masks", "s2ap_lightning.stages"]
    assert upward_imports(bad, "pruning", "s2ap_lightning.pruning") == ["s2ap_lightning.stages"]
