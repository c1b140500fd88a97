"""Load benchmark of `kvserve serve` on loopback: request throughput, output tokens/s, TTFT and
inter-token latency percentiles at 1, 8 and 32 concurrent streaming clients, beside the same
requests run in-process through the offline LLM API (the engine without HTTP), in one run.

Prints a table for people and one JSON line last.

Method: the server runs the embedded SmolLM2-135M-Instruct (float32, --max-num-seqs = the largest
concurrency). Each level sends --requests-per-client x C streamed completions (distinct prompts of
about 20 tokens, --max-tokens new tokens, EOS ignored, temperature 0) from C client threads that
each keep one request in flight (closed loop; plain http.client, so the client costs little CPU
on this 2-core machine). Per request: TTFT = first SSE chunk with text - send; ITL = gaps between
later chunks with text; e2e = send to data: [DONE]; output tokens from usage (include_usage).
One warm-up request per level, then --runs runs; the table shows the median run (by throughput)
and percentiles over all requests of all runs. Bounded: a run stops issuing requests after
--max-run-seconds, and the whole run is limited by the requests' count.
The offline column: the same prompts and parameters through LLM.generate with max_num_seqs = C
(the same engine batching, no HTTP, no threads), median of the same number of runs.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_core import log, machine_info

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [f"Customer {i}: please summarise, in plain words, why a KV cache makes decoding "
           f"token number {100 + 7 * i} cheaper than recomputing everything." for i in range(512)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(max_num_seqs: int) -> tuple[subprocess.Popen, int]:
    return launch(["--max-num-seqs", str(max_num_seqs)])


def launch(flags: list[str], env: dict[str, str] | None = None,
           log_level: str = "warning", dtype: str | None = "float32", quiet: bool = False,
           timeout_s: float = 180) -> tuple[subprocess.Popen, int]:
    """`kvserve serve` (--dtype dtype; None: the default) with these flags on a free port, once
    /health answers. quiet: stdout too is dropped, and the server gets a process group of its
    own (a cluster's Ray processes can be ended with it)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvserve.cli", "serve", "--port", str(port), "--log-level",
         log_level, *(("--dtype", dtype) if dtype else ()), *flags],
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, stderr=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL if quiet else None, start_new_session=quiet)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.25)
    if quiet:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.kill()
    raise SystemExit("server did not start")


def one_request(port: int, prompt: str, max_tokens: int) -> dict:
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    token_times, tokens = [], 0
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if chunk["choices"] and chunk["choices"][0]["text"]:
            token_times.append(time.perf_counter())
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    conn.close()
    return {"ttft": token_times[0] - t0 if token_times else float("nan"),
            "itl": [b - a for a, b in zip(token_times, token_times[1:])],
            "e2e": end - t0, "tokens": tokens}


def run_level(port: int, concurrency: int, num_requests: int, max_tokens: int,
              max_run_s: float, offset: int) -> dict:
    """C client threads, each with one request in flight, until num_requests are done."""
    results: list[dict] = []
    lock = threading.Lock()
    next_index = [0]
    t0 = time.perf_counter()

    def client() -> None:
        while True:
            with lock:
                i = next_index[0]
                if i >= num_requests or time.perf_counter() - t0 > max_run_s:
                    return
                next_index[0] += 1
            r = one_request(port, PROMPTS[(offset + i) % len(PROMPTS)], max_tokens)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "wall_s": wall, "req_per_s": len(results) / wall,
            "tok_per_s": tokens / wall, "results": results}


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 \
        else [values[0]] * 99
    return {"p50": qs[49], "p90": qs[89], "p99": qs[98]}


def bench_server(levels: list[int], args) -> dict[int, dict]:
    proc, port = start_server(max(levels))
    out = {}
    try:
        for c in levels:
            n = args.requests_per_client * c
            log(f"serve: {c} client(s), {n} requests x {args.max_tokens} tokens, "
                f"{args.runs} run(s)")
            one_request(port, PROMPTS[-1], 4)  # warm-up
            runs = [run_level(port, c, n, args.max_tokens, args.max_run_seconds, k * n)
                    for k in range(args.runs)]
            every = [r for run in runs for r in run["results"]]
            median = sorted(runs, key=lambda r: r["tok_per_s"])[len(runs) // 2]
            out[c] = {
                "requests": sum(r["requests"] for r in runs),
                "req_per_s": median["req_per_s"], "tok_per_s": median["tok_per_s"],
                "ttft_s": percentiles([r["ttft"] for r in every]),
                "itl_s": percentiles([x for r in every for x in r["itl"]]),
                "e2e_s": percentiles([r["e2e"] for r in every]),
                "runs_tok_per_s": [r["tok_per_s"] for r in runs],
            }
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return out


def bench_offline(levels: list[int], args) -> dict[int, float]:
    from kvserve import LLM, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    out = {}
    for c in levels:
        llm = LLM(dtype="float32", max_num_seqs=c, seed=0)
        n = args.requests_per_client * c
        llm.generate(PROMPTS[-1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        speeds = []
        for k in range(args.runs):
            t0 = time.perf_counter()
            outs = llm.generate(PROMPTS[k * n:(k + 1) * n], params, use_tqdm=False)
            speeds.append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0))
        out[c] = statistics.median(speeds)
        log(f"offline: {c} at once: {out[c]:.1f} tok/s")
        del llm
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-run-seconds", type=float, default=180.0)
    p.add_argument("--no-offline", action="store_true", help="skip the in-process column")
    args = p.parse_args()
    levels = sorted(set(args.concurrency))
    if args.requests_per_client * max(levels) * args.runs > len(PROMPTS):
        raise SystemExit("too many requests for the distinct prompts: lower --runs or "
                         "--requests-per-client")
    served = bench_server(levels, args)
    offline = {} if args.no_offline else bench_offline(levels, args)

    ms = 1e3
    print(f"\nkvserve serve, loopback, {args.max_tokens} new tokens per request, streamed; "
          f"median of {args.runs} runs; latency percentiles over all requests (ms)")
    print(f"{'clients':>7} {'reqs':>5} {'req/s':>6} {'tok/s':>7} {'offline':>8} {'ratio':>6} "
          f"{'TTFT p50':>9} {'p90':>7} {'p99':>7} {'ITL p50':>8} {'p90':>6} {'p99':>6} "
          f"{'e2e p50':>8}")
    for c in levels:
        s = served[c]
        off = offline.get(c)
        print(f"{c:>7} {s['requests']:>5} {s['req_per_s']:>6.2f} {s['tok_per_s']:>7.1f} "
              f"{off if off else float('nan'):>8.1f} "
              f"{s['tok_per_s'] / off if off else float('nan'):>6.2f} "
              f"{s['ttft_s']['p50'] * ms:>9.0f} {s['ttft_s']['p90'] * ms:>7.0f} "
              f"{s['ttft_s']['p99'] * ms:>7.0f} {s['itl_s']['p50'] * ms:>8.1f} "
              f"{s['itl_s']['p90'] * ms:>6.1f} {s['itl_s']['p99'] * ms:>6.1f} "
              f"{s['e2e_s']['p50'] * ms:>8.0f}")
    print(json.dumps({"bench": "serve", "machine": machine_info(), "max_tokens": args.max_tokens,
                      "runs": args.runs, "served": served, "offline_tok_per_s": offline}))


if __name__ == "__main__":
    main()
