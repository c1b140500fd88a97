"""The `kvserve` console command. Bad input ends with one line on stderr and a non-zero exit.

Subcommands parse flags and call the Python API; they hold no engine logic of their own.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from kvserve.cli_flags import add_setting_flags, setting_values
from kvserve.errors import KVServeError

EXIT_ERROR = 1


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """Every engine setting as a flag, derived from its declaration in config.py."""
    add_setting_flags(p.add_argument_group("engine"))


def engine_kwargs(args: argparse.Namespace) -> dict:
    return {**setting_values(args), "seed": args.seed if args.seed is not None else 0}


class HelpWithDefaults(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it states one already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or default in (None, False, [], argparse.SUPPRESS)
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def _every_option_helped(parser: argparse.ArgumentParser) -> None:
    """argparse prints no help line, hence no default, for an option without help text."""
    parser.formatter_class = HelpWithDefaults
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _every_option_helped(sub)
        elif action.option_strings and not action.help:
            action.help = action.dest.replace("_", " ")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description=__doc__.splitlines()[0],
                                     formatter_class=HelpWithDefaults)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one prompt, streamed to stdout")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    gen.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="0 = greedy (the default here; the server's default is OpenAI's 1.0 "
                     "or --generation-config's)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k likeliest (0: all)")
    gen.add_argument("--min-p", type=float, default=0.0,
                     help="drop tokens below min_p x the likeliest's probability")
    gen.add_argument("--repetition-penalty", type=float, default=1.0,
                     help="divide (multiply, if negative) repeated tokens' logits by it")
    gen.add_argument("--presence-penalty", type=float, default=0.0,
                     help="subtracted from the logit of every token already generated")
    gen.add_argument("--frequency-penalty", type=float, default=0.0,
                     help="subtracted per occurrence of a token already generated")
    gen.add_argument("--seed", type=int, default=None, help="seed of this request's sampling")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--stats", action="store_true",
                     help="print TTFT, decode tokens/s and KV-cache bytes to stderr")
    add_engine_flags(gen)
    add_serve_parser(sub)
    add_bench_parser(sub)
    add_plan_parser(sub)
    _every_option_helped(parser)
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
                           "/v1/chat/completions, /tokenize, /detokenize, /health, /metrics.")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--api-key", action="append", default=[], metavar="KEY",
                       help="require 'Authorization: Bearer KEY' (repeatable: each key is its "
                       "own tenant: prefix-cache salt, fair share, queue limit). Keys on the "
                       "command line show in `ps`: prefer --api-key-file or KVSERVE_API_KEYS")
    serve.add_argument("--api-key-file", default=None, metavar="PATH",
                       help="read API keys from a file, one per line ('#' starts a comment)")
    serve.add_argument("--max-queue", type=int, default=1024,
                       help="sequences waiting in all before new requests get 429 "
                       "(default: 1024)")
    serve.add_argument("--max-queue-per-tenant", type=int, default=256,
                       help="sequences one API key may have waiting before its requests get "
                       "429 (default: 256)")
    serve.add_argument("--max-sequences-per-request", type=int, default=256,
                       help="prompts x n of one request (default: 256)")
    serve.add_argument("--max-body-bytes", default=None, metavar="SIZE",
                       help="larger request bodies get 413 from their headers, e.g. 16MiB "
                       "(default: room for four of the longest prompts the context admits, at "
                       "least 4 MiB)")
    serve.add_argument("--max-logprob-entries", type=int, default=100_000,
                       help="n x max_tokens x (top_logprobs + 1) of one request "
                       "(default: 100000)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name clients send (default: the model's own)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds in-flight requests may finish after SIGTERM")
    serve.add_argument("--seed", type=int, default=None, help="seed of unseeded sampling")
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"],
                       help="uvicorn's and kvserve's log level")
    serve.add_argument("--generation-config", default="auto", metavar="auto|none|FILE",
                       help="sampling defaults for fields a request leaves out: auto = the "
                       "model folder's generation_config.json if it has one, else OpenAI's "
                       "(temperature 1.0, top_p 1.0); none = OpenAI's; or a JSON file of "
                       "temperature, top_p, top_k, min_p, repetition_penalty, max_tokens")
    serve.add_argument("--access-log", default=True, action=argparse.BooleanOptionalAction,
                       help="one log line per request: method, path, status, tokens in/out, "
                       "cached tokens, TTFT and time (never the text)")
    cluster = serve.add_argument_group(
        "replicas (Ray Serve)", "several engine replicas behind this one endpoint, routed by "
        "what each replica's prefix cache holds; needs the 'cluster' extra (ray[serve])")
    cluster.add_argument("--replicas", type=int, default=0, metavar="N",
                         help="run N engine replicas as a Ray Serve deployment (0: one engine "
                         "in this process)")
    cluster.add_argument("--ray-address", default=None, metavar="ADDR",
                         help="an existing Ray cluster (e.g. ray://head:10001, or 'auto'); "
                         "default: start a local Ray instance")
    cluster.add_argument("--router", default="cache-aware",
                         choices=("cache-aware", "pow2", "round-robin"),
                         help="how requests are placed: where their prefix is cached, Ray "
                         "Serve's power of two choices, or in turn")
    cluster.add_argument("--router-max-imbalance", type=int, default=4, metavar="N",
                         help="cache-aware: go to the least busy replica instead when the one "
                         "holding the prefix has more than N requests in flight beyond it")
    cluster.add_argument("--replica-cpus", type=float, default=1.0, metavar="CPUS",
                         help="Ray CPUs each replica reserves (its torch threads unless "
                         "--threads is given)")
    add_engine_flags(serve)


def cmd_serve(args: argparse.Namespace) -> int:
    # the start-up report (model, KV capacity, groups) and the access log at --log-level
    logging.getLogger("kvserve").setLevel(args.log_level.upper())
    engine, server = serve_configs(args)
    if args.replicas:
        return _serve_cluster(args, engine, server)
    try:
        from kvserve.server.launch import serve
    except ImportError as err:
        raise KVServeError(f"the server needs the 'serve' extra ({err.name} is missing): "
                           "pip install 'kvserve[serve]'") from None
    return serve(engine, server, args.log_level)


def serve_configs(args: argparse.Namespace):
    """`kvserve serve`'s EngineConfig and ServerConfig. Both are checked before torch loads: a
    typo fails in a fraction of a second."""
    from kvserve.config import EngineConfig, ServerConfig, parse_size
    from kvserve.server.defaults import generation_defaults

    engine = EngineConfig.create(**engine_kwargs(args))
    server = ServerConfig(host=args.host, port=args.port, api_keys=api_keys(args),
                          max_queue=args.max_queue,
                          max_queue_per_tenant=args.max_queue_per_tenant,
                          max_sequences_per_request=args.max_sequences_per_request,
                          max_logprob_entries=args.max_logprob_entries,
                          max_body_bytes=None if args.max_body_bytes is None else parse_size(
                              args.max_body_bytes, "--max-body-bytes"),
                          served_model_name=args.served_model_name,
                          shutdown_timeout_s=args.shutdown_timeout,
                          generation_defaults=generation_defaults(args.generation_config,
                                                                  engine.model),
                          access_log=args.access_log)
    return engine, server


def _cluster_config(args: argparse.Namespace):
    from kvserve.config import ClusterConfig

    return ClusterConfig(replicas=args.replicas or 1, ray_address=args.ray_address,
                         router=args.router, max_imbalance=args.router_max_imbalance,
                         replica_cpus=args.replica_cpus)


def _serve_cluster(args: argparse.Namespace, engine, server) -> int:
    cluster = _cluster_config(args)
    try:
        from kvserve.cluster.deploy import serve_cluster
    except ImportError as err:
        raise KVServeError(f"--replicas needs the 'cluster' extra ({err.name} is missing): "
                           "pip install 'kvserve[cluster]'") from None
    return serve_cluster(engine, server, cluster)


def cluster_application(args: dict):
    """A Ray Serve application builder, for `serve run`, Serve config files and KubeRay's
    RayService: `import_path: kvserve.cli:cluster_application` with `args: {flags: "--replicas
    4 --router cache-aware ..."}` (`kvserve serve` flags; Serve's own config places the HTTP
    proxy, so --host and --port are ignored)."""
    import shlex

    flags = shlex.split(str(args.get("flags", "")))
    parsed = build_parser().parse_args(["serve", *flags])
    engine, server = serve_configs(parsed)
    from kvserve.cluster.deploy import build_application

    return build_application(engine, server, _cluster_config(parsed))


def api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    """--api-key values, then the --api-key-file's lines, then KVSERVE_API_KEYS (comma- or
    whitespace-separated), without repeats."""
    keys = list(args.api_key)
    if args.api_key_file is not None:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as err:
            raise KVServeError(f"cannot read --api-key-file: {err.strerror}: "
                               f"{args.api_key_file}") from None
        keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    keys += os.environ.get("KVSERVE_API_KEYS", "").replace(",", " ").split()
    return tuple(dict.fromkeys(keys))


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
    llm.close()  # a disk tier keeps this prompt's blocks for the next run
    return 0


def print_stats(llm, wall_s: float) -> None:
    out = llm.last_output
    m = out.metrics
    engine = llm.engine
    kv = engine.cache_snapshot()
    per_token = kv.bytes_per_token
    lines = [
        f"model: {engine.model_name} ({engine.config.dtype}, {engine.device}, "
        f"cache {kv.cache_mode}, KV {kv.kv_cache_dtype}), loaded in {engine.load_time_s:.2f} s",
        engine.model.weights_description(),
        f"prompt tokens: {out.num_prompt_tokens}, generated tokens: {len(out.token_ids)}, "
        f"finish: {out.finish_reason}",
        f"TTFT: {m.get('ttft_s', float('nan')) * 1e3:.1f} ms, "
        f"decode: {m.get('decode_tokens_per_s', float('nan')):.1f} tokens/s, "
        f"wall: {wall_s:.2f} s",
        f"KV cache: {per_token:,} bytes/token, "
        f"{(out.num_prompt_tokens + len(out.token_ids)) * per_token:,} bytes for "
        f"this sequence's tokens, {kv.num_bytes_allocated:,} bytes allocated",
    ]
    if kv.pool is not None:
        pool, blocks = kv.pool, int(m.get("num_blocks", 0))
        lines.append(
            f"this request: {blocks} blocks ({blocks * kv.bytes_per_block:,} bytes of "
            f"KV), preempted {int(m.get('num_preemptions', 0))} times")
        lines.append(
            f"KV pool: {pool.num_blocks:,} blocks of {pool.block_size} tokens, peak "
            f"{pool.peak_used_blocks:,} used ({pool.peak_used_blocks / pool.num_blocks:.2%}), "
            f"now {pool.num_used_blocks} used, preemptions: {kv.num_preemptions}, retention: "
            f"{kv.retention}")
    if kv.prefix is not None:
        p, e = kv.prefix, kv.events
        lines.append(
            f"prefix cache: {out.num_cached_tokens} of this prompt's tokens reused; "
            f"{p.num_hit_tokens:,} of {p.num_queried_tokens:,} queried tokens hit "
            f"({p.hit_rate:.1%}); blocks cached: {p.num_cached_blocks}, evicted: "
            f"{p.num_evictions}; block events: {e.num_stored} stored, {e.num_evicted} evicted, "
            f"{e.num_freed} freed")
    for t in kv.tiers:
        c = t.counters
        lines.append(
            f"{t.name} tier: {t.num_blocks:,} of {t.capacity_blocks:,} blocks held "
            f"({t.num_parked_blocks} parked by swap); hits {c.num_hit_blocks} blocks: fetched "
            f"{c.num_fetched_blocks} ({c.num_fetch_decisions} runs), recomputed "
            f"{c.num_recomputed_blocks} ({c.num_recompute_decisions} runs); stored "
            f"{c.num_stored_blocks}, evicted {c.num_evicted_blocks}; {c.num_bytes_in:,} bytes "
            f"in, {c.num_bytes_out:,} out; expected prefill time saved "
            f"{c.expected_saved_s * 1e3:.1f} ms; bandwidth now {t.bytes_per_s / 1e9:.2f} GB/s")
    if kv.quant_check is not None:
        q = kv.quant_check
        lines.append(
            f"quantized-KV check ({q.kv_cache_dtype} vs {q.reference} K/V, "
            f"{q.num_predictions} positions of calibration text): mean KL {q.mean_kl:.4f} nats, "
            f"top-1 agreement {q.top1_agreement:.1%}, perplexity {q.perplexity:.2f} vs "
            f"{q.perplexity_reference:.2f}")
    lines += [
        f"K/V projections computed: {engine.model.num_kv_projections:,}",
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
