"""`kvserve serve` on the embedded SmolLM2-135M-Instruct, driven by the official openai client.

One server process serves the whole module (--max-num-seqs 16); greedy outputs are checked
against the offline LLM API on the same weights, so the server adds nothing and loses nothing.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket

import openai
import pytest
import requests

from kvserve import LLM, SamplingParams

CHAT = [{"role": "user", "content": "Name three colours."}]
LONG_PROMPT = ("A KV cache keeps the keys and values of earlier tokens so that each new token "
               "attends to them without recomputing them. ") * 6  # about 140 tokens


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory("--max-num-seqs", "16")


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_name(client) -> str:
    models = client.models.list().data
    assert len(models) == 1
    return models[0].id


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM(max_num_seqs=4)


def test_models_and_health(server, client, model_name):
    assert model_name == "SmolLM2-135M-Instruct"
    assert requests.get(server.url + "/health", timeout=5).json() == {"status": "ok"}


def test_completion_matches_offline_greedy(client, model_name, offline):
    prompt = "The KV cache is"
    out = client.completions.create(model=model_name, prompt=prompt, max_tokens=20,
                                    temperature=0)
    ref = offline.generate(prompt, SamplingParams(max_tokens=20, temperature=0.0),
                           use_tqdm=False)[0]
    choice = out.choices[0]
    assert choice.text == ref.text and choice.finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == ref.num_prompt_tokens
    assert out.usage.completion_tokens == len(ref.token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.object == "text_completion" and out.id.startswith("cmpl-")


def test_chat_matches_offline_greedy_streamed_or_not(client, model_name, offline):
    ref = offline.chat(CHAT, SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)[0]
    out = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=24,
                                         temperature=0)
    assert out.choices[0].message.content == ref.text
    assert out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == ref.num_prompt_tokens
    chunks = list(client.chat.completions.create(
        model=model_name, messages=CHAT, max_completion_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == ref.finish_reason and not any(finals[:-1])
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == len(ref.token_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_completion_equals_unstreamed_and_ends_with_done(server, client, model_name):
    kwargs = dict(model=model_name, prompt="Once upon a time", max_tokens=30, temperature=0)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage at all
    # On the wire: SSE events, the last one data: [DONE]
    r = requests.post(server.base_url + "/completions", json={**kwargs, "stream": True},
                      timeout=60)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_stop_strings(client, model_name):
    full = client.completions.create(model=model_name, prompt="Count: one, two, three,",
                                     max_tokens=24, temperature=0).choices[0].text
    stop = full.strip().split()[2]
    for stream in (False, True):
        res = client.completions.create(model=model_name, prompt="Count: one, two, three,",
                                        max_tokens=24, temperature=0, stop=[stop],
                                        stream=stream)
        if stream:
            chunks = list(res)
            text = "".join(c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = res.choices[0].text, res.choices[0].finish_reason
        assert text == full[:full.index(stop)] and reason == "stop"


def test_seeds_reproduce_and_n_samples(client, model_name):
    kwargs = dict(model=model_name, prompt="My favourite food is", max_tokens=12,
                  temperature=1.0)
    one = client.completions.create(seed=7, **kwargs)
    a = one.choices[0].text
    b = client.completions.create(seed=7, **kwargs).choices[0].text
    c = client.completions.create(seed=8, **kwargs).choices[0].text
    assert a == b and a != c
    many = client.completions.create(seed=7, n=3, **kwargs)
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    texts = [ch.text for ch in many.choices]
    assert texts[0] == a and len(set(texts)) == 3  # sample 0 keeps the seed; others differ
    again = client.completions.create(seed=7, n=3, **kwargs)
    assert [ch.text for ch in again.choices] == texts
    assert many.usage.prompt_tokens == one.usage.prompt_tokens  # counted once for all n
    chunks = list(client.chat.completions.create(model=model_name, messages=CHAT, n=2,
                                                 max_tokens=8, temperature=1.0, seed=3,
                                                 stream=True))
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_logprobs(client, model_name):
    out = client.completions.create(model=model_name, prompt="The capital of France is",
                                    max_tokens=5, temperature=0, logprobs=3).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == out.text
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 3 <= len(top) <= 4
        assert max(top, key=top.get) == token  # greedy: the chosen token is the best
    chat = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token
               for t in content)
    assert bytes(content[0].bytes).decode() == content[0].token


def test_echo_scores_the_prompt_like_lm_eval(client, model_name):
    """lm-eval's local-completions loglikelihood request: echo, logprobs, temperature 0."""
    context, continuation = "The capital of France is", " Paris"
    out = client.completions.create(model=model_name, prompt=context + continuation,
                                    max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = out.choices[0].logprobs
    assert out.choices[0].text.startswith(context + continuation)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    n_prompt = out.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 1
    assert "".join(lp.tokens[:n_prompt]) == context + continuation
    # the last prompt token's log-prob equals the one a plain completion of the context gives
    plain = client.completions.create(model=model_name, prompt=context, max_tokens=1,
                                      temperature=0, logprobs=5).choices[0].logprobs
    assert lp.tokens[n_prompt - 1] == " Paris"
    assert lp.token_logprobs[n_prompt - 1] == pytest.approx(
        plain.top_logprobs[0][" Paris"], abs=1e-4)
    scored = client.completions.create(model=model_name, prompt=context, max_tokens=0,
                                       echo=True, logprobs=0)
    assert scored.choices[0].text == context and scored.usage.completion_tokens == 0


def test_cached_tokens_after_a_repeated_prompt(client, model_name):
    first = client.completions.create(model=model_name, prompt=LONG_PROMPT, max_tokens=4,
                                      temperature=0)
    second = client.completions.create(model=model_name, prompt=LONG_PROMPT, max_tokens=4,
                                       temperature=0)
    n = first.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert n - 16 < cached < n and cached % 16 == 0  # every full block but the last token's
    assert second.choices[0].text == first.choices[0].text
    salted = client.completions.create(model=model_name, prompt=LONG_PROMPT, max_tokens=4,
                                       temperature=0, extra_body={"cache_salt": "tenant-a"})
    assert salted.usage.prompt_tokens_details.cached_tokens == 0  # another tenant's space
    assert salted.choices[0].text == first.choices[0].text


def test_64_concurrent_streams_complete_with_the_right_counts(server, model_name):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, int, str | None]:
        stream = await client.completions.create(
            model=model_name, prompt=f"Request {i}: the weather today is", max_tokens=12,
            temperature=0.8, seed=i, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        pieces, usage, reason = 0, None, None
        async for chunk in stream:
            if chunk.choices:
                pieces += 1
                reason = chunk.choices[0].finish_reason or reason
            if chunk.usage is not None:
                usage = chunk.usage
        return usage.completion_tokens, pieces, reason

    async def run():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused",
                                    max_retries=0, timeout=300)
        async with client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(run())
    assert len(results) == 64
    assert all(tokens == 12 and reason == "length" and 1 <= pieces <= 12
               for tokens, pieces, reason in results)
    assert server.wait_until(lambda: server.metrics()["kvserve_num_requests_running"] == 0)


def _open_stream(server, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    return conn, conn.getresponse()


def test_disconnect_mid_stream_frees_blocks(server, model_name):
    body = {"model": model_name, "prompt": "Tell me a very long story.", "max_tokens": 4000,
            "temperature": 0, "ignore_eos": True, "stream": True}
    conns = [_open_stream(server, body) for _ in range(3)]
    for _, resp in conns:
        assert resp.status == 200
        assert resp.readline().startswith(b"data: ")  # generation is under way
    m = server.metrics()
    assert m["kvserve_kv_cache_blocks_used"] > 0 and m["kvserve_num_requests_running"] == 3
    for conn, _ in conns:
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    assert server.wait_until(lambda: server.metrics()["kvserve_kv_cache_blocks_used"] == 0,
                             timeout_s=10)
    m = server.metrics()
    assert m["kvserve_kv_cache_usage_ratio"] == 0 and m["kvserve_num_requests_running"] == 0


def test_disconnect_while_waiting_for_a_whole_response_frees_blocks(server, model_name):
    body = {"model": model_name, "prompt": "Tell me a very long story.", "max_tokens": 4000,
            "temperature": 0, "ignore_eos": True}
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(server.base_url + "/completions", json=body, timeout=(5, 1.5))
    assert server.wait_until(lambda: server.metrics()["kvserve_kv_cache_blocks_used"] == 0,
                             timeout_s=10)


BAD_REQUESTS = [
    # (what, body or raw bytes, status, param or None, words the message must hold)
    ("malformed JSON", b'{"prompt": "hi",', 400, None, "not valid JSON"),
    ("not an object", b'[1, 2]', 400, None, "JSON object"),
    ("missing prompt", {"max_tokens": 4}, 400, "prompt", "required"),
    ("wrong type", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "number"),
    ("wrong type n", {"prompt": "hi", "n": "two"}, 400, "n", "integer"),
    ("bad prompt", {"prompt": [[1, 2], "a"]}, 400, "prompt", "token ids"),
    ("empty prompt", {"prompt": ""}, 400, "prompt", "empty"),
    ("empty batch", {"prompt": [[1], []]}, 400, "prompt", "empty"),
    ("token out of vocab", {"prompt": [1, 49152]}, 400, "prompt", "[0, 49152)"),
    ("out of range top_p", {"prompt": "hi", "top_p": 2}, 400, "top_p", "less than"),
    ("out of range n", {"prompt": "hi", "n": 0}, 400, "n", "greater than"),
    ("negative max_tokens", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens", "greater"),
    ("logprobs too many", {"prompt": "hi", "logprobs": 21}, 400, "logprobs", "20"),
    ("max_tokens 0 without echo", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "echo"),
    ("too long", {"prompt": "hi", "max_tokens": 9000}, 400, "max_tokens", "max_model_len"),
    ("oversize prompt", {"prompt": "word " * 9000}, 400, "prompt", "max_model_len"),
    ("unknown model", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "does not exist"),
    ("suffix", {"prompt": "hi", "suffix": "x"}, 400, "suffix", "not supported"),
    ("top_k overflow", {"prompt": "hi", "top_k": 2**63, "temperature": 1}, 400, "top_k", "less"),
    ("stream_options without stream", {"prompt": "hi", "stream_options": {"include_usage": True}},
     400, "stream_options", "stream: true"),
    ("string for a bool", {"prompt": "hi", "echo": "yes"}, 400, "echo", "boolean"),
]


@pytest.mark.parametrize("what,body,status,param,words", BAD_REQUESTS,
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, what, body, status,
                                                                 param, words):
    url = server.base_url + "/completions"
    if isinstance(body, bytes):
        r = requests.post(url, data=body, headers={"Content-Type": "application/json"},
                          timeout=30)
    else:
        r = requests.post(url, json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error
    assert "\n" not in error["message"] and "Traceback" not in error["message"]
    assert requests.get(server.url + "/health", timeout=5).status_code == 200


def test_chat_bad_requests(client, model_name):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model_name, messages=[], max_tokens=4)
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model_name, max_tokens=4,
                                       messages=[{"role": "wizard", "content": "hi"}])
    assert err.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT, max_tokens=4)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=4,
                                       top_logprobs=3)
    assert err.value.body["param"] == "top_logprobs"


def test_body_too_large_is_413_and_unknown_route_is_404(server):
    r = requests.post(server.base_url + "/completions", data=b"x" * (17 * 2**20),
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        for _ in range(17):
            yield b"x" * 2**20

    r = requests.post(server.base_url + "/completions", data=chunks(),
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = requests.get(server.url + "/v1/nothing", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    assert "/v1/nothing" in r.json()["error"]["message"]
    assert requests.get(server.url + "/health", timeout=5).status_code == 200


def test_continuous_usage_stats(client, model_name):
    chunks = list(client.completions.create(
        model=model_name, prompt="One, two,", max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in chunks]
    assert all(c.usage is not None for c in chunks) and counts == sorted(counts)
    assert counts[-1] == 5 and chunks[-1].choices == []


def test_metrics_report_latencies_tokens_and_prefix_hits(server, client, model_name):
    client.completions.create(model=model_name, prompt=LONG_PROMPT + " x", max_tokens=3,
                              temperature=0)
    client.completions.create(model=model_name, prompt=LONG_PROMPT + " x", max_tokens=3,
                              temperature=0)
    m = server.metrics()
    for name in ("kvserve_time_to_first_token_seconds_count",
                 "kvserve_inter_token_latency_seconds_count",
                 "kvserve_e2e_request_latency_seconds_count", "kvserve_prompt_tokens_total",
                 "kvserve_generation_tokens_total", "kvserve_prefix_cache_queried_tokens_total",
                 "kvserve_prefix_cache_hit_tokens_total", "kvserve_request_success_total"):
        assert m[name] > 0, name
    # one inter-token sample per token after each sequence's first, however many tokens an
    # output carried (a multi-step plan's come in one)
    assert m["kvserve_inter_token_latency_seconds_count"] == \
        m["kvserve_generation_tokens_total"] - m["kvserve_time_to_first_token_seconds_count"]
    hits = m["kvserve_prefix_cache_hit_tokens_total"]
    assert 0 < hits <= m["kvserve_prefix_cache_queried_tokens_total"]
    for name in ("kvserve_num_requests_running", "kvserve_num_requests_waiting",
                 "kvserve_kv_cache_usage_ratio", "kvserve_num_preemptions_total"):
        assert name in m
    text = requests.get(server.url + "/metrics", timeout=5).text
    assert '# TYPE kvserve_time_to_first_token_seconds histogram' in text
    # block events from the cache snapshot: the first request's full blocks were stored
    stored = [ln for ln in text.splitlines()
              if ln.startswith("kvserve_kv_block_events_total{") and 'event="stored"' in ln]
    assert len(stored) == 1 and float(stored[0].rsplit(" ", 1)[1]) > 0
    assert m["kvserve_kv_cache_bytes_per_token"] == 46_080  # float32 K and V, 30 layers


def test_openapi_schema_lists_the_endpoints(server):
    schema = requests.get(server.url + "/openapi.json", timeout=5).json()
    paths = schema["paths"]
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health",
            "/metrics"} <= set(paths)
    props = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"prompt", "max_tokens", "logprobs", "echo", "cache_salt", "stream"} <= set(props)
    assert props["top_p"]["anyOf"][0]["maximum"] == 1.0
    assert "400" in paths["/v1/completions"]["post"]["responses"]
