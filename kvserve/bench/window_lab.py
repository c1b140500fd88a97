"""The window lab: what attention sinks (StreamingLLM, --cache-policy sinks) keep and cost.

1. Memory: one sequence generates --gen-tokens tokens (default 20,000, past the model's context)
   under sinks; the KV bytes it holds are sampled after every step. Beside it, what the full cache
   would hold (bytes per token x tokens, up to the model's context, where a full-cache sequence
   must stop).
2. Quality: the first --text-tokens tokens of the shipped public-domain text (Moby-Dick) scored
   as one prompt (prompt log-probs, chunked prefill of --chunk-tokens): with the full cache over
   the part inside the model's context; with sinks + window over all of it; with the window alone
   (no sinks), as StreamingLLM's "window attention". Perplexity per --segment-tokens segment, and
   past the context.

Each run is cold (prefix caching off, checked) and checks its premise: the sinks runs release
blocks (the sequence never holds more than the sinks, the window and one step) and the full run
holds every block.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

from kvserve.bench.report import write_json_and_plots
from kvserve.cli_flags import add_setting_flags
from kvserve.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_setting_flags(p, ("model", "dtype", "device", "block_size", "kv_cache_memory"))
    p.add_argument("--sink-tokens", type=int, default=4,
                   help="attention sinks: leading tokens kept (default 4, StreamingLLM's)")
    p.add_argument("--window-tokens", type=int, default=1024,
                   help="recent tokens kept (default 1024)")
    p.add_argument("--gen-tokens", type=int, default=20000,
                   help="tokens generated in the memory run (default 20000)")
    p.add_argument("--text-tokens", type=int, default=24576,
                   help="tokens of the text scored (default 24576: three 8k contexts)")
    p.add_argument("--chunk-tokens", type=int, default=256,
                   help="prefill chunk of the scored text (default 256)")
    p.add_argument("--segment-tokens", type=int, default=1024,
                   help="perplexity reported per segment of this many tokens (default 1024)")
    p.add_argument("--skip-generate", action="store_true", help="quality runs only")
    p.add_argument("--out", default="kvserve-window-lab", help="folder for the JSON and plots")
    p.add_argument("--json", action="store_true", help="print the JSON summary as the last line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_arguments(args: argparse.Namespace) -> None:
    for name in ("window_tokens", "gen_tokens", "text_tokens", "chunk_tokens",
                 "segment_tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if args.sink_tokens < 1:
        raise ConfigError("--sink-tokens must be at least 1 (the window-only run has none)")


def make_llm(args, policy: str, sink_tokens: int = 4):
    from kvserve.engine.llm import LLM

    kw = {} if policy == "full" else dict(cache_policy="sinks", sink_tokens=sink_tokens,
                                          window_tokens=args.window_tokens)
    return LLM(model=args.model, dtype=args.dtype, device=args.device,
               block_size=args.block_size, kv_cache_memory=args.kv_cache_memory,
               max_num_batched_tokens=args.chunk_tokens, enable_prefix_caching=False,
               max_num_seqs=1, **kw)


def held_bound(llm) -> int:
    """Blocks a sinks sequence holds at most (the policy's bound), checked every step."""
    engine = llm.engine
    return engine.block_manager.most_blocks_held(engine.max_model_len,
                                                 engine.config.scheduler.max_num_batched_tokens)


def memory_run(args, bar) -> dict:
    """Generate --gen-tokens under sinks, sampling the sequence's KV bytes after each step."""
    from kvserve.engine.kv_quality import corpus_text
    from kvserve.request import SamplingParams

    llm = make_llm(args, "sinks", args.sink_tokens)
    engine = llm.engine
    manager = engine.block_manager
    prompt = llm.tokenizer.encode(corpus_text())[:256]
    params = SamplingParams(max_tokens=args.gen_tokens, temperature=0.8, top_p=0.95, seed=0,
                            ignore_eos=True)
    engine.add_request("gen", prompt, params)
    bytes_per_block = engine.kv_bytes_per_token * args.block_size
    bound = held_bound(llm)
    samples, most, t0 = [], 0, time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        r = engine.requests.get("gen")
        if r is None or r.status.finished:
            break
        held = manager.num_blocks_held("gen")
        most = max(most, held)
        if held > bound:
            raise RuntimeError(f"window lab: the sinks sequence holds {held} blocks, over its "
                               f"bound of {bound}")
        samples.append((r.num_tokens, held * bytes_per_block))
        bar.update(1)
    out = engine.pop_finished("gen")
    generated = len(out.output_token_ids)
    if generated != args.gen_tokens:
        raise RuntimeError(f"window lab: generated {generated} of {args.gen_tokens} tokens")
    context = engine.spec.max_position_embeddings
    step = max(1, len(samples) // 400)
    return {"tokens": [t for t, _ in samples[::step]], "kv_bytes": [b for _, b in samples[::step]],
            "generated": generated, "prompt_tokens": len(prompt), "peak_blocks": most,
            "block_bound": bound, "kv_bytes_per_token": engine.kv_bytes_per_token,
            "bytes_per_block": bytes_per_block, "peak_kv_bytes": most * bytes_per_block,
            "full_cache_bytes_at_context": context * engine.kv_bytes_per_token,
            "full_cache_bytes_at_end": (len(prompt) + generated) * engine.kv_bytes_per_token,
            "tokens_per_s": generated / (time.perf_counter() - t0),
            "text_tail": llm.tokenizer.decode(list(out.output_token_ids[-60:]))}


def score(args, policy: str, ids: list[int], sink_tokens: int = 4) -> dict:
    """Prompt log-probs of `ids` as one cold prompt: the log-prob of each token after the first,
    and the most blocks the sequence held."""
    from kvserve.request import SamplingParams

    llm = make_llm(args, policy, sink_tokens)
    engine = llm.engine
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    engine.add_request("text", ids, params)
    while engine.has_unfinished_requests():
        engine.step()
    most = engine.peak_blocks_used  # the pool's peak: this one sequence's, its last step too
    out = engine.pop_finished("text")
    if out.num_cached_tokens:
        raise RuntimeError(f"window lab: {policy} found {out.num_cached_tokens} tokens cached")
    logprobs = [lp for lp, _ in out.prompt_logprobs[1:]]
    if len(logprobs) != len(ids) - 1:
        raise RuntimeError(f"window lab: {len(logprobs)} log-probs for {len(ids)} tokens")
    blocks = -(-len(ids) // args.block_size)
    if policy == "full" and most < blocks:
        raise RuntimeError(f"window lab: the full cache held {most} of {blocks} blocks")
    if policy != "full" and most > held_bound(llm):
        raise RuntimeError(f"window lab: the {policy} run held {most} blocks")
    return {"logprobs": logprobs, "peak_blocks": most}


def perplexity(logprobs: list[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs)) if logprobs else float("nan")


def segments(logprobs: list[float], size: int) -> list[float]:
    """Perplexity of each run of `size` predictions (prediction i scores token i + 1)."""
    return [perplexity(logprobs[i:i + size]) for i in range(0, len(logprobs), size)]


def main(args: argparse.Namespace) -> int:
    check_arguments(args)
    from kvserve.engine.kv_quality import corpus_text
    from kvserve.engine.llm import LLM

    t0 = time.perf_counter()
    probe = LLM(model=args.model, dtype=args.dtype, device=args.device, cache_mode="none")
    context = probe.engine.spec.max_position_embeddings
    ids = probe.tokenizer.encode(corpus_text())
    del probe
    if len(ids) < args.text_tokens:
        raise ConfigError(f"the text has {len(ids):,} tokens with this tokenizer; "
                          f"--text-tokens {args.text_tokens:,} is more")
    ids = ids[:args.text_tokens]
    inside = ids[:min(context - 1, len(ids))]  # and the one token generated after it
    steps = (0 if args.skip_generate else args.gen_tokens) + 3
    with tqdm(total=steps, unit="step", disable=args.no_progress, file=sys.stderr,
              desc="window lab") as bar:
        memory = None if args.skip_generate else memory_run(args, bar)
        runs = {}
        for label, policy, sinks, text in (("full cache", "full", 4, inside),
                                           ("sinks + window", "sinks", args.sink_tokens, ids),
                                           ("window only", "sinks", 0, ids)):
            bar.set_description(f"window lab: {label}")
            runs[label] = score(args, policy, text, sinks)
            bar.update(1)
    full = runs["full cache"]["logprobs"]
    n_in = len(full)  # predictions inside the context: tokens 1 .. context - 1
    quality = {}
    for label, run in runs.items():
        lp = run["logprobs"]
        quality[label] = {
            "perplexity_inside_context": perplexity(lp[:n_in]),
            "perplexity_all": perplexity(lp),
            "perplexity_past_context": perplexity(lp[n_in:]) if len(lp) > n_in else None,
            "segments": segments(lp, args.segment_tokens),
            "peak_blocks": run["peak_blocks"],
            "scored_tokens": len(lp)}
    ref = quality["full cache"]["perplexity_inside_context"]
    for q in quality.values():
        past = q["perplexity_past_context"]
        q["past_context_vs_full_inside"] = None if past is None else past / ref - 1
    result = {"lab": "window", "model": args.model or "embedded SmolLM2-135M-Instruct",
              "dtype": args.dtype, "device": args.device, "block_size": args.block_size,
              "context": context, "sink_tokens": args.sink_tokens,
              "window_tokens": args.window_tokens, "chunk_tokens": args.chunk_tokens,
              "text_tokens": len(ids), "segment_tokens": args.segment_tokens,
              "memory": memory, "quality": quality, "wall_s": time.perf_counter() - t0}
    result["files"] = write_json_and_plots(result, Path(args.out), "window", {
        "memory_png": ("window_lab_kv_bytes.png", plot_memory),
        "perplexity_png": ("window_lab_perplexity.png", plot_perplexity)})
    print(summary(result))
    if args.json:
        print(json.dumps(result))
    return 0


def summary(result: dict) -> str:
    lines = [f"Window lab: {result['model']} ({result['dtype']}, {result['device']}); context "
             f"{result['context']:,}; sinks {result['sink_tokens']}, window "
             f"{result['window_tokens']:,}, block {result['block_size']}"]
    m = result["memory"]
    if m is not None:
        lines.append(
            f"memory: {m['generated']:,} tokens generated at {m['tokens_per_s']:.1f} tok/s; "
            f"KV held at most {m['peak_kv_bytes'] / 2**20:.2f} MiB ({m['peak_blocks']} blocks, "
            f"bound {m['block_bound']}); a full cache would hold "
            f"{m['full_cache_bytes_at_end'] / 2**20:.1f} MiB (and stop at the context: "
            f"{m['full_cache_bytes_at_context'] / 2**20:.1f} MiB)")
    lines.append(f"quality: {result['text_tokens']:,} tokens of Moby-Dick, prefill chunks of "
                 f"{result['chunk_tokens']}")
    head = (f"  {'cache':<16} {'ppl inside ctx':>14} {'ppl past ctx':>13} {'vs full':>8} "
            f"{'ppl all':>9} {'peak blocks':>11}")
    lines += [head, "  " + "-" * (len(head) - 2)]
    for label, q in result["quality"].items():
        past = q["perplexity_past_context"]
        vs = q["past_context_vs_full_inside"]
        lines.append(f"  {label:<16} {q['perplexity_inside_context']:>14.3f} "
                     f"{'-' if past is None else format(past, '.3f'):>13} "
                     f"{'-' if vs is None else format(100 * vs, '+.1f') + '%':>8} "
                     f"{q['perplexity_all']:>9.3f} {q['peak_blocks']:>11}")
    lines.append("")
    lines += [f"{k}: {v}" for k, v in result.get("files", {}).items()]
    return "\n".join(lines)


def plot_memory(result: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    m = result["memory"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    if m is not None:
        mib = 2 ** 20
        ax.plot(m["tokens"], [b / mib for b in m["kv_bytes"]],
                label=f"sinks {result['sink_tokens']} + window {result['window_tokens']}")
        ctx = result["context"]
        ax.plot([0, ctx], [0, ctx * m["kv_bytes_per_token"] / mib], "--",
                label=f"full cache (bytes/token x tokens; stops at the {ctx:,}-token context)")
        ax.axvline(ctx, color="grey", lw=0.8)
    ax.set_xlabel("tokens in the sequence")
    ax.set_ylabel("KV held by the sequence (MiB)")
    ax.set_title(f"KV memory during a long generation: {result['model']}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_perplexity(result: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    size = result["segment_tokens"]
    for label, q in result["quality"].items():
        xs = [(i + 1) * size for i in range(len(q["segments"]))]
        ax.plot(xs, q["segments"], marker=".", label=label)
    ax.axvline(result["context"], color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("position in the text (tokens)")
    ax.set_ylabel(f"perplexity per {size} tokens")
    ax.set_title(f"Scoring past the context ({result['context']:,}): {result['model']}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
