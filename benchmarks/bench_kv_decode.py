"""Decode speed by KV format: one sequence, float32 compute, the median of the per-step times of
the last 40 of 48 decoded tokens after a prompt of (context - 48) tokens, for each context and
format, in one process on this machine (run it alone). Prefix caching is off and each run checks
that nothing of its prompt was found cached.

    .venv/bin/python benchmarks/bench_kv_decode.py [--contexts 1024,4096,8192]
        [--formats float32,fp8_e4m3,int8,int4]
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
    args = p.parse_args()
    torch.set_num_threads(2)
    contexts = [int(c) for c in args.contexts.split(",")]
    formats = args.formats.split(",")
    ms: dict[tuple[str, int], float] = {}
    for fmt in formats:
        engine = LLMEngine(EngineConfig.create(
            dtype="float32", kv_cache_dtype=fmt, kv_cache_memory="1GiB",
            max_model_len=max(contexts), enable_prefix_caching=False, kv_quant_check="off"))
        for ctx in contexts:
            ids = [(i * 37) % 40000 + 100 for i in range(ctx - DECODE)]
            engine.add_request(f"r{ctx}", ids, SamplingParams(max_tokens=DECODE, temperature=0,
                                                               ignore_eos=True))
            times = []
            while engine.has_unfinished_requests():
                t0 = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - t0)
            r = engine.pop_finished(f"r{ctx}")
            if r.num_cached_tokens:
                raise SystemExit(f"bench_kv_decode: {r.num_cached_tokens} prompt tokens cached")
            ms[fmt, ctx] = 1e3 * statistics.median(times[-40:])
            print(f"{fmt:<10} context {ctx:>6}: {ms[fmt, ctx]:6.1f} ms/token", flush=True)
        del engine
    for ctx in contexts:
        if ("float32", ctx) in ms:
            print(f"context {ctx}: " + ", ".join(
                f"{f} {ms['float32', ctx] / ms[f, ctx]:.2f}x" for f in formats))


if __name__ == "__main__":
    main()
