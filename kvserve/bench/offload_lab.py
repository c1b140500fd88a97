"""The offload lab: what the tiers below the pool are worth on this machine, on the real model.

Part 1, time to first token by tier. For each prefix length (1k-8k tokens of the shipped corpus),
the prefix is computed once by an engine with every tier (host RAM, disk, Redis), then, per
repeat, evicted from the device pool down to one tier (engine.evict_prefix_cache) and asked for
again with a new question: its TTFT is that tier's fetch. Recompute is the same prompt on an
engine without tiers whose prefix cache is reset before each run. Every run checks its premise
(recompute: nothing cached; a tier: every prefix block fetched, and from that tier) and fails
loudly otherwise. The cost model's break-even prefix length per tier is read off its measured
rates, beside its fetch/recompute decision counts.

Part 2, a multi-tenant trace: tenants x shared prefixes whose working set is several times the
device pool, requests in a seeded random order: prefix hit rate and throughput with no tier and
with the host tier.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvserve.bench.report import write_json_and_plots
from kvserve.cli_flags import add_setting_flags
from kvserve.errors import ConfigError

TIERS = ("host", "disk", "redis")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_setting_flags(p, ("model", "dtype", "device", "kv_cache_dtype", "block_size"))
    p.add_argument("--prefix-lengths", default="1024,2048,4096,8064",
                   help="prefix lengths in tokens; each plus a 24-token question must fit the "
                   "model's context (default 1024,2048,4096,8064)")
    p.add_argument("--repeats", type=int, default=3, help="runs per length and tier (median)")
    p.add_argument("--redis-url", default=None,
                   help="a Redis to use (default: start redis-server on loopback if installed)")
    p.add_argument("--trace-requests", type=int, default=48,
                   help="requests in the multi-tenant trace (0: skip it)")
    p.add_argument("--out", default="kvserve-offload-lab", help="folder for the JSON and plot")
    p.add_argument("--json", action="store_true", help="print the JSON summary as the last line")


def start_redis() -> tuple[str | None, subprocess.Popen | None]:
    exe = shutil.which("redis-server")
    if exe is None:
        print("offload lab: redis-server is not installed: the Redis column is skipped",
              file=sys.stderr)
        return None, None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return f"redis://127.0.0.1:{port}/0", proc
        time.sleep(0.05)
    proc.terminate()
    raise RuntimeError("offload lab: redis-server did not start")


def engine_flags(args) -> dict:
    return {k: getattr(args, k) for k in ("model", "dtype", "device", "kv_cache_dtype",
                                           "block_size")}


def ttft(llm, ids: list[int], salt: str | None = None):
    from kvserve.request import SamplingParams

    out = llm.generate({"prompt_token_ids": ids, **({"cache_salt": salt} if salt else {})},
                       SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)[0]
    return out.metrics["ttft_s"], out.num_cached_tokens


def tier_counters(llm) -> dict:
    return {t.name: t.counters for t in llm.engine.cache_snapshot().tiers}


def part_ttft(args, lengths: list[int], corpus: list[int], redis_url: str | None,
              disk_dir: str) -> dict:
    from kvserve.engine.llm import LLM

    max_len = max(lengths) + 64  # the prefix, a 24-token question and the first token
    bs = args.block_size
    pool = (max_len // bs + 16) * args.block_bytes  # one max-length prompt and some
    plain = LLM(max_model_len=max_len, kv_cache_memory=pool, **engine_flags(args))
    tiers = ["host", "disk"] + (["redis"] if redis_url else [])
    tiered = LLM(max_model_len=max_len, kv_cache_memory=pool,
                 cpu_offload_memory="4GiB", disk_offload_dir=disk_dir, redis_url=redis_url,
                 **engine_flags(args))
    questions = [corpus[-(i + 1) * 24:-i * 24 or None] for i in range(args.repeats + 2)]
    rows = []
    for length in lengths:
        prefix = corpus[:length]
        row = {"prefix_tokens": length, "recompute_s": [], **{t + "_s": [] for t in tiers}}
        ttft(plain, prefix + questions[-1])  # warm-up at this length
        for i in range(args.repeats):
            plain.reset_prefix_cache()
            seconds, cached = ttft(plain, prefix + questions[i])
            if cached:
                raise RuntimeError(f"offload lab: a recompute run found {cached} tokens cached")
            row["recompute_s"].append(seconds)
        ttft(tiered, prefix + questions[-2], salt="lab")  # computes the prefix (and puts it)
        for tier in tiers:
            for i in range(args.repeats):
                tiered.engine.evict_prefix_cache(to=tier)
                before = tier_counters(tiered)[tier].num_fetched_blocks
                seconds, cached = ttft(tiered, prefix + questions[i], salt="lab")
                fetched = tier_counters(tiered)[tier].num_fetched_blocks - before
                if cached < length // bs * bs or fetched < length // bs:
                    raise RuntimeError(
                        f"offload lab: {tier} at {length} tokens: {cached} tokens cached, "
                        f"{fetched} blocks fetched from {tier} (expected all "
                        f"{length // bs} of the prefix's)")
                row[tier + "_s"].append(seconds)
        row = {k: statistics.median(v) if isinstance(v, list) else v for k, v in row.items()}
        for tier in tiers:
            row[tier + "_speedup"] = row["recompute_s"] / row[tier + "_s"]
        rows.append(row)
        print(f"offload lab: {length} tokens: recompute {row['recompute_s'] * 1e3:.0f} ms, "
              + ", ".join(f"{t} {row[t + '_s'] * 1e3:.1f} ms" for t in tiers), file=sys.stderr)
    lower = tiered.engine.block_manager.lower
    model = {}
    for t in tiers:
        n = next((n for n in range(1, max_len // bs + 1)
                  if lower.decide(t, n, 0).fetch), None)
        c = lower.counters[t]
        model[t] = {"break_even_tokens": None if n is None else n * bs,
                    "bytes_per_s": lower.rates[t].bytes_per_s,
                    "latency_s": lower.rates[t].latency_s,
                    "fetch_decisions": c.num_fetch_decisions,
                    "recompute_decisions": c.num_recompute_decisions,
                    "rejected_entries": c.num_rejected_entries}
    model["prefill_per_token_s"] = lower.prefill.per_token_s
    tiered.close()
    return {"tiers": tiers, "rows": rows, "cost_model": model}


def part_trace(args, corpus: list[int]) -> dict:
    """Tenants x prefixes of prefix_tokens each over a pool of pool_tokens: with no tier and
    with the host tier, the same requests in the same order."""
    from kvserve.engine.llm import LLM
    from kvserve.request import SamplingParams

    tenants, per_tenant, prefix_tokens, pool_tokens = 4, 4, 448, 1536
    prefixes = {(t, p): corpus[(t * per_tenant + p) * prefix_tokens:
                               (t * per_tenant + p + 1) * prefix_tokens]
                for t in range(tenants) for p in range(per_tenant)}
    rnd = random.Random(0)
    reqs = [rnd.choice(list(prefixes)) for _ in range(args.trace_requests)]
    prompts = [{"prompt_token_ids": prefixes[k] + corpus[-(i % 50 + 1) * 16:-(i % 50) * 16 or
                                                              None],
                "cache_salt": f"tenant{k[0]}"} for i, k in enumerate(reqs)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    result = {"tenants": tenants, "prefixes": len(prefixes), "prefix_tokens": prefix_tokens,
              "pool_tokens": pool_tokens,
              "working_set_over_pool": len(prefixes) * prefix_tokens / pool_tokens,
              "requests": len(prompts), "runs": {}}
    outputs = {}
    for name, extra in (("none", {}), ("host", {"cpu_offload_memory": "2GiB"})):
        llm = LLM(max_model_len=512, max_num_seqs=4,
                  kv_cache_memory=pool_tokens // args.block_size * args.block_bytes,
                  **engine_flags(args), **extra)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        snap = llm.engine.cache_snapshot()
        outputs[name] = [o.token_ids for o in outs]
        tokens = sum(len(p["prompt_token_ids"]) + len(o.token_ids) for p, o in zip(prompts, outs))
        result["runs"][name] = {
            "wall_s": wall, "requests_per_s": len(prompts) / wall, "tokens_per_s": tokens / wall,
            "prefix_hit_rate": snap.prefix.hit_rate,
            "tiers": {t.name: {"fetched_blocks": t.counters.num_fetched_blocks,
                               "fetch_decisions": t.counters.num_fetch_decisions,
                               "recompute_decisions": t.counters.num_recompute_decisions}
                      for t in snap.tiers}}
        print(f"offload lab: trace with tiers={name}: hit rate {snap.prefix.hit_rate:.1%}, "
              f"{len(prompts) / wall:.2f} requests/s", file=sys.stderr)
    if outputs["host"] != outputs["none"]:
        raise RuntimeError("offload lab: the trace's outputs differ with the host tier")
    result["throughput_gain"] = (result["runs"]["host"]["requests_per_s"]
                                 / result["runs"]["none"]["requests_per_s"])
    return result


def main(args: argparse.Namespace) -> int:
    lengths = [int(x) for x in args.prefix_lengths.split(",") if x.strip()]
    if not lengths or min(lengths) < args.block_size or args.repeats < 1:
        raise ConfigError("--prefix-lengths must be lengths of at least one block and "
                          "--repeats at least 1")
    from kvserve.engine.kv_quality import corpus_text

    redis_url, proc = (args.redis_url, None) if args.redis_url else start_redis()
    disk_dir = tempfile.mkdtemp(prefix="kvserve-offload-lab-")
    t0 = time.perf_counter()
    try:
        from kvserve.engine.llm import LLM

        probe = LLM(max_model_len=256, kv_cache_memory="16MiB", **engine_flags(args)).engine
        context = probe.spec.max_position_embeddings
        if max(lengths) + 64 > context:
            raise ConfigError(f"--prefix-lengths: {max(lengths):,} tokens and a question do "
                              f"not fit the model's context ({context:,}); at most "
                              f"{context - 64:,}")
        corpus = probe.tokenizer.encode(corpus_text())
        args.block_bytes = probe.kv_bytes_per_token * args.block_size
        del probe
        result = {"lab": "offload", "model": args.model or "embedded SmolLM2-135M-Instruct",
                  "dtype": args.dtype, "kv_cache_dtype": args.kv_cache_dtype,
                  "block_size": args.block_size, "repeats": args.repeats,
                  "ttft": part_ttft(args, lengths, corpus, redis_url, disk_dir)}
        if args.trace_requests:
            result["trace"] = part_trace(args, corpus)
    finally:
        shutil.rmtree(disk_dir, ignore_errors=True)
        if proc is not None:
            proc.terminate()
    result["wall_s"] = time.perf_counter() - t0
    result["files"] = write_files(result, Path(args.out))
    print(summary(result))
    if args.json:
        print(json.dumps(result))
    return 0


def summary(result: dict) -> str:
    t = result["ttft"]
    tiers = t["tiers"]
    lines = ["prefix tokens | recompute TTFT | " + " | ".join(
        f"{x} TTFT (x faster)" for x in tiers)]
    for r in t["rows"]:
        lines.append(f"{r['prefix_tokens']:>13,} | {r['recompute_s'] * 1e3:>11.0f} ms | "
                     + " | ".join(f"{r[x + '_s'] * 1e3:.1f} ms ({r[x + '_speedup']:.0f}x)"
                                  for x in tiers))
    m = t["cost_model"]
    lines.append(f"cost model (prefill {m['prefill_per_token_s'] * 1e3:.2f} ms/token at the "
                 "start of a prompt): " + "; ".join(
                     f"{x}: {m[x]['bytes_per_s'] / 1e9:.2f} GB/s + {m[x]['latency_s'] * 1e3:.2f}"
                     f" ms, break-even {m[x]['break_even_tokens']} tokens, decisions "
                     f"{m[x]['fetch_decisions']} fetch / {m[x]['recompute_decisions']} recompute"
                     for x in tiers))
    if "trace" in result:
        tr = result["trace"]
        lines.append(f"trace: {tr['requests']} requests, {tr['tenants']} tenants x "
                     f"{tr['prefixes'] // tr['tenants']} prefixes of {tr['prefix_tokens']} tokens"
                     f" ({tr['working_set_over_pool']:.1f}x the pool):")
        for name, run in tr["runs"].items():
            lines.append(f"  tiers={name}: hit rate {run['prefix_hit_rate']:.1%}, "
                         f"{run['requests_per_s']:.2f} requests/s, {run['tokens_per_s']:.0f} "
                         f"tokens/s")
        lines.append(f"  throughput gain with the host tier: {tr['throughput_gain']:.2f}x")
    return "\n".join(lines)


def write_files(result: dict, out: Path) -> dict[str, str]:
    return write_json_and_plots(result, out, "offload",
                                {"ttft_png": ("offload_lab_ttft.png", plot)})


def plot(result: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    t = result["ttft"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    x = [r["prefix_tokens"] for r in t["rows"]]
    for name in ["recompute"] + t["tiers"]:
        ax.plot(x, [r[name + "_s"] * 1e3 for r in t["rows"]], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prefix tokens (evicted from the device pool, then asked for again)")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title(f"Fetch from a tier vs recompute: {result['model']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
