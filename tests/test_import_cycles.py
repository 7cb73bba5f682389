"""No import cycle in the package: every import counted, at module level or inside a function.

``tests/test_layers.py`` checks that imports point down the layers; a cycle inside one layer (the study
and its report importing each other, one of them from inside a function) would pass that check.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "s2ap_lightning"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = [package.name, *path.relative_to(package).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """``{module: the package modules it imports}``; ``from pkg import sub`` counts as ``pkg.sub``."""
    files = {module_name(p, package): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        own = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = own[: len(own) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                found.append([*path[path.index(dep) :], dep] if dep in path else [module, dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_the_package_has_no_import_cycle():
    assert not cycles(import_graph()), "\n".join(" -> ".join(c) for c in cycles(import_graph()))


def test_the_check_finds_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "jobs").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "jobs" / "__init__.py").write_text("")
    (pkg / "jobs" / "study.py").write_text("def run():\n    from pkg.jobs.report import write\n")
    (pkg / "jobs" / "report.py").write_text("from pkg.jobs import study\n")
    assert cycles(import_graph(pkg)) == [["pkg.jobs.report", "pkg.jobs.study", "pkg.jobs.report"]]
