"""The package's shape: four wings and one contract, small modules and functions, data flowing one way."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bstune"
MODULES = sorted(PACKAGE.rglob("*.py"))
# the benchmarks are held to the same size limits (their shared parts live in benchmarks/searchbench.py)
BENCHMARKS = sorted((PACKAGE.parent / "benchmarks").glob("*.py"))
STATE_STRING = re.compile(r"[\"'](COMPLETE|PRUNED|DIVERGED|OOM|FAILED|INTERRUPTED|LOST|RUNNING|WAITING)[\"']")


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (function-level imports too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_four_wings_around_one_contract() -> None:
    for wing in ("train", "search", "analysis", "report"):
        assert (PACKAGE / wing / "__init__.py").is_file(), wing
    assert (PACKAGE / "trials.py").is_file()


@pytest.mark.parametrize("path", MODULES + BENCHMARKS, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_module_over_500_lines_nor_function_over_80(path: Path) -> None:
    text = path.read_text()
    assert len(text.splitlines()) <= 500
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            assert node.end_lineno - node.lineno + 1 <= 80, f"{node.name} at line {node.lineno}"


def test_no_import_cycle() -> None:
    names = {_name(p) for p in MODULES}
    graph = {_name(p): {m for m in _imports(p) if m in names and m != _name(p)} for p in MODULES}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        for dep in graph[node]:
            # a package's own __init__ importing its submodules is how a public face works, not a cycle
            if not dep.startswith(node + "."):
                visit(dep, path + [node])
        done.add(node)

    for node in graph:
        visit(node, [])


@pytest.mark.parametrize(("wing", "banned"), [("analysis", ("torch", "optuna", "mlflow")),
                                              ("train", ("optuna", "mlflow"))])
def test_wings_import_only_what_is_below_them(wing: str, banned: tuple[str, ...]) -> None:
    for path in (PACKAGE / wing).rglob("*.py"):
        bad = {m for m in _imports(path) if m.split(".")[0] in banned}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"
    code = (f"import sys, bstune.{wing}; "
            f"print(sorted(m for m in {banned!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", f"importing bstune.{wing} loads {loaded.strip()}"


def test_the_command_line_starts_without_heavy_imports() -> None:
    code = "import sys, bstune.cli; print(sorted(m for m in ('torch', 'optuna', 'mlflow') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_trial_states_are_spelled_out_only_in_the_contract() -> None:
    for path in MODULES:
        # the contract, the command line's display text, and MLflow's run statuses (its words, not bstune's)
        if path.name in ("trials.py", "cli.py") or path == PACKAGE / "tracking.py":
            continue
        hits = [line.strip() for line in path.read_text().splitlines() if STATE_STRING.search(line)]
        assert not hits, f"{path.relative_to(PACKAGE)}: {hits}"
