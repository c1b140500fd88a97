"""`kvserve plan`: flags in, the capacity plan out as text, JSON or a plot (and, with --simulate,
a replay of synthetic traffic through the real allocator). No torch."""

from __future__ import annotations

import argparse
import json

from kvserve.cache.layout import KV_FORMAT_SHORT_NAMES
from kvserve.planner.capacity import DEFAULT_RESERVE, WEIGHT_DTYPES, plan
from kvserve.planner.presets import PRESETS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a preset name (--list-presets), a config.json, a Hugging Face folder or a "
                   "GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--context", type=int, default=4000, help="tokens per request (default 4000)")
    p.add_argument("--concurrency", type=int, default=20,
                   help="requests held at once (default 20)")
    p.add_argument("--memory", default="24GiB", help="accelerator memory, e.g. 24GiB, 80GB")
    p.add_argument("--weights-dtype", default="bf16", choices=WEIGHT_DTYPES,
                   help="stored: the sizes of a GGUF file's tensors")
    p.add_argument("--weights-memory", default=None,
                   help="the weights' size if known (overrides --weights-dtype), e.g. 14GB")
    p.add_argument("--kv-cache-dtype", default="auto",
                   choices=["auto", *KV_FORMAT_SHORT_NAMES.values()],
                   help="auto: the weights dtype if a float format, else fp16")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--reserve", default=DEFAULT_RESERVE,
                   help="memory kept for activations and the runtime: a percentage of "
                   f"--memory or a size (default {DEFAULT_RESERVE})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="draw KV memory vs context for several concurrencies")
    p.add_argument("--list-presets", action="store_true", help="list the built-in models")


def main(args: argparse.Namespace) -> int:
    if args.list_presets:
        for key, shape in PRESETS.items():
            print(f"{key:<16} {shape.name:<16} {shape.num_layers:>3} layers {shape.num_heads:>3} "
                  f"heads {shape.num_kv_heads:>3} KV heads ({shape.attention_kind}) head_dim "
                  f"{shape.head_dim}")
        return 0
    result = plan(args.model, context=args.context, concurrency=args.concurrency,
                  memory=args.memory, weights_dtype=args.weights_dtype,
                  kv_cache_dtype=args.kv_cache_dtype, block_size=args.block_size,
                  reserve=args.reserve, weights_memory=args.weights_memory)
    out = result.to_dict()
    if args.plot:
        from kvserve.planner.plot import plot_plan

        out["plot"] = plot_plan(result, args.plot)
    if args.json:
        print(json.dumps(out))
    else:
        from kvserve.planner.report import render

        print(render(result))
        if args.plot:
            print(f"\nplot: {args.plot}")
    return 0
