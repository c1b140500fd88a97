"""The server's limits and failure paths on the tiny random-weight model: API keys as cache
tenants, the waiting-queue limit (429 + Retry-After), SIGTERM, an engine error that fails one
request, and a schema fuzzer over /openapi.json."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest
import requests
from serving import free_port

TOKENS = list(range(5, 45))  # a 40-token prompt of plain token ids: 10 blocks of 4


def _completion(server, key: str | None, **body) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(server.base_url + "/completions", headers=headers, timeout=60,
                         json={"max_tokens": 2, "temperature": 0, **body})


def test_api_keys_are_required_and_each_is_its_own_cache_tenant(server_factory, tiny_flags):
    server = server_factory(*tiny_flags, "--api-key", "key-a", "--api-key", "key-b")
    assert _completion(server, None, prompt=TOKENS).status_code == 401
    bad = _completion(server, "key-c", prompt=TOKENS)
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(server.url + "/health", timeout=5).status_code == 200  # no key needed

    def cached(key, **extra) -> int:
        r = _completion(server, key, prompt=TOKENS, **extra)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached("key-a") == 0
    assert cached("key-a") == 36  # 9 full blocks; the last token is always recomputed
    assert cached("key-b") == 0  # same prompt, other tenant: nothing shared
    assert cached("key-b") == 36
    assert cached("key-a", cache_salt="s") == 0  # a salt splits a tenant's space further
    client = openai.OpenAI(base_url=server.base_url, api_key="key-b", max_retries=0)
    assert client.models.list().data
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="nope", max_retries=0).models.list()


def _stream(server, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json"})
    return conn, conn.getresponse()


def _fill_the_queue(server, body: dict, tries: int = 3):
    """One request running (the only slot, its stream left unread) and one waiting (the queue
    of 1 full). The running one can finish before the waiting one is queued on a slow machine:
    then both are let go and the pair is tried again. Returns (stream conn, waiting thread)."""
    for _ in range(tries):
        conn, resp = _stream(server, body)
        assert resp.readline().startswith(b"data: ")
        waiting = threading.Thread(target=_completion, args=(server, None), kwargs=body)
        waiting.start()
        def queued(waiting=waiting) -> bool:
            return (server.metrics()["kvserve_num_requests_waiting"] == 1
                    or not waiting.is_alive())

        if server.wait_until(queued, timeout_s=60):
            if waiting.is_alive():
                return conn, waiting
        conn.close()
        waiting.join(60)
        assert server.wait_until(lambda: server.metrics()["kvserve_num_requests_running"] == 0)
    pytest.fail(f"no request was ever seen waiting in {tries} tries")


def test_full_queue_answers_429_with_retry_after(server_factory, tiny_flags):
    server = server_factory(*tiny_flags, "--max-num-seqs", "1", "--max-queue", "1")
    # 4 + 250 tokens: as long as the tiny model's 256 positions allow
    long = {"prompt": TOKENS[:4], "max_tokens": 250, "temperature": 0, "ignore_eos": True}
    conn, waiting = _fill_the_queue(server, long)
    r = _completion(server, None, prompt=TOKENS[:4])
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) >= 1
    error = r.json()["error"]
    assert error["code"] == "queue_full" and "max_queue 1" in error["message"]
    many = _completion(server, None, prompt=TOKENS[:4], n=2)
    assert many.status_code == 400  # n sequences count as n: more than may ever wait
    assert "max_queue (1)" in many.json()["error"]["message"]
    conn.close()
    waiting.join(60)
    assert server.wait_until(lambda: server.metrics()["kvserve_num_requests_running"] == 0)
    assert _completion(server, None, prompt=TOKENS[:4]).status_code == 200


def test_sigterm_lets_in_flight_streams_finish(server_factory, tiny_flags):
    server = server_factory(*tiny_flags, "--shutdown-timeout", "30")
    conn, resp = _stream(server, {"prompt": TOKENS[:4], "max_tokens": 150, "temperature": 0,
                                  "ignore_eos": True})
    assert resp.readline().startswith(b"data: ")
    server.proc.send_signal(signal.SIGTERM)
    rest = resp.read().decode()
    events = [e for e in rest.split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(30) == 0
    assert "Traceback" not in server.log()


# -- an engine error fails its request, not the server ----------------------------------------
@pytest.fixture(scope="module")
def faulty_server(tiny_hf_dir):
    """In-process server whose runner raises on any step that feeds token id 3."""
    import asyncio

    import uvicorn

    from kvserve.config import EngineConfig, ServerConfig
    from kvserve.engine.async_engine import AsyncLLMEngine
    from kvserve.engine.engine import LLMEngine
    from kvserve.server.app import build_app

    engine = LLMEngine(EngineConfig.create(model=str(tiny_hf_dir), block_size=4,
                                           kv_cache_memory="4MiB"))
    real_execute = engine.runner.execute

    def execute(plan, requests_):
        if any(3 in s.token_ids for s in plan.seqs):
            raise RuntimeError("injected fault")
        return real_execute(plan, requests_)

    engine.runner.execute = execute
    port = free_port()
    app = build_app(AsyncLLMEngine(engine), ServerConfig(port=port), "tiny")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if requests.get(url + "/health", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            threading.Event().wait(0.05)
    yield url, engine
    server.should_exit = True
    thread.join(10)


def test_engine_error_fails_that_request_only(faulty_server):
    url, engine = faulty_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model="tiny", prompt=[5, 3, 6], max_tokens=3)
    assert "injected fault" in err.value.body["message"]
    chunks = requests.post(url + "/v1/completions", timeout=30, json={
        "model": "tiny", "prompt": [5, 3, 6], "max_tokens": 3, "stream": True}).text
    assert '"engine_error"' in chunks and chunks.rstrip().endswith("data: [DONE]")
    ok = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3,
                                   temperature=0, extra_body={"ignore_eos": True})
    assert ok.usage.completion_tokens == 3
    assert engine.block_manager.pool.num_used_blocks == 0
    metrics = requests.get(url + "/metrics", timeout=5).text
    assert "kvserve_engine_step_errors_total" in metrics


# -- the OpenAPI schema, fuzzed -----------------------------------------------------------------
def test_openapi_schema_fuzzed_finds_no_server_error(server_factory, tiny_flags, tmp_path):
    """Schemathesis generates schema-valid and schema-invalid requests for every operation and
    checks every answer: never a 5xx, status codes, content types and bodies as the schema says,
    invalid input rejected. One check is left out: positive_data_acceptance, which expects every
    schema-valid request to succeed, while some limits span fields and cannot be written in a
    JSON schema (prompt + max_tokens within max_model_len; max_tokens 0 only with echo)."""
    server = server_factory(*tiny_flags, "--max-model-len", "64", "--max-output-tokens", "8")
    result = subprocess.run(
        [str(Path(sys.executable).with_name("schemathesis")), "run", server.url + "/openapi.json",
         "--max-examples", "100", "--seed", "1", "--checks", "all",
         "--exclude-checks", "positive_data_acceptance", "--no-color"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:]
    assert "7/7" in result.stdout  # every operation was tested (/tokenize, /detokenize too)
    assert requests.get(server.url + "/health", timeout=5).status_code == 200


def test_a_quantized_kv_format_reports_its_start_up_check_in_metrics(server_factory, tiny_flags):
    server = server_factory(*tiny_flags, "--kv-cache-dtype", "int8")
    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    out = client.completions.create(model=client.models.list().data[0].id, prompt="hello",
                                    max_tokens=4, temperature=0)
    assert out.usage.completion_tokens == 4
    m = server.metrics()
    assert 0 <= m["kvserve_kv_quant_check_mean_kl"] < 0.1
    assert 0.8 <= m["kvserve_kv_quant_check_top1_agreement"] <= 1.0
    assert m["kvserve_kv_quant_check_perplexity"] > 1 and \
        m["kvserve_kv_quant_check_perplexity_reference"] > 1
    # tiny model (2 layers, 2 KV heads of 16), int8 in 4-token blocks: K's scale and zero per
    # channel per block, V's per token
    assert m["kvserve_kv_cache_bytes_per_token"] == 2 * 2 * ((16 + 16 * 4 // 4) + (16 + 4))
    assert "KV int8: check mean KL" in server.log()
