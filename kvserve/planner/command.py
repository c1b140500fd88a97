"""`kvserve plan`: flags in, the capacity plan out as text, JSON or a plot (and, with --simulate,
a replay of synthetic traffic through the real allocator). No torch."""

from __future__ import annotations

import argparse
import json

from kvserve.cli_flags import add_setting_flags
from kvserve.config import SchedulerConfig
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
    p.add_argument("--kv-cache-memory", default=None,
                   help="the KV budget itself, as the engine's flag of that name (instead of "
                   "--memory less weights and --reserve): the plan the engine logs at start-up")
    add_setting_flags(p, ("kv_cache_dtype", "k_cache_dtype", "v_cache_dtype", "block_size",
                          "kv_residual_tokens", "cache_policy", "sink_tokens",
                          "window_tokens"))  # the engine's own flags
    p.add_argument("--reserve", default=DEFAULT_RESERVE,
                   help="memory kept for activations and the runtime: a percentage of "
                   f"--memory or a size (default {DEFAULT_RESERVE.replace('%', '%%')})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="draw KV memory vs context for several concurrencies")
    p.add_argument("--list-presets", action="store_true", help="list the built-in models")
    add_simulation_arguments(p)


def add_simulation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload simulation (--simulate)")
    g.add_argument("--simulate", action="store_true",
                   help="replay synthetic traffic through the real scheduler and KV allocator")
    g.add_argument("--num-requests", type=int, default=200)
    g.add_argument("--arrival-rate", type=float, default=2.0, help="requests per second")
    g.add_argument("--prompt-tokens", default=None,
                   help="N, A-B (uniform) or exp:MEAN (default: uniform context/4-3*context/4)")
    g.add_argument("--output-tokens", default=None,
                   help="N, A-B or exp:MEAN (default: uniform context/40-context/4)")
    g.add_argument("--shared-prefix-fraction", type=float, default=0.0,
                   help="fraction of requests that start with one shared prefix")
    g.add_argument("--shared-prefix-tokens", type=int, default=512)
    defaults = SchedulerConfig()  # the engine's own, so a simulation models `kvserve serve`
    g.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs,
                   help="as the engine's flag (default %(default)s)")
    g.add_argument("--max-num-batched-tokens", type=int,
                   default=defaults.max_num_batched_tokens,
                   help="as the engine's flag (default %(default)s)")
    g.add_argument("--enable-prefix-caching", default=True,
                   action=argparse.BooleanOptionalAction)
    g.add_argument("--step-ms", type=float, default=20.0, help="assumed cost of one step")
    g.add_argument("--ms-per-token", type=float, default=0.1,
                   help="assumed cost of each token a step feeds")
    g.add_argument("--seed", type=int, default=0)


def _workload(args: argparse.Namespace, context: int, vocab_size: int):
    from kvserve.planner.simulate import LengthDistribution, Workload

    prompt = args.prompt_tokens or f"{max(1, context // 4)}-{max(1, 3 * context // 4)}"
    output = args.output_tokens or f"{max(1, context // 40)}-{max(1, context // 4)}"
    return Workload(num_requests=args.num_requests, arrival_rate=args.arrival_rate,
                    prompt_tokens=LengthDistribution.parse(prompt, "--prompt-tokens"),
                    output_tokens=LengthDistribution.parse(output, "--output-tokens"),
                    shared_prefix_fraction=args.shared_prefix_fraction,
                    shared_prefix_tokens=(args.shared_prefix_tokens
                                          if args.shared_prefix_fraction else 0),
                    vocab_size=vocab_size, seed=args.seed)


def _simulate(args: argparse.Namespace, result) -> tuple[dict, str]:
    from kvserve.planner.report import render_simulation
    from kvserve.planner.simulate import StepCost, simulate_plan

    workload = _workload(args, result.context, result.model.vocab_size)
    cost = StepCost(args.step_ms, args.ms_per_token)
    sim = simulate_plan(result, workload, args.max_num_seqs, args.max_num_batched_tokens,
                        args.enable_prefix_caching, cost)
    out, text = sim.to_dict(), render_simulation(sim, workload, cost)
    if args.plot:
        from kvserve.planner.plot import plot_simulation

        stem = args.plot[:-4] if args.plot.lower().endswith(".png") else args.plot
        out["plot"] = plot_simulation(sim, f"{stem}.simulation.png")
        text += f"\nplot: {out['plot']}"
    return out, text


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
                  k_cache_dtype=args.k_cache_dtype, v_cache_dtype=args.v_cache_dtype,
                  kv_residual_tokens=args.kv_residual_tokens,
                  reserve=args.reserve, weights_memory=args.weights_memory,
                  cache_policy=args.cache_policy, sink_tokens=args.sink_tokens,
                  window_tokens=args.window_tokens, kv_cache_memory=args.kv_cache_memory)
    out = result.to_dict()
    sim_text = ""
    if args.simulate:
        out["simulation"], sim_text = _simulate(args, result)
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
        if sim_text:
            print(f"\n{sim_text}")
    return 0
