"""One tenant under attack by another, on `kvserve serve` with the embedded SmolLM2-135M-Instruct:
does the well-behaved tenant's service hold? And is one tenant's burst shared fairly?

Prints a table for people and one JSON line last.

Method (loopback, plain http.client clients, the server with its default limits and two API keys,
read from KVSERVE_API_KEYS; --max-num-seqs 40 so every stream below runs at once):
  (a) Inter-token latency. Tenant "good" runs --streams (32) streamed completions at once
      (distinct ~20-token prompts, --max-tokens new tokens, greedy, EOS ignored); ITL = gaps
      between its SSE chunks with text, pooled over all 32 streams; p50 and p99. Meanwhile tenant
      "evil" (or a client with no key) repeats one attack, one request at a time with
      --attack-pause-s (1 s) between, from --attackers (1) threads, until the good streams end:
      a hostile client, not a flood (rate limits against floods belong in front of the server).
      Phases: no attacker first and last (the baseline is the mean of their percentiles), each
      attack in turn between. Ratio = attack phase / baseline, same run.
      Attacks (each as the hostile client sent it; the server's answer is counted):
        cancel-huge    2,000 prompts x n=4 (8,000 sequences), client gone after 1 s
        cancel-big     64 prompts x n=4 (256 sequences, the most allowed), gone after 1 s
        huge-text      a 15.6 MB text prompt (over the body limit)
        big-text       a 3.9 MB text prompt (under it; over the context by its length)
        stop-ids       300,000 stop_token_ids, n=128
        no-key-body    an 8 MB body without an API key
        logprobs       n=8, 300 tokens, top_logprobs 20 (allowed: 50,400 entries)
        same-no-lp     the same 8 x 300 tokens without logprobs: the control that tells the
                       cost of 8 more sequences in the batch from that of the log-probs
        tiny-sampling  temperature 1e-38 and top_p 1e-300 (allowed; 32 tokens)
        metrics-scrape GET /metrics without a key
  (b) Fair scheduling. Tenant A runs --fair-a-clients (1) closed-loop streaming clients
      (--max-tokens each), tenant B first as many, then 10x as many, each phase for
      --fair-seconds (40) after a --fair-ramp-s (5) ramp; max_num_seqs is --fair-seqs (8), so
      B at 10x keeps every slot busy and some requests waiting. A's median TTFT (requests sent
      after the ramp) with B at 10x / with B at 1x: target at most 2x. The same traffic on a
      server without API keys (one FCFS queue for everyone) is shown beside it, same run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import statistics
import subprocess
import threading
import time
from pathlib import Path

from bench_core import log, machine_info
from bench_serve import launch, percentiles

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [f"Tenant note {i}: explain in a few plain sentences why reusing the keys and values "
           f"of token {100 + 7 * i} saves work." for i in range(4096)]
KEYS = {"good": "good-key", "evil": "evil-key", "a": "tenant-a-key", "b": "tenant-b-key"}


def start_server(*flags: str, keys: bool = True) -> tuple[subprocess.Popen, int]:
    env = {"KVSERVE_API_KEYS": ",".join(KEYS.values())} if keys else {}
    return launch(list(flags), env, log_level="error")


def headers(tenant: str | None) -> dict[str, str]:
    h = {"Content-Type": "application/json"}
    if tenant is not None:
        h["Authorization"] = f"Bearer {KEYS[tenant]}"
    return h


def stream(port: int, tenant: str | None, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: TTFT and the gaps between chunks with text."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, headers(tenant))
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"bench_abuse: a well-behaved request got HTTP {resp.status}: "
                         f"{resp.read()[:200]!r}")
    times = []
    for raw in resp:
        line = raw.strip()
        if line == b"data: [DONE]":
            break
        if line.startswith(b"data: ") and b'"text":""' not in line:
            times.append(time.perf_counter())
    conn.close()
    return {"ttft": times[0] - t0, "itl": [b - a for a, b in zip(times, times[1:])]}


def raw_request(port: int, method: str, path: str, body: bytes, hdrs: dict[str, str],
                timeout: float = 300.0) -> str:
    """Send one request; its status as text ('timeout' when the client gave up)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body, hdrs)
        resp = conn.getresponse()
        resp.read()
        return str(resp.status)
    except (TimeoutError, OSError):
        return "timeout"
    finally:
        conn.close()


def attacks(stop_ids_body: bytes) -> dict[str, object]:
    """name -> fn(port) -> status: one hostile request as its client sends it."""
    def completion(body: dict, tenant: str | None = "evil", timeout: float = 300.0):
        data = json.dumps(body).encode()
        return lambda port: raw_request(port, "POST", "/v1/completions", data, headers(tenant),
                                        timeout)

    huge_text = "The KV cache keeps the keys and values. " * 390_000
    return {
        "cancel-huge": completion({"prompt": [[1, 2, 3]] * 2000, "n": 4, "max_tokens": 50},
                                  timeout=1.0),
        "cancel-big": completion({"prompt": [[1, 2, 3, 4]] * 64, "n": 4, "max_tokens": 50,
                                  "ignore_eos": True}, timeout=1.0),
        "huge-text": completion({"prompt": huge_text, "max_tokens": 2}),
        "big-text": completion({"prompt": huge_text[:3_900_000], "max_tokens": 2}),
        "stop-ids": lambda port: raw_request(port, "POST", "/v1/completions", stop_ids_body,
                                             headers("evil")),
        "no-key-body": lambda port: raw_request(port, "POST", "/v1/completions",
                                                b"x" * 8_000_000, headers(None)),
        "logprobs": completion({"prompt": "Tell me a story.", "n": 8, "max_tokens": 300,
                                "logprobs": 20, "ignore_eos": True}),
        "same-no-lp": completion({"prompt": "Tell me a story.", "n": 8, "max_tokens": 300,
                                  "ignore_eos": True}),
        "tiny-sampling": completion({"prompt": "Tell me a story.", "max_tokens": 32,
                                     "temperature": 1e-38, "top_p": 1e-300}),
        "metrics-scrape": lambda port: raw_request(port, "GET", "/metrics", b"", headers(None)),
    }


def phase(port: int, args, offset: int, attack=None) -> dict:
    """The good tenant's streams, with `attack` repeated from other threads until they end."""
    done, statuses = threading.Event(), []

    def attacker() -> None:
        while not done.is_set():
            statuses.append(attack(port))
            done.wait(args.attack_pause_s)

    attackers = [threading.Thread(target=attacker) for _ in range(args.attackers if attack
                                                                  else 0)]
    for t in attackers:
        t.start()
    results: list[dict] = [None] * args.streams  # type: ignore[list-item]

    def good(i: int) -> None:
        results[i] = stream(port, "good", PROMPTS[offset + i], args.max_tokens)

    goods = [threading.Thread(target=good, args=(i,)) for i in range(args.streams)]
    t0 = time.perf_counter()
    for t in goods:
        t.start()
    for t in goods:
        t.join()
    wall = time.perf_counter() - t0
    done.set()
    for t in attackers:
        t.join()
    itl = [g for r in results for g in r["itl"]]
    return {**percentiles(itl), "wall_s": wall, "samples": len(itl),
            "attack_statuses": {s: statuses.count(s) for s in sorted(set(statuses))}}


def bench_attacks(args) -> dict:
    proc, port = start_server("--max-num-seqs", str(args.streams + 8))
    try:
        stop_ids = json.dumps({"prompt": "hi", "n": 128, "max_tokens": 2,
                               "stop_token_ids": [7] * 300_000}).encode()
        named = attacks(stop_ids)
        chosen = [a for a in args.attacks.split(",") if a]
        unknown = set(chosen) - set(named)
        if unknown:
            raise SystemExit(f"bench_abuse: unknown attack(s): {', '.join(sorted(unknown))}")
        stream(port, "good", PROMPTS[0], 4)  # warm-up
        out, offset, baselines = {}, 0, []
        for name in ["baseline", *chosen, "baseline"]:
            offset += args.streams
            log(f"(a) {name} ...")
            r = phase(port, args, offset, None if name == "baseline" else named[name])
            if name == "baseline":
                baselines.append(r)
            else:
                out[name] = r
        base_itl = []  # the two baseline phases' percentiles, averaged
        for key in ("p50", "p99"):
            base_itl.append(statistics.mean(b[key] for b in baselines))
        for r in out.values():
            r["ratio_p50"], r["ratio_p99"] = r["p50"] / base_itl[0], r["p99"] / base_itl[1]
        return {"baseline": {"p50": base_itl[0], "p99": base_itl[1], "runs": baselines},
                "attacks": out}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def fairness_phase(port: int, args, b_clients: int, offset: int, keyed: bool) -> dict:
    """A's --fair-a-clients and B's b_clients closed-loop clients for --fair-seconds; A's TTFTs
    of the requests it sent after a ramp of --fair-ramp-s."""
    t0 = time.perf_counter()
    end, ramp = t0 + args.fair_ramp_s + args.fair_seconds, t0 + args.fair_ramp_s
    ttfts: list[float] = []
    counter = iter(range(offset, offset + 100_000))

    def client(tenant: str) -> None:
        while time.perf_counter() < end:
            sent = time.perf_counter()
            r = stream(port, tenant if keyed else None, PROMPTS[next(counter) % len(PROMPTS)],
                       args.max_tokens)
            if tenant == "a" and sent >= ramp:
                ttfts.append(r["ttft"])

    threads = [threading.Thread(target=client, args=("a",)) for _ in range(args.fair_a_clients)]
    threads += [threading.Thread(target=client, args=("b",)) for _ in range(b_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not ttfts:
        raise SystemExit("bench_abuse: tenant A completed no request in the window")
    return {"ttft_median_s": statistics.median(ttfts), "requests": len(ttfts)}


def bench_fairness(args) -> dict:
    out = {}
    for label, keyed in (("fair (two API keys)", True), ("fcfs (no keys)", False)):
        proc, port = start_server("--max-num-seqs", str(args.fair_seqs), keys=keyed)
        try:
            stream(port, "a" if keyed else None, PROMPTS[0], 4)  # warm-up
            phases = {}
            for times in (1, 10):
                log(f"(b) {label}: B runs {times}x A's clients ...")
                phases[times] = fairness_phase(port, args, times * args.fair_a_clients,
                                               1000 * times, keyed)
            out[label] = {"ttft_median_even_s": phases[1]["ttft_median_s"],
                          "ttft_median_flood_s": phases[10]["ttft_median_s"],
                          "a_requests": [phases[1]["requests"], phases[10]["requests"]],
                          "ratio": phases[10]["ttft_median_s"] / phases[1]["ttft_median_s"]}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--attackers", type=int, default=1, help="attacking client threads")
    p.add_argument("--attack-pause-s", type=float, default=1.0,
                   help="pause between one attacker's requests")
    p.add_argument("--attacks", default="cancel-huge,cancel-big,huge-text,big-text,stop-ids,"
                   "no-key-body,"
                   "logprobs,same-no-lp,tiny-sampling,metrics-scrape")
    p.add_argument("--fair-a-clients", type=int, default=1)
    p.add_argument("--fair-seqs", type=int, default=8, help="max_num_seqs in (b)")
    p.add_argument("--fair-seconds", type=float, default=40.0)
    p.add_argument("--fair-ramp-s", type=float, default=5.0)
    p.add_argument("--quick", action="store_true", help="smoke run: few streams and tokens")
    args = p.parse_args()
    if args.quick:
        args.streams, args.max_tokens, args.fair_seconds, args.fair_ramp_s = 4, 8, 5.0, 1.0
        args.attacks = "huge-text,no-key-body"
    attack = bench_attacks(args)
    fair = bench_fairness(args)
    base = attack["baseline"]
    print(f"\n(a) tenant 'good': {args.streams} streams x {args.max_tokens} tokens; another "
          f"client attacks from {args.attackers} threads\n")
    head = f"{'phase':<16} {'ITL p50 ms':>10} {'p99 ms':>8} {'x p50':>6} {'x p99':>6}  answers"
    print(head + "\n" + "-" * (len(head) + 20))
    print(f"{'no attacker':<16} {base['p50'] * 1e3:>10.1f} {base['p99'] * 1e3:>8.1f}")
    for name, r in attack["attacks"].items():
        answers = ", ".join(f"{k} x{v}" for k, v in r["attack_statuses"].items())
        print(f"{name:<16} {r['p50'] * 1e3:>10.1f} {r['p99'] * 1e3:>8.1f} "
              f"{r['ratio_p50']:>5.2f}x {r['ratio_p99']:>5.2f}x  {answers}")
    print(f"\n(b) tenant A: {args.fair_a_clients} closed-loop client(s); tenant B: as many, then "
          f"10x as many; {args.fair_seconds:.0f} s each; max_num_seqs {args.fair_seqs}\n")
    for label, r in fair.items():
        print(f"{label:<20} A's median TTFT {r['ttft_median_even_s'] * 1e3:8.0f} ms with B at "
              f"1x, {r['ttft_median_flood_s'] * 1e3:8.0f} ms with B at 10x: {r['ratio']:.2f}x "
              f"(A's requests: {r['a_requests'][0]} / {r['a_requests'][1]})")
    print(json.dumps({"bench": "abuse", "machine": machine_info(),
                      "config": {k: v for k, v in vars(args).items()},
                      "attacks": attack, "fairness": fair}))


if __name__ == "__main__":
    main()
