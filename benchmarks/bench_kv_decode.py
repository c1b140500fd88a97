"""Decode speed by KV format: one sequence, float32 compute, the median of the per-step times of
the last 40 of 48 decoded tokens after a prompt of (context - 48) tokens, for each context and
format, in one process on this machine (run it alone). The formats' engines are built first and
measured in turn, --rounds times (this machine's read bandwidth drifts: interleaving keeps a
drift from favouring the format that ran first); the figure is the median over rounds, and the
ratios are float32's over each format's within each round, then their median. Prefix caching is
off and each run checks that nothing of its prompt was found cached.

    .venv/bin/python benchmarks/bench_kv_decode.py [--contexts 1024,4096,8192]
        [--formats float32,fp8_e4m3,int8,int4,int8/int4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvserve.config import EngineConfig
from kvserve.engine.engine import LLMEngine
from kvserve.request import SamplingParams

DECODE = 48


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="1024,4096,8192")
    p.add_argument("--formats", default="float32,fp8_e4m3,int8,int4")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(2)
    contexts = [int(c) for c in args.contexts.split(",")]
    formats = args.formats.split(",")
    if formats[0] != "float32":
        raise SystemExit("bench_kv_decode: --formats must start with float32 (the baseline)")
    engines = {fmt: LLMEngine(EngineConfig.create(  # "k/v": K in one format, V in another
        dtype="float32", k_cache_dtype=fmt.partition("/")[0],
        v_cache_dtype=fmt.partition("/")[2] or fmt, kv_cache_memory="1GiB",
        max_model_len=max(contexts), enable_prefix_caching=False, kv_quant_check="off"))
        for fmt in formats}
    ms: dict[tuple[str, int], list[float]] = {}
    for rnd in range(args.rounds):
        for ctx in contexts:
            for fmt, engine in engines.items():
                ms.setdefault((fmt, ctx), []).append(decode_ms(engine, ctx, f"r{rnd}-{ctx}"))
                print(f"round {rnd} {fmt:<10} context {ctx:>6}: {ms[fmt, ctx][-1]:6.1f} ms/token",
                      flush=True)
    for ctx in contexts:
        base = ms["float32", ctx]
        print(f"context {ctx}: " + ", ".join(
            f"{f} {statistics.median(ms[f, ctx]):.1f} ms "
            f"({statistics.median(b / x for b, x in zip(base, ms[f, ctx])):.2f}x)"
            for f in formats))


def decode_ms(engine: LLMEngine, ctx: int, request_id: str) -> float:
    ids = [(i * 37) % 40000 + 100 for i in range(ctx - DECODE)]
    engine.add_request(request_id, ids, SamplingParams(max_tokens=DECODE, temperature=0,
                                                       ignore_eos=True))
    times = []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    r = engine.pop_finished(request_id)
    if r.num_cached_tokens:
        raise SystemExit(f"bench_kv_decode: {r.num_cached_tokens} prompt tokens cached")
    return 1e3 * statistics.median(times[-40:])


if __name__ == "__main__":
    main()
