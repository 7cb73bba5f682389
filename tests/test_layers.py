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


def imports_of(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("s2ap_lightning."):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("s2ap_lightning.")]
    return found


def test_every_module_has_a_layer():
    tops = {p.relative_to(PACKAGE).with_suffix("").parts[0] for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert tops <= set(LAYERS), f"give these a layer: {sorted(tops - set(LAYERS))}"


def test_no_module_imports_from_a_layer_above_it():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        source = path.relative_to(PACKAGE).with_suffix("").parts[0]
        if source == "__init__":
            continue
        for module in imports_of(path):
            target = module.split(".")[1]
            if LAYERS[target] > LAYERS[source]:
                upward.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not upward, "\n".join(upward)


def test_the_check_would_catch_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from s2ap_lightning.stages import RobustTask\n")
    assert imports_of(bad) == ["s2ap_lightning.stages"]
