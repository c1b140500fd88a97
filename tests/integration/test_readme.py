"""Every command on the README's first screen runs as written: the set-up + generate line (its
set-up part is what made this environment, so it is checked, not rerun), the test command is
exactly .ci/run's (running it here would run this suite inside itself), the server starts and
both curl calls get OpenAI answers (the JSON-schema one valid against its schema), and the plan
command prints a plan. The first screen ends at the README's "end of the first screen" marker."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
from serving import free_port

ROOT = Path(__file__).resolve().parents[2]
SETUP = "bash scripts/setup.sh && "
TESTS = "bash scripts/setup.sh --test && .venv/bin/python -m pytest -q"


def _first_screen_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    screen = text.split("<!-- end of the first screen", 1)
    assert len(screen) == 2, "the README lost its end-of-first-screen marker"
    return re.findall(r"```bash\n(.*?)```", screen[0], re.S)


def _run(command: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_the_first_screen_has_the_commands_it_promises():
    blocks = _first_screen_blocks()
    assert len(blocks) == 4  # generate, tests, serve + curl, plan
    assert blocks[0].startswith(SETUP) and blocks[1].strip() == TESTS
    assert TESTS in (ROOT / ".ci" / "run").read_text().splitlines()


def test_generate_as_written():
    command = _first_screen_blocks()[0].strip()[len(SETUP):]
    run = _run(command)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() and "decode:" in run.stderr  # --stats


def test_plan_as_written():
    run = _run(_first_screen_blocks()[3].strip())
    assert run.returncode == 0, run.stderr
    assert "max concurrent requests at 8,192 tokens" in run.stdout


def test_serve_and_curl_as_written():
    lines = _first_screen_blocks()[2].strip().split("\n")
    serve, calls = lines[0], "\n".join(lines[1:])
    assert serve.endswith(" &") and "--port 8000" in serve
    port = str(free_port())
    proc = subprocess.Popen(["bash", "-c", "exec " + serve[:-2].replace("8000", port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.25)
        else:
            pytest.fail("the README's server did not start")
        calls = calls.replace("localhost:8000", f"localhost:{port}")
        commands = [c for c in re.split(r"\n(?=curl )", calls)]
        assert len(commands) == 2
        answers = []
        for c in commands:
            run = _run(c, timeout=120)
            assert run.returncode == 0, run.stderr
            answers.append(json.loads(run.stdout))
        assert answers[0]["choices"][0]["message"]["content"]
        colour = json.loads(answers[1]["choices"][0]["message"]["content"])
        assert colour["colour"] in ("red", "green")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
