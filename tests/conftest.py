"""Shared pytest fixtures: the tiny random-weight Llama in Hugging Face and GGUF form (see
tests/fixtures.py), written once per session, and real `kvserve serve` processes
(tests/serving.py)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for entry in (ROOT, ROOT / "tests"):  # kvserve without an install; `import fixtures` anywhere
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

import fixtures  # noqa: E402
from serving import Server, start_server  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """The tiny Llama (tied embeddings) as a Hugging Face folder."""
    return fixtures.write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_gguf_path(tiny_hf_dir, tmp_path_factory) -> Path:
    """The same model converted to an F32 GGUF, llama.cpp style."""
    return fixtures.write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf",
                                    tiny_hf_dir)


@pytest.fixture(scope="session")
def tiny_gguf_quant_paths(tiny_hf_dir, tmp_path_factory) -> dict[str, Path]:
    """Type name (F16, BF16, Q8_0, Q4_0, Q4_1) -> the same model with its 2-D weights in it."""
    folder = tmp_path_factory.mktemp("gguf-quant")
    return {q: fixtures.write_tiny_gguf(folder / f"tiny-llama.{q}.gguf", tiny_hf_dir, qtype=q)
            for q in fixtures.QUANT_TYPES}


@pytest.fixture(scope="module")
def server_factory(tmp_path_factory):
    """start(*flags, prelude=, env=) -> Server; every server started is killed when the module
    ends."""
    started: list[Server] = []

    def start(*flags: str, **options) -> Server:
        server = start_server(tmp_path_factory.mktemp("server"), *flags, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def tiny_flags(tiny_hf_dir) -> tuple[str, ...]:
    return ("--model", str(tiny_hf_dir), "--block-size", "4", "--kv-cache-memory", "4MiB")


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free loopback port (installed by scripts/setup.sh --test);
    yields (url, restart) and stops it at the end."""
    import shutil
    import socket
    import subprocess
    import time

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (scripts/setup.sh --test installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []

    def start():
        procs.append(subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL))
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop():
        procs[-1].terminate()
        procs[-1].wait(10)

    start()
    yield f"redis://127.0.0.1:{port}/0", start, stop
    if procs[-1].poll() is None:
        stop()
