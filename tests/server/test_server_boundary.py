"""The server's import boundary: it reaches the engine only through AsyncLLMEngine's public API
(never kvserve.model, engine.engine or engine.llm, nor another package's private names)."""

import ast
from pathlib import Path

SERVER = Path(__file__).resolve().parents[2] / "kvserve" / "server"
ALLOWED = {"kvserve.server", "kvserve.engine.async_engine", "kvserve.engine.stream",
           "kvserve.config",
           "kvserve.errors", "kvserve.request"}


def _trees() -> list[tuple[str, ast.AST]]:
    files = sorted(SERVER.glob("*.py"))
    assert files
    return [(f.name, ast.parse(f.read_text())) for f in files]


def _kvserve_imports(tree: ast.AST):
    """(module, names imported from it) for every import of kvserve code."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "kvserve":
                yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "kvserve":
                    yield alias.name, []


def test_server_imports_only_public_names_of_allowed_modules():
    for name, tree in _trees():
        for module, names in _kvserve_imports(tree):
            inside = module == "kvserve.server" or module.startswith("kvserve.server.")
            assert inside or module in ALLOWED, f"{name} imports {module}"
            if not inside:
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{name} imports {private} from {module}"


def test_server_reads_no_engine_internals():
    """No `x.engine.engine` (the LLMEngine behind the async one) and no `x.engine._private`."""
    for name, tree in _trees():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            owner = node.value
            owner_name = owner.attr if isinstance(owner, ast.Attribute) else \
                owner.id if isinstance(owner, ast.Name) else None
            if owner_name == "engine":
                assert node.attr != "engine" and not node.attr.startswith("_"), \
                    f"{name}:{node.lineno} reads engine.{node.attr}"
