"""Import boundaries: the control plane never imports torch (so it runs in fast unit tests and
in the planner without a model); the core never imports test-only or server-only libraries."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "kvserve"
NO_TORCH = ["config.py", "errors.py", "request.py", "scheduler", "cache/layout.py",
            "cache/block_pool.py", "cache/block_manager.py", "cache/prefix_cache.py",
            "model/files.py", "planner"]
TEST_ONLY = {"transformers", "accelerate", "pytest", "hypothesis", "openai", "schemathesis"}
SERVER_ONLY = {"fastapi", "starlette", "uvicorn", "pydantic", "prometheus_client"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _files(entry: str) -> list[Path]:
    p = PKG / entry
    return sorted(p.rglob("*.py")) if p.is_dir() else [p]


def test_control_plane_imports_no_torch():
    for entry in NO_TORCH:
        for f in _files(entry):
            bad = _imports(f) & {"torch", "numpy"}
            assert not bad, f"{f.relative_to(PKG)} imports {bad}"


def test_package_imports_no_test_only_libraries():
    for f in PKG.rglob("*.py"):
        bad = _imports(f) & TEST_ONLY
        assert not bad, f"{f.relative_to(PKG)} imports {bad}"


def test_importing_the_control_plane_loads_no_torch():
    code = ("import sys, kvserve, kvserve.scheduler.scheduler, kvserve.request, kvserve.config,"
            " kvserve.cache.prefix_cache, kvserve.cache.layout;"
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


def test_server_libraries_stay_in_the_server_package():
    """The `serve` extra's libraries: without it everything but kvserve.server still imports."""
    for f in PKG.rglob("*.py"):
        if "server" in f.relative_to(PKG).parts[:1]:
            continue
        bad = _imports(f) & SERVER_ONLY
        assert not bad, f"{f.relative_to(PKG)} imports {bad}"
