"""The `kvserve` console command. Bad input ends with one line on stderr and a non-zero exit.

Subcommands parse flags and call the Python API; they hold no engine logic of their own.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from kvserve.config import CACHE_MODES, DTYPES, KV_CACHE_DTYPES, PREEMPTION_MODES
from kvserve.errors import KVServeError

EXIT_ERROR = 1


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="GGUF file or Hugging Face folder "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="float32", choices=DTYPES)
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--cache-mode", default="paged", choices=CACHE_MODES)
    g.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    g.add_argument("--kv-cache-memory", default="1GiB",
                   help="paged KV pool size, e.g. 2GiB, or a fraction of free memory (0.5)")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=8)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--preemption-mode", default="recompute", choices=PREEMPTION_MODES)
    g.add_argument("--max-input-tokens", type=int, default=None, help="reject longer prompts")
    g.add_argument("--max-output-tokens", type=int, default=None,
                   help="reject requests asking for more new tokens")
    g.add_argument("--max-long-requests", type=int, default=None,
                   help="at most this many requests over --long-context-threshold run at once")
    g.add_argument("--long-context-threshold", type=int, default=4096)
    g.add_argument("--enable-prefix-caching", default=True,
                   action=argparse.BooleanOptionalAction,
                   help="reuse cached K/V of shared prompt prefixes (paged mode; on by default)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(model=args.model, dtype=args.dtype, device=args.device,
                cache_mode=args.cache_mode, kv_cache_dtype=args.kv_cache_dtype,
                kv_cache_memory=args.kv_cache_memory, block_size=args.block_size,
                max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                preemption_mode=args.preemption_mode, max_input_tokens=args.max_input_tokens,
                max_output_tokens=args.max_output_tokens,
                max_long_requests=args.max_long_requests,
                long_context_threshold=args.long_context_threshold,
                enable_prefix_caching=args.enable_prefix_caching,
                seed=args.seed if args.seed is not None else 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one prompt, streamed to stdout")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--presence-penalty", type=float, default=0.0)
    gen.add_argument("--frequency-penalty", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--stats", action="store_true",
                     help="print TTFT, decode tokens/s and KV-cache bytes to stderr")
    add_engine_flags(gen)
    add_serve_parser(sub)
    add_bench_parser(sub)
    add_plan_parser(sub)
    return parser


def add_plan_parser(sub) -> None:
    from kvserve.planner import command

    plan = sub.add_parser("plan", help="how much KV cache a model needs; how many requests fit",
                          description="KV memory planner: bytes per token, per request, "
                          "concurrency and context that fit beside the weights, per KV dtype.")
    command.add_arguments(plan)


def add_serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                           description="OpenAI-compatible API: /v1/models, /v1/completions, "
                           "/v1/chat/completions, /health, /metrics.")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", action="append", default=[], metavar="KEY",
                       help="require 'Authorization: Bearer KEY' (repeatable: each key is its "
                       "own prefix-cache tenant)")
    serve.add_argument("--max-queue", type=int, default=None,
                       help="waiting sequences before new requests get 429 (default: unbounded)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name clients send (default: the model's own)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds in-flight requests may finish after SIGTERM")
    serve.add_argument("--seed", type=int, default=None, help="seed of unseeded sampling")
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"])
    add_engine_flags(serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from kvserve.config import EngineConfig, ServerConfig

    # Both configs are checked before torch loads: a typo fails in a fraction of a second.
    server = ServerConfig(host=args.host, port=args.port, api_keys=tuple(args.api_key),
                          max_queue=args.max_queue, served_model_name=args.served_model_name,
                          shutdown_timeout_s=args.shutdown_timeout)
    engine = EngineConfig.create(**engine_kwargs(args))
    try:
        from kvserve.server.launch import serve
    except ImportError as err:
        raise KVServeError(f"the server needs the 'serve' extra ({err.name} is missing): "
                           "pip install 'kvserve[serve]'") from None
    return serve(engine, server, args.log_level)


def add_bench_parser(sub) -> None:
    from kvserve.bench import LABS

    bench = sub.add_parser("bench", help="run a lab that measures a KV-cache trade-off",
                           description="Labs: each writes CSV, PNG plots and JSON to --out.")
    labs = bench.add_subparsers(dest="lab")
    for lab in LABS.values():
        lab_parser = labs.add_parser(lab.name, help=lab.summary, description=lab.summary)
        lab.load().add_arguments(lab_parser)


def cmd_bench(args: argparse.Namespace) -> int:
    from kvserve.bench import LABS, describe

    if args.lab is None:
        print(describe())
        return 0
    return LABS[args.lab].load().main(args)


def cmd_generate(args: argparse.Namespace) -> int:
    from kvserve.request import SamplingParams

    # Parameters are checked before torch loads: a typo fails in a fraction of a second.
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    from kvserve.engine.llm import LLM

    llm = LLM(**engine_kwargs(args))
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        prompt = {"prompt_token_ids": llm.encode_chat(messages)}
    else:
        prompt = args.prompt
    t0 = time.perf_counter()
    for piece in llm.stream(prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats:
        print_stats(llm, time.perf_counter() - t0)
    return 0


def print_stats(llm, wall_s: float) -> None:
    out = llm.last_output
    m = out.metrics
    kv = llm.engine.kv_cache_stats()
    lines = [
        f"model: {llm.engine.model_name} ({llm.engine.config.dtype}, {llm.engine.device}, "
        f"cache {llm.engine.config.cache.cache_mode}), loaded in {llm.engine.load_time_s:.2f} s",
        f"prompt tokens: {out.num_prompt_tokens}, generated tokens: {len(out.token_ids)}, "
        f"finish: {out.finish_reason}",
        f"TTFT: {m.get('ttft_s', float('nan')) * 1e3:.1f} ms, "
        f"decode: {m.get('decode_tokens_per_s', float('nan')):.1f} tokens/s, "
        f"wall: {wall_s:.2f} s",
        f"KV cache: {kv['kv_bytes_per_token']:,} bytes/token, "
        f"{(out.num_prompt_tokens + len(out.token_ids)) * kv['kv_bytes_per_token']:,} bytes for "
        f"this sequence's tokens, {kv['kv_bytes_allocated']:,} bytes allocated",
    ]
    if "num_blocks_total" in kv:
        blocks = int(m.get("num_blocks", 0))
        block_bytes = kv["block_size"] * kv["kv_bytes_per_token"]
        lines.append(
            f"this request: {blocks} blocks ({blocks * block_bytes:,} bytes of KV), "
            f"preempted {int(m.get('num_preemptions', 0))} times")
        peak, total = kv["peak_blocks_used"], kv["num_blocks_total"]
        lines.append(
            f"KV pool: {total:,} blocks of {kv['block_size']} tokens, peak {peak:,} used "
            f"({peak / total:.2%}), now {kv['num_blocks_used']} used, "
            f"preemptions: {kv['num_preemptions']}")
    if "prefix_cache_hit_rate" in kv:
        lines.append(
            f"prefix cache: {out.num_cached_tokens} of this prompt's tokens reused; "
            f"{kv['prefix_cache_hit_tokens']:,} of {kv['prefix_cache_queried_tokens']:,} queried "
            f"tokens hit ({kv['prefix_cache_hit_rate']:.1%}); blocks cached: "
            f"{kv['prefix_cache_blocks']}, evicted: {kv['prefix_cache_evictions']}")
    lines += [
        f"K/V projections computed: {llm.engine.model.num_kv_projections:,}",
    ]
    for line in lines:
        print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="kvserve: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "plan":
            from kvserve.planner import command

            return command.main(args)
    except KVServeError as err:
        print(f"kvserve: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("kvserve: interrupted", file=sys.stderr)
        return 130
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
