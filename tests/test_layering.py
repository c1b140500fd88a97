"""Import boundaries, as a table: which kvserve package may import which (docs/ARCHITECTURE.md
shows the same table), that the control plane never imports torch (so it runs in fast unit tests
and in the planner without a model), that there are no import cycles, and that the core never
imports test-only or server-only libraries. A violation fails naming the file and the import.

Every import counts, including the ones made inside functions to load something lazily: a lazy
import is still a dependency, it only moves when the cost is paid.
"""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "kvserve"

# unit -> the kvserve units it may import (besides itself). A unit is a top-level module or
# package of kvserve; "kvserve" is the package's own __init__.py (the public API).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "kv_dtypes": {"errors"},
    "config": {"errors", "kv_dtypes"},
    "request": {"errors"},
    "structured": {"errors", "request"},
    "gguf_file": set(),
    "model_files": {"errors", "gguf_file"},
    "cli_flags": {"config", "errors"},
    "kvcache": {"config", "errors", "kv_dtypes", "request"},
    "scheduler": {"config", "errors", "kvcache", "request"},
    "kvstore": {"config", "errors", "kvcache"},
    "kernels": set(),
    "model": {"config", "errors", "kernels", "kvcache", "kvstore", "model_files"},
    "runner": {"config", "errors", "kernels", "kvstore", "model", "request", "scheduler"},
    "engine": {"config", "errors", "kvcache", "kvstore", "model", "planner", "request",
               "runner", "scheduler", "structured"},
    "server": {"config", "engine", "errors", "request"},
    "planner": {"cli_flags", "config", "errors", "kv_dtypes", "kvcache", "model_files",
                "request", "scheduler"},
    "bench": {"cli_flags", "config", "engine", "errors", "request"},
    "cluster": {"config", "engine", "errors", "kvcache", "request", "server"},
    "cli": {"bench", "cli_flags", "cluster", "config", "engine", "errors", "planner", "request",
            "server"},
    "kvserve": {"config", "engine", "request"},
}
# gguf_file reads with numpy, as gguf-py does (model_files imports it only when opening a file)
NO_TORCH = {"errors", "kv_dtypes", "config", "request", "model_files", "cli_flags", "kvcache",
            "scheduler", "planner", "structured"}
# A server module may import these engine modules only: the async front end is its public API.
SERVER_MAY_IMPORT_FROM_ENGINE = {"kvserve.engine.async_engine", "kvserve.engine.stream"}
TEST_ONLY = {"transformers", "accelerate", "pytest", "hypothesis", "openai", "schemathesis"}
SERVER_ONLY = {"fastapi", "starlette", "uvicorn", "pydantic", "prometheus_client"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "kvserve"


def imported_modules(path: Path, root: Path) -> list[tuple[int, str, str]]:
    """(line, module, name) of every import in the file, relative imports resolved; `from a
    import b` counts as module a.b when that is a module of the package, else as module a with
    name b (name is "" for a plain import)."""
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, "") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                is_module = (root.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                    (root.parent / Path(*sub.split("."))).is_dir()
                out.append((node.lineno, sub, "") if is_module else (node.lineno, base, a.name))
    return out


def violations(root: Path) -> list[str]:
    """Every import that breaks the table, as 'file:line: what'."""
    problems = []
    for f in sorted(root.rglob("*.py")):
        here = module_name(f, root)
        unit = unit_of(here)
        where = f"{f.relative_to(root.parent)}"
        for line, target, name in imported_modules(f, root):
            top = target.split(".")[0]
            if top == "torch" or top == "numpy":
                if unit in NO_TORCH:
                    problems.append(f"{where}:{line}: {unit} must not import {top}")
                continue
            if top in TEST_ONLY:
                problems.append(f"{where}:{line}: imports the test-only library {top}")
            if top in SERVER_ONLY and unit not in ("server", "cluster"):
                problems.append(f"{where}:{line}: imports {top}, which only server/ may use")
            if top != "kvserve":
                continue
            other = unit_of(target)
            if other != unit and other not in ALLOWED.get(unit, set()):
                problems.append(f"{where}:{line}: {unit} may not import {other} ({target})")
            if unit == "server" and other == "engine" and \
                    target not in SERVER_MAY_IMPORT_FROM_ENGINE:
                problems.append(f"{where}:{line}: server may use only the async engine's "
                                f"public API, not {target}")
            private = [p for p in (*target.split("."), name) if p.startswith("_")
                       and not p.startswith("__")]
            if other != unit and private:
                problems.append(f"{where}:{line}: private import across packages "
                                f"({target}{'.' + name if name else ''})")
    return problems


def import_cycles(root: Path) -> list[list[str]]:
    """Cycles among kvserve's modules (every import, lazy ones included)."""
    graph: dict[str, set[str]] = {}
    for f in root.rglob("*.py"):
        mods = {t for _, t, _ in imported_modules(f, root) if t.split(".")[0] == "kvserve"}
        graph[module_name(f, root)] = {m for m in mods if m != module_name(f, root)}
    modules = set(graph)
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # importing a.b.c runs a and a.b first: a package's __init__ is not an edge back
            if nxt not in modules or node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [])
    return cycles


def test_every_unit_is_in_the_table():
    units = {unit_of(module_name(f, PKG)) for f in PKG.rglob("*.py")}
    assert units <= set(ALLOWED), f"add to ALLOWED: {sorted(units - set(ALLOWED))}"


def test_imports_follow_the_table():
    problems = violations(PKG)
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    cycles = import_cycles(PKG)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_table_is_acyclic():
    """The allowed directions themselves form layers: no unit may reach itself."""
    def reach(unit: str, seen: set[str]) -> set[str]:
        for other in ALLOWED[unit] - seen:
            seen.add(other)
            reach(other, seen)
        return seen

    assert all(unit not in reach(unit, set()) for unit in ALLOWED)


def test_a_forbidden_import_is_caught(tmp_path):
    """The checks above can fail: a copy of the package with a forbidden import, a torch import
    in the control plane, a private cross-package import and a cycle each get named."""
    root = tmp_path / "kvserve"
    shutil.copytree(PKG, root, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
    pool = root / "kvcache" / "block_pool.py"
    pool.write_text(pool.read_text() + "\nimport torch\nfrom kvserve.engine import llm\n")
    chat = root / "server" / "__init__.py"
    chat.write_text(chat.read_text() + "\nfrom kvserve.model.tokenizer import _private\n")
    errors = root / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom kvserve import config\n")
    app = root / "server" / "app.py"
    app.write_text(app.read_text() + "\nfrom kvserve.engine.engine import LLMEngine\n")
    planner = root / "planner" / "report.py"
    planner.write_text(planner.read_text() + "\nimport numpy\nimport fastapi\nimport pytest\n")
    problems = "\n".join(violations(root))
    assert "kvserve/kvcache/block_pool.py" in problems
    assert "kvcache must not import torch" in problems
    assert "kvcache may not import engine (kvserve.engine.llm)" in problems
    assert "server may not import model" in problems
    assert "private import across packages (kvserve.model.tokenizer._private)" in problems
    assert "errors may not import config" in problems
    assert "server may use only the async engine's public API, not kvserve.engine.engine" \
        in problems
    assert "planner must not import numpy" in problems
    assert "imports fastapi, which only server/ may use" in problems
    assert "imports the test-only library pytest" in problems
    assert any("kvserve.config" in c and "kvserve.errors" in c for c in import_cycles(root))


def test_importing_the_control_plane_loads_no_torch():
    code = ("import sys, kvserve, kvserve.scheduler.scheduler, kvserve.request, kvserve.config,"
            " kvserve.kvcache.block_manager, kvserve.kvcache.snapshot, kvserve.cli_flags;"
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_planner_runs_without_torch():
    """A whole plan (reading the default model's GGUF), its report and a simulation through the
    real scheduler and allocator never load torch."""
    code = ("import sys; from kvserve.cli import main;"
            "rc = main(['plan', '--concurrency', '4', '--simulate', '--num-requests', '20']);"
            "sys.exit(rc or (2 if 'torch' in sys.modules else 0))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "KV cache at 4,000 tokens x 4 requests" in result.stdout
    assert "Simulated traffic" in result.stdout
