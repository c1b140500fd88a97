"""Servers under test: `kvserve serve` started as a real process on a free loopback port (used by
tests/server and tests/abuse)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self, key: str | None = None) -> dict[str, float]:
        """name{labels} -> value, from GET /metrics (label sets folded into one key); `key`:
        the API key a server with keys wants."""
        values: dict[str, float] = {}
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = requests.get(self.url + "/metrics", timeout=10, headers=headers)
        response.raise_for_status()
        for line in response.text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                name = key.split("{", 1)[0]
                values[name] = values.get(name, 0.0) + float(value)
        return values

    def wait_until(self, predicate, timeout_s: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.1)
        return predicate()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        return self.proc.returncode


def start_server(tmp_path: Path, *flags: str, prelude: str = "",
                 env: dict[str, str] | None = None) -> Server:
    """`kvserve serve --port P *flags` in a process of its own; `prelude` is Python run in that
    process first (a test's fault injection), `env` extra environment variables."""
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    argv = ["serve", "--port", str(port), "--log-level", "warning", *flags]
    code = f"{prelude}\nimport sys\nfrom kvserve.cli import main\nsys.exit(main({argv!r}))"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    server = Server(proc, port, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if requests.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except (requests.ConnectionError, requests.Timeout):  # not up yet (Ray Serve's proxy
            pass  # listens before the app is deployed)
        time.sleep(0.25)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server did not start in {START_TIMEOUT_S} s:\n{server.log()}")


