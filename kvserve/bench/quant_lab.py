"""The quant lab: what each KV format costs and saves on a real model, side by side.

For each format: bytes per token read from the allocated pool, the requests of --budget-context
tokens that fit a --budget of KV memory, perplexity over --windows windows of --window-tokens
tokens of the shipped public-domain text (the tokens after the guardrail's calibration text), mean
KL divergence and top-1 agreement of the next-token distributions against float32 K/V, greedy
agreement over --new-tokens generated tokens on --prompts prompts, and decode tokens/s at each of
--contexts. Beside the formats, int8 and int4 with other scale granularities and block sizes
(built), and kvserve's first int8 (one scale per token per head, simulated: the values rounded as
it would, kept in float32), answer "per token or per channel?" by measurement.

Greedy agreement counts, per prompt, the generated tokens equal to float32's before the first
difference (after it the two texts have diverged and position-by-position matches mean nothing):
of the first 128 tokens (mean and worst prompt), and of all --new-tokens (mean). Forced
agreement feeds each format float32's own prompt + first 128 greedy tokens and counts the steps
where it ranks float32's token first: every step judged on the same context, so one near-tie does
not end the count (the figure behind "how often does the format change a decision"). Every engine
runs without prefix caching; each speed run checks that its prompt was computed, not found
cached.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from kvserve.bench.report import write_json_and_plots
from kvserve.cli_flags import add_setting_flags
from kvserve.config import QUANTIZED_DTYPES, parse_memory, residual_window
from kvserve.errors import ConfigError

DEFAULT_FORMATS = "float32,bfloat16,float16,fp8_e4m3,fp8_e5m2,int8,int4,int8/int4"


@dataclass
class FormatRow:
    label: str
    kv_cache_dtype: str
    simulated: bool = False
    bytes_per_token: int | None = None
    requests_in_budget: int | None = None
    perplexity: float | None = None
    perplexity_change: float | None = None  # relative to float32 K/V
    mean_kl: float | None = None
    top1_agreement: float | None = None
    greedy_agreement_128: float | None = None  # mean over prompts, of the first 128 tokens
    greedy_agreement_min_128: float | None = None  # the worst prompt's
    greedy_agreement_all: float | None = None  # mean, of all --new-tokens
    # of float32's first 128 greedy tokens, those this format also ranks first when fed
    # float32's text (teacher forcing: every step judged on the same context), mean per prompt
    forced_agreement_128: float | None = None
    decode_tokens_per_s: dict[int, float] = field(default_factory=dict)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_setting_flags(p, ("model", "dtype", "device", "block_size", "kv_cache_memory",
                          "kv_residual_tokens"))
    p.add_argument("--formats", default=DEFAULT_FORMATS,
                   help=f"KV formats, comma-separated, 'k/v' for K and V in two formats; "
                        f"float32 first is the reference (default {DEFAULT_FORMATS})")
    p.add_argument("--windows", type=int, default=16, help="perplexity windows (default 16)")
    p.add_argument("--window-tokens", type=int, default=1024,
                   help="tokens per perplexity window (default 1024)")
    p.add_argument("--prompts", type=int, default=10, help="greedy prompts (default 10)")
    p.add_argument("--prompt-tokens", type=int, default=1024,
                   help="tokens per greedy prompt (default 1024: more than the residual window, "
                        "so the generated tokens attend over quantized K/V)")
    p.add_argument("--new-tokens", type=int, default=256,
                   help="greedy tokens generated per prompt (default 256)")
    p.add_argument("--contexts", default="1024,4096,8192",
                   help="contexts of the decode-speed runs (default 1024,4096,8192)")
    p.add_argument("--decode-tokens", type=int, default=64,
                   help="tokens decoded per speed run (default 64)")
    p.add_argument("--budget", default="1GiB", help="KV memory for the requests-that-fit column")
    p.add_argument("--budget-context", type=int, default=4096,
                   help="tokens per request in the requests-that-fit column (default 4096)")
    p.add_argument("--no-alternatives", action="store_true",
                   help="skip the other scale granularities and block sizes (int8/int4 built; "
                        "kvserve's first int8, simulated)")
    p.add_argument("--out", default="kvserve-quant-lab", help="folder for the JSON and the plot")
    p.add_argument("--json", action="store_true", help="print the JSON summary as the last line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_arguments(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    from kvserve.config import BUILT_KV_CACHE_DTYPES, canonical_kv_dtype

    formats = ["/".join(dict.fromkeys(canonical_kv_dtype(x) for x in f.split("/")))
               for f in args.formats.split(",") if f.strip()]
    if not formats or formats[0] != "float32":
        raise ConfigError("--formats must start with float32 (the reference)")
    unbuilt = [f for f in formats if any(x not in BUILT_KV_CACHE_DTYPES for x in f.split("/"))]
    if unbuilt:
        raise ConfigError(f"--formats: {', '.join(unbuilt)} not built in the engine yet")
    if len(set(formats)) != len(formats):
        raise ConfigError(f"--formats lists a format twice: {args.formats}")
    try:
        contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"--contexts must be integers, got {args.contexts!r}") from None
    for name in ("windows", "window_tokens", "prompts", "prompt_tokens", "new_tokens",
                 "decode_tokens", "budget_context"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if args.window_tokens < 2 or any(c <= args.decode_tokens for c in contexts):
        raise ConfigError("--window-tokens must be at least 2 and each of --contexts more than "
                          "--decode-tokens")
    if not isinstance(parse_memory(args.budget), int):
        raise ConfigError(f"--budget must be a size (e.g. 1GiB), got {args.budget!r}")
    return formats, contexts


def corpus_slices(tokenizer, args) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """(perplexity windows, greedy prompts, every corpus token): windows after the guardrail's
    calibration text, prompts after the windows."""
    from kvserve.engine.kv_quality import CALIBRATION_TOKENS, corpus_text

    ids = tokenizer.encode(corpus_text())
    start = CALIBRATION_TOKENS
    need = start + args.windows * args.window_tokens + args.prompts * args.prompt_tokens
    if need > len(ids):
        raise ConfigError(f"the corpus has {len(ids):,} tokens with this tokenizer; "
                          f"{args.windows} windows of {args.window_tokens} and {args.prompts} "
                          f"prompts of {args.prompt_tokens} after the {start} calibration tokens "
                          f"need {need:,}: ask for fewer")
    w = args.window_tokens
    windows = [ids[start + i * w:start + (i + 1) * w] for i in range(args.windows)]
    p0 = start + args.windows * w
    prompts = [ids[p0 + i * args.prompt_tokens:p0 + (i + 1) * args.prompt_tokens]
               for i in range(args.prompts)]
    return windows, prompts, ids


def make_llm(args, kv_cache_dtype: str, max_model_len: int):
    from kvserve.engine.llm import LLM

    k, _, v = kv_cache_dtype.partition("/")
    quantized = any(x in QUANTIZED_DTYPES for x in (k, v))
    return LLM(model=args.model, dtype=args.dtype, device=args.device,
               block_size=args.block_size, kv_cache_dtype=k, v_cache_dtype=v or None,
               kv_residual_tokens=args.kv_residual_tokens if quantized else None,
               kv_cache_memory=args.kv_cache_memory, max_model_len=max_model_len,
               max_num_seqs=args.prompts,
               enable_prefix_caching=False, kv_quant_check="off")


def agreement(tokens: list[tuple[int, ...]], reference: list[tuple[int, ...]]) -> list[int]:
    """Per prompt: generated tokens equal to the reference's before the first difference."""
    out = []
    for got, want in zip(tokens, reference, strict=True):
        n = 0
        while n < min(len(got), len(want)) and got[n] == want[n]:
            n += 1
        out.append(n)
    return out


def decode_speed(llm, ids: list[int], context: int, decode_tokens: int) -> float:
    """Decode tokens/s of one sequence over the last decode_tokens positions of a `context`-token
    context (a prompt of corpus tokens, repeated if the corpus is shorter, then the decode); fails
    loudly if any of the prompt was found cached."""
    from kvserve.request import SamplingParams

    prompt = (ids * (context // len(ids) + 1))[:context - decode_tokens]  # decode up to context
    params = SamplingParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    if out.num_cached_tokens:
        raise RuntimeError(f"quant lab: the {context}-token speed prompt found "
                           f"{out.num_cached_tokens} tokens cached: not a cold run")
    return out.metrics["decode_tokens_per_s"]


def main(args: argparse.Namespace) -> int:
    formats, contexts = check_arguments(args)  # before torch loads: a bad flag fails at once
    from kvserve.engine.kv_quality import Variant, compare_many, scale_alternatives
    from kvserve.request import SamplingParams

    budget = parse_memory(args.budget)
    max_len = max(max(contexts), args.prompt_tokens + args.new_tokens)
    rows = {f: FormatRow(f, f) for f in formats}
    greedy_ref: list[tuple[int, ...]] = []
    bar = tqdm(total=len(formats) * (args.prompts * args.new_tokens // 16 + len(contexts)),
               unit="step", disable=args.no_progress, file=sys.stderr)
    t0 = time.perf_counter()
    for name in formats:
        bar.set_description(f"quant lab: {name}")
        llm = make_llm(args, name, max_len)
        if llm.engine.max_model_len < max_len:
            raise ConfigError(f"the model's context is {llm.engine.max_model_len:,} tokens: "
                              f"--contexts and --prompt-tokens + --new-tokens must fit in it")
        row = rows[name]
        snap = llm.engine.cache_snapshot()
        row.bytes_per_token = snap.bytes_per_token
        per_block = snap.bytes_per_block
        spec = llm.engine.spec
        # residual windows (quantized sides): one per sequence (max_num_seqs), float32
        store = llm.engine.runner.kv_store
        window = sum(r[:, 0].numel() * r.element_size() for r in store.residual if r is not None)
        extra = snap.num_bytes_allocated - snap.pool.num_blocks * per_block \
            - args.prompts * window
        if not 0 <= extra <= 8 * spec.num_layers:  # fp8's per-layer scales at most
            raise RuntimeError(f"quant lab: the {name} pool allocates {snap.num_bytes_allocated:,}"
                               f" bytes for {snap.pool.num_blocks} blocks of {per_block:,}")
        blocks_per_request = -(-args.budget_context // args.block_size)
        row.requests_in_budget = budget // (blocks_per_request * per_block + window)
        if name == formats[0]:
            windows, prompts, ids = corpus_slices(llm.tokenizer, args)
            model = llm.engine.model
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        tokens = [o.token_ids for o in outs]
        greedy_ref = greedy_ref or tokens
        agree = agreement(tokens, greedy_ref)
        first = [min(a, 128) for a in agree]
        row.greedy_agreement_128 = statistics.mean(first)
        row.greedy_agreement_min_128 = min(first)
        row.greedy_agreement_all = statistics.mean(agree)
        bar.update(args.prompts * args.new_tokens // 16)
        for context in contexts:
            row.decode_tokens_per_s[context] = decode_speed(llm, ids, context,
                                                            args.decode_tokens)
            bar.update(1)
        del llm
    variants = [Variant(f, f) for f in formats[1:]]
    window_tokens = residual_window(args.kv_residual_tokens, args.block_size)
    forced_len = min(128, args.new_tokens)
    forced = compare_many(model, [list(p) + list(t[:forced_len])
                                  for p, t in zip(prompts, greedy_ref)],
                          variants, block_size=args.block_size, skip=args.prompt_tokens - 1,
                          window_tokens=window_tokens)
    rows["float32"].forced_agreement_128 = float(forced_len)
    for v in variants:
        rows[v.label].forced_agreement_128 = forced[v.label].top1_agreement * forced_len
    if not args.no_alternatives:
        variants = variants + scale_alternatives(args.block_size, formats) + [
            Variant(f"{f} alt: no window", f, window_tokens=0)
            for f in formats[1:] if window_tokens and "/" not in f
            and f not in ("bfloat16", "float16")]
    bar.close()
    with tqdm(total=len(windows) * args.window_tokens, unit="pos", disable=args.no_progress,
              file=sys.stderr, desc="quant lab: perplexity and KL") as pbar:
        quality = compare_many(model, windows, variants, block_size=args.block_size,
                               progress=pbar.update, window_tokens=window_tokens)
    ref = next(iter(quality.values()))
    rows["float32"].perplexity = ref.perplexity_reference
    rows["float32"].perplexity_change, rows["float32"].mean_kl = 0.0, 0.0
    rows["float32"].top1_agreement = 1.0
    for v in variants:
        q = quality[v.label]
        # an alternative: built (another codec or block size of a format) or simulated
        row = rows.setdefault(v.label, FormatRow(v.label, v.kv_cache_dtype,
                                                 simulated=v.kv_cache_dtype == "float32"))
        row.perplexity, row.mean_kl, row.top1_agreement = q.perplexity, q.mean_kl, \
            q.top1_agreement
        row.perplexity_change = q.perplexity / q.perplexity_reference - 1
    result = {"lab": "quant", "model": args.model or "embedded SmolLM2-135M-Instruct",
              "dtype": args.dtype, "device": args.device, "block_size": args.block_size,
              "kv_residual_tokens": window_tokens,
              "perplexity_tokens": ref.num_predictions, "windows": args.windows,
              "window_tokens": args.window_tokens, "prompts": args.prompts,
              "new_tokens": args.new_tokens, "budget": args.budget,
              "budget_context": args.budget_context, "contexts": contexts,
              "wall_s": time.perf_counter() - t0, "rows": [asdict(r) for r in rows.values()]}
    files = write_files(result, Path(args.out))
    result["files"] = files
    print(summary(result))
    if args.json:
        print(json.dumps(result))
    return 0


def summary(result: dict) -> str:
    ctx, n_all = result["contexts"], result["new_tokens"]
    head = (f"{'KV format':<38} {'B/token':>8} {'fit':>5} {'ppl':>8} {'ppl +%':>7} "
            f"{'mean KL':>8} {'top-1':>6} {'greedy/128 (min)':>16} {'/' + str(n_all):>5} "
            f"{'forced/128':>10} "
            + " ".join(f"{'tok/s@' + str(c):>10}" for c in ctx))
    lines = [f"Quant lab: {result['model']} ({result['dtype']}, {result['device']}); perplexity "
             f"over {result['perplexity_tokens']:,} predictions ({result['windows']} windows of "
             f"{result['window_tokens']} tokens), greedy over {result['prompts']} prompts x "
             f"{result['new_tokens']} tokens; 'fit': requests of {result['budget_context']:,} "
             f"tokens in {result['budget']} of KV", "", head, "-" * len(head)]

    def cell(v, fmt):
        return format(v, fmt) if v is not None else "-"

    def speed(r, c):  # keys are ints in the run, strings once read back from the JSON
        tps = r["decode_tokens_per_s"]
        return tps.get(c, tps.get(str(c)))

    for r in result["rows"]:
        label = r["label"]
        change = None if r["perplexity_change"] is None else 100 * r["perplexity_change"]
        greedy = "-" if r["greedy_agreement_128"] is None else \
            f"{r['greedy_agreement_128']:.1f} ({r['greedy_agreement_min_128']})"
        lines.append(
            f"{label:<38} {cell(r['bytes_per_token'], ',d'):>8} "
            f"{cell(r['requests_in_budget'], 'd'):>5} {cell(r['perplexity'], '.3f'):>8} "
            f"{cell(change, '+.2f'):>7} {cell(r['mean_kl'], '.5f'):>8} "
            f"{cell(r['top1_agreement'], '.2%'):>6} "
            f"{greedy:>16} {cell(r['greedy_agreement_all'], '.0f'):>5} "
            f"{cell(r.get('forced_agreement_128'), '.1f'):>10} "
            + " ".join(f"{cell(speed(r, c), '.1f'):>10}" for c in ctx))
    files = result.get("files", {})
    lines.append("")
    lines += [f"{k}: {v}" for k, v in files.items()]
    return "\n".join(lines)


def write_files(result: dict, out: Path) -> dict[str, str]:
    return write_json_and_plots(result, out, "quant", {
        "memory_quality_png": ("quant_lab_memory_vs_quality.png", plot)})


def plot(result: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for r in result["rows"]:
        if r["bytes_per_token"] is None or r["perplexity_change"] is None:
            continue
        ax.scatter(r["bytes_per_token"], 100 * r["perplexity_change"], s=30)
        ax.annotate(r["label"], (r["bytes_per_token"], 100 * r["perplexity_change"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("KV bytes per token (pool)")
    ax.set_ylabel("perplexity change vs float32 K/V (%)")
    ax.set_title(f"KV memory vs quality: {result['model']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
