"""Dependencies point one way: cli -> jobs -> stages -> evaluation / analysis -> pruning, attacks,
models, data. Every import of the package, at module level or inside a function, is checked, and so
are the argument types of the analyses: an argument typed ``Any`` (or not at all) is a dependency
no import shows, as when the analyses read a Lightning stage's attributes through ``pruner: Any``."""

import ast
import importlib
import inspect
import typing
from collections.abc import Callable
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

#: Top-level packages that must not import one another although the layers allow one direction:
#: the stages train and log (the mask tracker is a stage callback), the analyses measure a search
#: through the objective it hands over (``pruning.objective``); neither needs the other.
SEPARATE = {"stages": {"analysis"}}


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


def test_separate_packages_do_not_import_each_other():
    found = []
    for source, forbidden in SEPARATE.items():
        for path in (PACKAGE / source).rglob("*.py"):
            found += [
                f"{path.relative_to(PACKAGE)} imports {m}"
                for m in imports_of(path)
                if m.split(".")[1] in forbidden
            ]
    assert not found, "\n".join(found)


def _classes_in(annotation: object) -> list[type]:
    """The classes an annotation names, through unions and generics (``dict[str, Tensor] | None``)."""
    args = typing.get_args(annotation)
    if args:
        origin = typing.get_origin(annotation)
        found = [origin] if isinstance(origin, type) else []
        for arg in args:
            found += (
                _classes_in(arg) if not isinstance(arg, list) else [c for a in arg for c in _classes_in(a)]
            )
        return found
    return [annotation] if isinstance(annotation, type) else []


def argument_problems(fn: Callable, layer: int) -> list[str]:
    """Arguments of ``fn`` that hide a dependency: untyped, typed ``Any``, or typed by a higher layer.

    ``*args``/``**kwargs`` and ``self`` are exempt; ``Any`` inside a container (a JSON row's
    ``dict[str, Any]``) is data, not a hidden object, and is allowed.
    """
    hints = typing.get_type_hints(fn)
    problems = []
    for name, param in inspect.signature(fn).parameters.items():
        if name in ("self", "cls") or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name not in hints:
            problems.append(f"{fn.__qualname__}({name}) is untyped")
        elif hints[name] is typing.Any:
            problems.append(f"{fn.__qualname__}({name}: Any)")
        else:
            for cls in _classes_in(hints[name]):
                parts = cls.__module__.split(".")
                if parts[0] == "s2ap_lightning" and len(parts) > 1 and LAYERS[parts[1]] > layer:
                    problems.append(f"{fn.__qualname__}({name}: {cls.__module__}.{cls.__qualname__})")
    return problems


def public_callables(module: object) -> list[Callable]:
    """Functions, and methods of classes, that ``module`` defines under public names."""
    found = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            found.append(obj)
        elif inspect.isclass(obj):
            found += [
                f
                for n, f in vars(obj).items()
                if inspect.isfunction(f) and (not n.startswith("_") or n == "__init__")
            ]
    return found


def test_the_analyses_take_typed_arguments_from_their_layer_or_below():
    problems = []
    for path in sorted((PACKAGE / "analysis").glob("*.py")):
        module = importlib.import_module(f"s2ap_lightning.analysis.{path.stem}")
        for fn in public_callables(module):
            problems += [f"analysis/{path.name}: {p}" for p in argument_problems(fn, LAYERS["analysis"])]
    assert not problems, "\n".join(problems)


def test_the_type_check_would_catch_a_stage_passed_to_an_analysis():
    from torch import Tensor

    from s2ap_lightning.stages import ScoreSpaceSAMPruner

    def untyped(pruner, x: Tensor) -> None: ...

    def duck_typed(pruner: typing.Any, x: Tensor) -> None: ...

    def staged(pruner: ScoreSpaceSAMPruner | None, x: Tensor) -> None: ...

    def typed(rows: list[dict[str, typing.Any]], x: Tensor, *args: typing.Any) -> None: ...

    layer = LAYERS["analysis"]
    assert argument_problems(untyped, layer) == [f"{untyped.__qualname__}(pruner) is untyped"]
    assert argument_problems(duck_typed, layer) == [f"{duck_typed.__qualname__}(pruner: Any)"]
    assert argument_problems(staged, layer) == [
        f"{staged.__qualname__}(pruner: s2ap_lightning.stages.prune.ScoreSpaceSAMPruner)"
    ]
    assert argument_problems(typed, layer) == []


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
