"""Routing benchmark of `kvserve serve --replicas N` (Ray Serve, local): the same multi-tenant
trace through round-robin, Ray Serve's power of two choices and kvserve's cache-aware router, in
one run. Prints a table for people and one JSON line last.

The trace: --tenants tenants (one API key each, so their caches never mix), each with its own
system prompt of about --system-tokens tokens, each running --chats conversations of --turns
turns. A turn's prompt is the system prompt, the conversation so far (with fixed assistant
replies, so the trace is identical for every router) and a new question; a conversation's next
turn is sent when its last one finishes. --concurrency client threads take the next ready turn
(closed loop). Replicas get small pools (--kv-cache-memory) so that one replica cannot hold every
tenant's prefix: where a request lands decides whether its prefix is cached.

Per request: TTFT = send to the first SSE chunk with text; prompt and cached tokens from the
usage (include_usage). Per router: prefix hit rate = cached / prompt tokens; TTFT p50 / p90 (of 36
requests a p99 is the maximum);
throughput = output tokens / wall time; load balance = the busiest replica's share of requests
and of prefill tokens (queried - hit, from /metrics), against 1/N for a perfect balance.

Each round starts every router on a fresh cluster. The run stops if a replica reports a cached
token before a few warm-up requests of another tenant (whose blocks the trace cannot hit) run
off the record, or if one replica's pool could hold the trace's distinct blocks (counted from
the usage: routing could not matter then). Routers run in a rotated order each round;
the table shows medians over --rounds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import threading
import time
from pathlib import Path

from bench_core import log, machine_info
from bench_serve import launch as serve_launch

ROUTERS = ("round-robin", "pow2", "cache-aware", "cache-aware@0")
TOPICS = ("shipping", "billing", "warranty", "returns", "security", "travel", "insurance",
          "payroll")
WORDS = ("account order parcel invoice refund policy customer agent ticket delivery address "
         "receipt coupon balance warranty claim courier station schedule route").split()


def launch(flags: list[str]) -> tuple[subprocess.Popen, int]:
    """`kvserve serve` with these flags (default dtype, no access log), once /health answers."""
    return serve_launch(["--no-access-log", *flags], dtype=None, quiet=True, timeout_s=300)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def system_prompt(tenant: int, tokens: int) -> str:
    rng = random.Random(1000 + tenant)
    words = " ".join(rng.choice(WORDS) for _ in range(tokens))
    return f"You are the {TOPICS[tenant % len(TOPICS)]} assistant of company {tenant}. " + words


def trace(args) -> list[list[dict]]:
    """Conversations: each a list of turns (request bodies + their API key), in order."""
    chats = []
    for t in range(args.tenants):
        system = system_prompt(t, args.system_tokens)
        for c in range(args.chats):
            messages = [{"role": "system", "content": system}]
            turns = []
            for k in range(args.turns):
                messages = [*messages, {"role": "user",
                                        "content": f"Chat {c}, question {k}: where is order "
                                                   f"{1000 * t + 10 * c + k}?"}]
                turns.append({"key": f"tenant-{t}", "body": {
                    "messages": messages, "max_tokens": args.max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}})
                messages = [*messages, {"role": "assistant",
                                        "content": f"Order {1000 * t + 10 * c + k} left the "
                                                   f"warehouse on day {k + 1} and is on its way."}]
            chats.append(turns)
    order = list(range(len(chats)))
    random.Random(7).shuffle(order)  # tenants interleaved
    return [chats[i] for i in order]


def one_request(port: int, turn: dict) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(turn["body"]),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {turn['key']}"})
    response = conn.getresponse()
    if response.status != 200:
        raise SystemExit(f"HTTP {response.status}: {response.read()[:300]!r}")
    ttft, usage = None, None
    for raw in response:
        line = raw.strip()
        if not line.startswith(b"data: {"):
            continue
        payload = json.loads(line[6:])
        if "error" in payload:
            raise SystemExit(f"stream error: {payload['error']}")
        if ttft is None and any(c["delta"].get("content") for c in payload.get("choices", [])):
            ttft = time.perf_counter() - t0
        if payload.get("usage"):
            usage = payload["usage"]
    conn.close()
    if ttft is None or usage is None:
        raise SystemExit(f"premise: a request streamed no text or no usage ({turn['key']})")
    return {"ttft": ttft, "prompt": usage["prompt_tokens"],
            "cached": usage["prompt_tokens_details"]["cached_tokens"],
            "output": usage["completion_tokens"]}


def metrics(port: int) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics", headers={"Authorization": "Bearer tenant-0"})
    out = {}
    for line in conn.getresponse().read().decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def per_replica(values: dict[str, float], name: str) -> dict[str, float]:
    return {k.split('"')[1]: v for k, v in values.items() if k.startswith(name + "{")}


def run_router(router: str, args, chats: list[list[dict]]) -> dict:
    name, _, imbalance = router.partition("@")
    flags = ["--replicas", str(args.replicas), "--router", name, "--replica-cpus",
             str(args.replica_cpus), "--kv-cache-memory", args.kv_cache_memory,
             "--max-model-len", str(args.max_model_len), "--max-num-seqs",
             str(args.max_num_seqs), *(f for t in range(args.tenants)
                                      for f in ("--api-key", f"tenant-{t}")),
             "--api-key", "warm-up",
             *(("--router-max-imbalance", imbalance) if imbalance else ())]
    proc, port = launch(flags)
    try:
        deadline = time.monotonic() + 60  # every replica reported (its pool is empty)
        while len(per_replica(metrics(port), "kvserve_replica_pid")) < args.replicas:
            if time.monotonic() > deadline:
                raise SystemExit("premise: the replicas never reported")
            time.sleep(0.5)
        cold = metrics(port)
        cached0 = sum(per_replica(cold, "kvserve_replica_prefix_cache_hit_tokens_total")
                      .values())
        if cached0:
            raise SystemExit(f"premise: {router}'s cluster had {cached0} cached tokens before "
                             "the trace")
        for i in range(2 * args.replicas):  # warm-up: first forward passes, off the record
            one_request(port, {"key": "warm-up", "body": {  # (another tenant: no trace hit)
                "messages": [{"role": "user", "content": f"Warm-up {i}: say hi."}],
                "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}})
        before = metrics(port)
        pool = per_replica(before, "kvserve_replica_kv_cache_blocks_total")
        results, lock = [], threading.Lock()
        ready = list(range(len(chats)))  # conversations whose next turn may be sent
        progress = [0] * len(chats)
        last: list[dict | None] = [None] * len(chats)  # each chat's previous turn
        cond = threading.Condition(lock)

        def worker() -> None:
            while True:
                with cond:
                    while not ready and any(p < len(c) for p, c in zip(progress, chats)):
                        cond.wait()
                    if not ready:
                        return
                    i = ready.pop(0)
                    turn = chats[i][progress[i]]
                r = one_request(port, turn)
                with cond:
                    r["turn"] = progress[i]
                    r["parent"] = last[i]
                    last[i] = r
                    results.append(r)
                    progress[i] += 1
                    if progress[i] < len(chats[i]):
                        ready.append(i)
                    cond.notify_all()

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        time.sleep(1.0)
        after = metrics(port)
    finally:
        stop(proc)
    routed = {r: n - before.get(f'kvserve_router_requests_total{{replica="{r}"}}', 0)
              for r, n in per_replica(after, "kvserve_router_requests_total").items()}
    first_turns = [r for r in results if r["turn"] == 0]
    distinct_blocks = sum(-(-r["prompt"] // 16) for r in first_turns) + \
        sum(-(-(r["prompt"] - r["parent"]["prompt"]) // 16) for r in results
            if r["parent"] is not None)
    if distinct_blocks <= max(pool.values()):
        raise SystemExit(f"premise: one replica's pool ({max(pool.values()):.0f} blocks) holds "
                         f"the whole trace ({distinct_blocks} blocks): routing cannot matter")
    queried = {r: v - before.get(f'kvserve_replica_prefix_cache_queried_tokens_total'
                                 f'{{replica="{r}"}}', 0) for r, v in per_replica(
        after, "kvserve_replica_prefix_cache_queried_tokens_total").items()}
    hit = {r: v - before.get(f'kvserve_replica_prefix_cache_hit_tokens_total{{replica="{r}"}}',
                             0) for r, v in per_replica(
        after, "kvserve_replica_prefix_cache_hit_tokens_total").items()}
    prefill = {r: queried.get(r, 0) - hit.get(r, 0) for r in queried}
    ttfts = sorted(r["ttft"] for r in results)
    prompt = sum(r["prompt"] for r in results)
    return {
        "router": router, "requests": len(results), "wall_s": wall,
        "trace_blocks": distinct_blocks, "pool_blocks": max(pool.values()),
        "hit_rate": sum(r["cached"] for r in results) / prompt,
        "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "ttft_p90_ms": 1000 * ttfts[round(0.9 * (len(ttfts) - 1))],
        "output_tok_s": sum(r["output"] for r in results) / wall,
        "busiest_request_share": max(routed.values()) / max(1, sum(routed.values())),
        "busiest_prefill_share": max(prefill.values()) / max(1.0, sum(prefill.values())),
        "requests_by_replica": sorted(routed.values()),
        "predictions": {o: after.get(f'kvserve_router_predictions_total{{outcome="{o}"}}', 0)
                        for o in ("exact", "over", "under")},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--replica-cpus", type=float, default=1.0)
    p.add_argument("--routers", default=",".join(ROUTERS),
                   help="comma-separated; cache-aware@N sets --router-max-imbalance N")
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--chats", type=int, default=3, help="conversations per tenant")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--system-tokens", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--kv-cache-memory", default="45MiB",
                   help="each replica's pool (64 blocks of the default model: two tenants' "
                   "conversations, not four)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None, help="write the JSON here too")
    args = p.parse_args()
    routers = args.routers.split(",")
    chats = trace(args)
    log(f"trace: {sum(len(c) for c in chats)} requests, {args.tenants} tenants x {args.chats} "
        f"chats x {args.turns} turns; {args.replicas} replicas; {machine_info()}")
    runs: dict[str, list[dict]] = {r: [] for r in routers}
    for k in range(args.rounds):
        for router in routers[k % len(routers):] + routers[:k % len(routers)]:
            r = run_router(router, args, chats)
            runs[router].append(r)
            log(f"round {k + 1} {router}: hit {r['hit_rate']:.1%}, TTFT p50 "
                f"{r['ttft_p50_ms']:.0f} ms, p90 {r['ttft_p90_ms']:.0f} ms, "
                f"{r['output_tok_s']:.1f} tok/s, by replica {r['requests_by_replica']}")
    keys = ("hit_rate", "ttft_p50_ms", "ttft_p90_ms", "output_tok_s", "busiest_request_share",
            "busiest_prefill_share")
    table = {router: {key: statistics.median(r[key] for r in rs) for key in keys}
             for router, rs in runs.items()}
    print(f"\n| router | prefix hit rate | TTFT p50 ms | TTFT p90 ms | output tok/s | busiest "
          f"replica: requests | prefill tokens |  (ideal {1 / args.replicas:.0%})")
    print("|---|---|---|---|---|---|---|")
    for router, m in table.items():
        print(f"| {router} | {m['hit_rate']:.1%} | {m['ttft_p50_ms']:.0f} | "
              f"{m['ttft_p90_ms']:.0f} | {m['output_tok_s']:.1f} | "
              f"{m['busiest_request_share']:.0%} | {m['busiest_prefill_share']:.0%} |")
    print(json.dumps({"bench": "route", "args": vars(args), "medians": table, "runs": runs}))
    if args.out:
        Path(args.out).write_text(json.dumps({"medians": table, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
