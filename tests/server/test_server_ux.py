"""What a llama-server or vLLM user looks for in the first hour, on a tiny-model server: the
start-up log's KV capacity and sampling defaults, one access-log line per request (counts and
times, never the text), --generation-config defaults for fields a request leaves out, a
--chat-template file, and one clear line for a bad one."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import requests

SECRET = "zebra-orchid-quartz"  # a prompt word that must never reach the log
TEMPLATE = ("{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<<assistant>>{% endif %}")


def _complete(server, **body):
    r = requests.post(server.url + "/v1/completions", timeout=60,
                      json={"prompt": f"the {SECRET} cache", **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_start_up_report_access_log_and_defaults(server_factory, tiny_flags, tmp_path):
    config = tmp_path / "generation.json"
    config.write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 3}))
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    server = server_factory(*tiny_flags, "--log-level", "info", "--generation-config",
                            str(config), "--chat-template", str(template))
    log = server.log()
    assert re.search(r"KV capacity: .* blocks of 4 tokens .*; as kvserve plan ", log), log
    assert "sampling defaults: temperature 0.0, max_tokens 3" in log
    # defaults: greedy and 3 tokens unless the request says otherwise
    a, b = _complete(server), _complete(server, temperature=0.0, max_tokens=3)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["usage"]["completion_tokens"] == 3
    assert _complete(server, max_tokens=4)["usage"]["completion_tokens"] == 4
    out = requests.post(server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True})
    assert out.status_code == 200 and "[DONE]" in out.text
    ids = requests.post(server.url + "/tokenize", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}]}).json()["tokens"]
    text = requests.post(server.url + "/detokenize", timeout=60, json={"tokens": ids}).json()
    assert text["prompt"] == "<<user>>hi\n<<assistant>>"  # the file's template
    bad = requests.post(server.url + "/v1/completions", timeout=60, json={"prompt": ""})
    assert bad.status_code == 400
    assert server.wait_until(lambda: server.log().count("kvserve: POST ") >= 7)
    lines = [ln for ln in server.log().splitlines() if ln.startswith("kvserve: POST ")]
    assert re.fullmatch(r"kvserve: POST /v1/completions 200 in=\d+ out=3 cached=\d+ "
                        r"ttft=[\d.]+s time=[\d.]+s", lines[0]), lines[0]
    assert any(re.fullmatch(r"kvserve: POST /v1/chat/completions 200 in=\d+ out=2 cached=\d+ "
                            r"ttft=[\d.]+s time=[\d.]+s", ln) for ln in lines), lines
    assert any(ln.startswith("kvserve: POST /v1/completions 400 in=- out=-") for ln in lines)
    assert SECRET not in server.log() and "/health" not in "\n".join(lines)


def test_no_access_log_means_none(server_factory, tiny_flags):
    server = server_factory(*tiny_flags, "--log-level", "info", "--no-access-log")
    _complete(server, max_tokens=2)
    assert "KV capacity" in server.log() and "kvserve: POST" not in server.log()


def _serve_fails(tiny_flags, *flags):
    run = subprocess.run([sys.executable, "-m", "kvserve.cli", "serve", *tiny_flags, *flags],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    return run.stderr


def test_bad_template_and_generation_config_are_one_line(tiny_flags, tmp_path):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    err = _serve_fails(tiny_flags, "--chat-template", str(broken))
    assert "is not a valid Jinja template" in err and err.count("\n") == 1
    assert "cannot read --chat-template" in _serve_fails(tiny_flags, "--chat-template",
                                                         str(tmp_path / "missing.jinja"))
    config = tmp_path / "g.json"
    config.write_text(json.dumps({"temperature": -1}))
    err = _serve_fails(tiny_flags, "--generation-config", str(config))
    assert "--generation-config" in err and "temperature" in err and err.count("\n") == 1
