"""`kvserve serve --replicas 2` on a local Ray instance (the real CLI, in a process of its own),
with the default model and small pools: outputs equal the single-process server's, requests
sharing a prefix go where the prefix is (every prediction checked against the replica's real
hit), tenants never share a routing hit, replicas share a Redis tier, and a replica killed during
traffic loses no request that had not started streaming.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import requests

from tests.serving import start_server

pytest.importorskip("ray.serve", reason="needs the 'cluster' extra (scripts/setup.sh --test)")

KEYS = ("key-a", "key-b")
ENGINE = ("--kv-cache-memory", "32MiB", "--max-model-len", "512", "--max-num-seqs", "2",
          "--threads", "1")
CLUSTER = ("--replicas", "2", "--replica-cpus", "1", *ENGINE,
           *(flag for k in KEYS for flag in ("--api-key", k)))
WORDS = ("river stone lamp garden copper violin harbor meadow lantern pepper quartz falcon "
         "orchard thimble canyon saddle").split()


def system_prompt(seed: int, words: int = 150) -> str:
    """A distinct system prompt of about 200 tokens (13 blocks of 16)."""
    return " ".join(WORDS[(seed * 7 + i * (seed + 3)) % len(WORDS)] for i in range(words))


def metric_values(server, key: str = KEYS[0]) -> dict[str, float]:
    """'name{labels}' -> value, labels kept (Server.metrics folds them)."""
    text = requests.get(server.url + "/metrics", timeout=10,
                        headers={"Authorization": f"Bearer {key}"}).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def by_label(values: dict[str, float], name: str) -> dict[str, float]:
    """{label value: value} of a metric with one label."""
    out = {}
    for k, v in values.items():
        if k.startswith(name + "{"):
            out[k[len(name) + 1:-1].split('"')[1]] = v
    return out


def chat(server, content: str, system: str | None = None, key: str = KEYS[0],
         **body) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": content}]
    r = requests.post(server.base_url + "/chat/completions", timeout=120,
                      headers={"Authorization": f"Bearer {key}"},
                      json={"messages": messages, "max_tokens": 8, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("cluster"), *CLUSTER)
    yield server
    assert server.stop() == 0, server.log()[-3000:]


def test_outputs_equal_the_single_process_servers(cluster, tmp_path):
    single = start_server(tmp_path, *ENGINE, *(f for k in KEYS for f in ("--api-key", k)))
    try:
        auth = {"Authorization": f"Bearer {KEYS[0]}"}
        bodies = [
            ("/chat/completions", {"messages": [{"role": "user", "content": "Name a colour."}],
                                   "max_tokens": 24, "temperature": 0, "logprobs": True,
                                   "top_logprobs": 2}),
            ("/completions", {"prompt": "The capital of France is", "max_tokens": 16,
                              "temperature": 0, "logprobs": 2, "echo": True}),
            ("/completions", {"prompt": "Once upon a time", "max_tokens": 16, "n": 2,
                              "temperature": 0.8, "seed": 7}),
            ("/chat/completions", {"messages": [{"role": "user", "content": "Give a JSON."}],
                                   "max_tokens": 24, "temperature": 0,
                                   "response_format": {"type": "json_object"}}),
        ]
        for path, body in bodies:
            got = requests.post(cluster.base_url + path, json=body, headers=auth, timeout=120)
            want = requests.post(single.base_url + path, json=body, headers=auth, timeout=120)
            assert got.status_code == want.status_code == 200, (got.text, want.text)
            g, w = got.json(), want.json()
            for cg, cw in zip(g["choices"], w["choices"], strict=True):
                assert cg.get("text", cg.get("message")) == cw.get("text", cw.get("message"))
                assert cg["finish_reason"] == cw["finish_reason"]
                assert _logprobs(cg) == pytest.approx(_logprobs(cw), abs=1e-4)
            assert g["usage"]["completion_tokens"] == w["usage"]["completion_tokens"]
        # streamed: the same text, chunk by chunk into one
        body = {"messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 20,
                "temperature": 0, "stream": True}
        texts = [_streamed_text(s, body) for s in (cluster, single)]
        assert texts[0] == texts[1] and texts[0]
        # errors: the same status and body
        for path, body in (("/chat/completions", {"messages": [], "max_tokens": 4}),
                           ("/completions", {"prompt": "x" * 9000, "max_tokens": 4}),
                           ("/completions", {"prompt": "hi", "max_tokens": 600})):
            got = requests.post(cluster.base_url + path, json=body, headers=auth, timeout=60)
            want = requests.post(single.base_url + path, json=body, headers=auth, timeout=60)
            assert got.status_code == want.status_code and got.status_code in (400, 422)
            assert got.json() == want.json()
        r = requests.get(cluster.base_url + "/models", timeout=10)
        assert r.status_code == 401  # API keys hold on the cluster too
    finally:
        single.stop()


def _logprobs(choice: dict) -> list[float]:
    lp = choice.get("logprobs") or {}
    if "content" in lp:
        return [t["logprob"] for t in lp["content"] or []]
    return [x for x in lp.get("token_logprobs") or [] if x is not None]


def _streamed_text(server, body: dict, key: str = KEYS[0]) -> str:
    text = []
    with requests.post(server.base_url + "/chat/completions", json=body, stream=True,
                       headers={"Authorization": f"Bearer {key}"}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                for c in json.loads(line[6:]).get("choices", []):
                    text.append(c["delta"].get("content") or "")
    return "".join(text)


def test_requests_sharing_a_prefix_go_where_it_is_and_every_prediction_is_the_real_hit(
        cluster):
    before = metric_values(cluster)
    cached = []
    for seed in (1, 2, 3):
        system = system_prompt(seed)
        for turn in range(3):
            usage = chat(cluster, f"Question {turn}?", system)["usage"]
            cached.append(usage["prompt_tokens_details"]["cached_tokens"])
            time.sleep(0.3)  # one report period: the first request's blocks are reported
    after = metric_values(cluster)

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    # each system prompt's later turns hit: only the replica that computed it holds it
    assert all(c >= 128 for i, c in enumerate(cached) if i % 3), cached
    assert all(c == 0 for i, c in enumerate(cached) if i % 3 == 0), cached
    assert delta('kvserve_router_decisions_total{reason="prefix"}') == 6
    assert delta('kvserve_router_decisions_total{reason="no-match"}') == 3
    # the router's prediction (its view of the replicas' block keys) is each real hit
    assert delta('kvserve_router_predictions_total{outcome="exact"}') == 9
    assert delta("kvserve_router_predicted_hit_tokens_total") == sum(cached)
    assert delta("kvserve_router_real_hit_tokens_total") == sum(cached)


def test_tenants_never_share_a_routing_hit(cluster):
    system = system_prompt(11)
    assert chat(cluster, "Hello?", system, key=KEYS[0])["usage"][
        "prompt_tokens_details"]["cached_tokens"] == 0
    time.sleep(0.5)
    before = metric_values(cluster)
    usage = chat(cluster, "Hello?", system, key=KEYS[1])["usage"]  # the same prompt, tenant b
    after = metric_values(cluster)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    name = 'kvserve_router_decisions_total{reason="no-match"}'
    assert after[name] - before[name] == 1  # b's keys match nothing a holds
    assert chat(cluster, "Hello?", system, key=KEYS[0])["usage"][
        "prompt_tokens_details"]["cached_tokens"] >= 128  # a's still do


def test_a_burst_sharing_a_new_prefix_lands_on_one_replica(cluster):
    """Requests routed before any report: the router counts what it sent as held."""
    system = system_prompt(21)
    before = by_label(metric_values(cluster), "kvserve_router_requests_total")
    threads = [threading.Thread(target=chat, args=(cluster, f"Burst {i}?", system))
               for i in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join()
    after = by_label(metric_values(cluster), "kvserve_router_requests_total")
    moved = sorted(after[r] - before.get(r, 0) for r in after)
    assert moved[-1] == 4, (before, after)


def test_a_client_that_goes_away_ends_its_request_on_the_replica(cluster):
    body = {"messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
    with requests.post(cluster.base_url + "/chat/completions", json=body, stream=True,
                       headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=60) as r:
        for line in r.iter_lines():  # until its first token
            if line.startswith(b"data: {") and any(
                    c["delta"].get("content") for c in json.loads(line[6:])["choices"]):
                break
    # gone after a token: 400 tokens would take far longer than this wait
    def running() -> float:
        return sum(by_label(metric_values(cluster), "kvserve_replica_num_requests_running")
                   .values())

    assert cluster.wait_until(lambda: running() == 0, 10), running()


def test_a_killed_replica_loses_no_request_that_had_not_started_streaming(cluster):
    values = metric_values(cluster)
    pids = by_label(values, "kvserve_replica_pid")
    assert len(pids) == 2
    retries_before = values.get("kvserve_cluster_retries_total", 0)
    results: dict[int, dict] = {}

    def stream(i: int) -> None:
        body = {"messages": [{"role": "user", "content": f"Tell a story number {i}."}],
                "max_tokens": 48, "ignore_eos": True, "temperature": 0, "stream": True}
        got = {"tokens": 0, "error": None, "finish": None}
        with requests.post(cluster.base_url + "/chat/completions", json=body, stream=True,
                           headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=180) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith(b"data: {"):
                    continue
                payload = json.loads(line[6:])
                if "error" in payload:
                    got["error"] = payload["error"]["message"]
                for c in payload.get("choices", []):
                    if c["delta"].get("content"):
                        got["tokens"] += 1
                    got["finish"] = c.get("finish_reason") or got["finish"]
        results[i] = got

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    # once some stream has tokens, kill the replica with the most requests waiting
    assert cluster.wait_until(lambda: sum(by_label(metric_values(cluster),
                                                   "kvserve_replica_num_requests_waiting")
                                          .values()) >= 4, 60)
    waiting = by_label(metric_values(cluster), "kvserve_replica_num_requests_waiting")
    victim = max(waiting, key=waiting.get)
    os.kill(int(pids[victim]), signal.SIGKILL)
    for t in threads:
        t.join(240)
    assert len(results) == 10
    failed = {i: r for i, r in results.items() if r["error"] is not None}
    for i, r in results.items():
        if r["error"] is None:
            assert r["finish"] == "length" and r["tokens"] > 0, (i, r)
    # only streams already under way on the killed replica (2 at most: --max-num-seqs 2) fail,
    # each after tokens reached its client; the waiting ones were retried elsewhere
    assert len(failed) <= 2 and all(r["tokens"] > 0 for r in failed.values()), results
    assert metric_values(cluster).get("kvserve_cluster_retries_total", 0) > retries_before
    # Serve restarts it, and the cluster serves as before
    assert cluster.wait_until(lambda: len(by_label(metric_values(cluster),
                                                   "kvserve_replica_pid")) == 2
                              and victim not in by_label(metric_values(cluster),
                                                         "kvserve_replica_pid"), 120)
    assert chat(cluster, "Still there?")["choices"][0]["finish_reason"] == "length"


def redis_hits(server) -> dict[str, float]:
    """Blocks each replica found in the Redis tier (replicas with none left out)."""
    return {k: v for k, v in metric_values(server).items()
            if k.startswith("kvserve_replica_kv_tier_hit_blocks_total") and 'tier="redis"' in k
            and v > 0}


def test_replicas_share_a_redis_tier_never_across_tenants(tmp_path, redis_server):
    url, _, _ = redis_server
    server = start_server(tmp_path, *CLUSTER, "--router", "round-robin",
                          "--cpu-offload-memory", "32MiB", "--redis-url", url)
    try:
        system = system_prompt(31)
        chat(server, "First?", system)  # one replica computes it; it is put in Redis
        first = by_label(metric_values(server), "kvserve_router_requests_total")
        time.sleep(1.0)
        assert redis_hits(server) == {}
        for turn in range(4):  # round robin: the next lands on the other replica
            usage = chat(server, f"Again {turn}?", system)["usage"]
            routed = by_label(metric_values(server), "kvserve_router_requests_total")
            if not set(routed) <= {r for r, n in first.items() if n}:
                break
        time.sleep(1.0)
        hits = redis_hits(server)
        assert len(hits) == 1 and list(hits.values())[0] >= 12, (hits, first, routed)
        assert usage["prompt_tokens_details"]["cached_tokens"] >= 128  # and fetched
        chat(server, "Third?", system, key=KEYS[1])  # another tenant: nothing to find
        time.sleep(1.0)
        assert redis_hits(server) == hits
    finally:
        assert server.stop() == 0


def test_a_replica_that_cannot_start_is_one_line_and_a_nonzero_exit(tmp_path):
    with pytest.raises(RuntimeError) as err:
        start_server(tmp_path, "--replicas", "1", "--kv-cache-memory", "4MiB",
                     "--max-model-len", "512")
    log = str(err.value)
    assert "kvserve: error: the replicas failed to start: kv_cache_memory '4MiB'" in log
    assert "Traceback" not in log.split("kvserve: error:")[-1]


def test_a_serve_config_builds_the_cli_s_application():
    """`import_path: kvserve.cli:cluster_application` (Serve config files, KubeRay's
    RayService) takes `kvserve serve` flags and builds what --replicas deploys; bad flags are
    refused before anything starts."""
    from kvserve.cli import cluster_application
    from kvserve.errors import ConfigError

    app = cluster_application({"flags": "--replicas 3 --router pow2 --kv-cache-memory 32MiB "
                                        "--router-max-imbalance 2"})
    ingress = app._bound_deployment
    engine = ingress.init_args[0]._bound_deployment
    assert (ingress.name, ingress.num_replicas) == ("kvserve-ingress", 1)
    assert (engine.name, engine.num_replicas) == ("kvserve-engine", 3)
    assert engine._deployment_config.request_router_config.request_router_class == \
        "kvserve.cluster.routers.PowerOfTwoRouter"
    assert engine.init_args[0].cache.kv_cache_memory == "32MiB"
    with pytest.raises(ConfigError):
        cluster_application({"flags": "--replicas 2000"})
