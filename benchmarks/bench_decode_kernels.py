"""The C decode-attention kernels alone: one query token over a paged K/V store of --context
tokens, for every layer of the default model's shape (30 layers, 9 query heads, 3 KV heads, head
dim 64, 16-token blocks), float32 K/V against int8 K/V (codes, scales and zeros; a 128-token
residual window), each layer with its own pool so the blocks come from memory as in a real decode
step. Blocks are scattered over a pool twice the sequence's size (--contiguous: in order). Prints
the median ms per 30 layers over 15 runs after a warm-up, twice, interleaved, and a JSON line.
Run it alone (two threads on two cores).

    .venv/bin/python benchmarks/bench_decode_kernels.py [--context 8192] [--contiguous] [--hot]

--hot points every block-table entry at 4 blocks, so everything is in L1/L2: the kernels'
instruction cost without memory (how the int8 kernel was found bound by instructions).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from kvserve.kernels import cpu as cpu_kernels

LAYERS, BLOCK, NUM_KV, HEADS, HEAD_DIM, WINDOW_BLOCKS = 30, 16, 3, 9, 64, 8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--contiguous", action="store_true")
    p.add_argument("--hot", action="store_true")
    args = p.parse_args()
    if cpu_kernels.load() is None:
        sys.exit("bench_decode_kernels: no C compiler, so no C kernels to measure")
    if args.context % BLOCK or args.context < BLOCK * (WINDOW_BLOCKS + 1):
        sys.exit(f"bench_decode_kernels: --context must be a multiple of {BLOCK} "
                 f"and at least {BLOCK * (WINDOW_BLOCKS + 1)}")
    torch.manual_seed(0)
    ctx, nb = args.context, args.context // BLOCK
    pool = 4 if args.hot else 2 * nb

    def table() -> torch.Tensor:
        if args.hot:
            ids = torch.arange(nb) % pool
        else:
            ids = torch.arange(nb) if args.contiguous else torch.randperm(pool)[:nb]
        return ids.to(torch.int32).view(1, -1)

    shape = (pool, BLOCK, NUM_KV, HEAD_DIM)
    f32 = [(torch.randn(shape), torch.randn(shape), table()) for _ in range(LAYERS)]

    def int8_layer():
        k = {"codes": torch.randint(0, 256, shape, dtype=torch.uint8),
             "scale": torch.rand(pool, NUM_KV, HEAD_DIM).half(),
             "zero": torch.rand(pool, NUM_KV, HEAD_DIM).half()}
        v = {"codes": torch.randint(0, 256, shape, dtype=torch.uint8),
             "scale": torch.rand(pool, BLOCK, NUM_KV, HEAD_DIM // 32).half(),
             "zero": torch.rand(pool, BLOCK, NUM_KV, HEAD_DIM // 32).half()}
        return k, v, table()

    int8 = [int8_layer() for _ in range(LAYERS)]
    ring = (1, WINDOW_BLOCKS * BLOCK, NUM_KV, HEAD_DIM)
    window = cpu_kernels.Window(torch.randn(ring), torch.randn(ring),
                                torch.zeros(1, dtype=torch.long), WINDOW_BLOCKS)
    q = torch.randn(1, HEADS, HEAD_DIM)
    lens = torch.tensor([ctx], dtype=torch.int32)
    scores = torch.empty(HEADS * ctx)

    def run_f32():
        for k, v, t in f32:
            cpu_kernels.paged_decode_attention(q, k, v, t, lens, ctx, scores)

    def run_int8():
        for k, v, t in int8:
            cpu_kernels.paged_decode_attention_affine((8, 8), q, k, v, window, t, lens, ctx,
                                                      scores)

    results: dict[str, list[float]] = {"float32": [], "int8": []}
    for _ in range(2):
        for name, fn in (("float32", run_f32), ("int8", run_int8)):
            fn()
            times = []
            for _ in range(15):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            results[name].append(statistics.median(times) * 1e3)
    where = "hot (4 blocks)" if args.hot else "contiguous" if args.contiguous else "scattered"
    summary = {name: round(min(ms), 2) for name, ms in results.items()}
    print(f"context {ctx}, {LAYERS} layers, blocks {where}, {torch.get_num_threads()} threads: "
          + ", ".join(f"{n} {ms:.1f} ms" for n, ms in summary.items())
          + f" (float32 / int8 = {summary['float32'] / summary['int8']:.2f}x)")
    print(json.dumps({"context": ctx, "blocks": where, "ms_per_30_layers": summary}))


if __name__ == "__main__":
    main()
