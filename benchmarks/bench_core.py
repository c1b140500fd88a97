"""Single-stream decode and prefill of kvserve beside Hugging Face transformers on the same
weights (the embedded SmolLM2-135M-Instruct GGUF), with the memory read bandwidth as the limit.

Prints a table for people and one JSON line last. It measures; it leaves interpreting to the reader.
Both engines get the same token ids (encoded once by kvserve's tokenizer): tokenizers play no
part.

Methods:
  decode  = (N - 1) / (time of last token - time of first token), greedy, ignore EOS.
            kvserve: out.metrics["decode_tokens_per_s"] (same definition, engine clocks).
            transformers: a streamer object records when generate() hands over each new token;
            eos_token_id=None makes it run exactly N tokens without touching the logits
            (min_new_tokens would mask EOS and change greedy choices; ignore_eos does not).
  prefill = prompt tokens / time to first token, cold: every run (warm-up included) gets a
            prompt no run has seen before (a different window of the same text, so its first
            block differs and the default engine's prefix cache can match nothing), and kvserve
            checks out.num_cached_tokens == 0 on each, failing loudly otherwise.
            kvserve: max_tokens=1, out.metrics["ttft_s"].
            transformers: one forward, model(ids, logits_to_keep=1), timed with perf_counter.
  limit   = max(bandwidth before, bandwidth after) / weight bytes read per decode token.
Each measurement: one warm-up run, then the median of --repeats runs; a measurement whose warm-up
takes longer than --max-run-s gets one timed run (reported as repeats in the JSON line).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import statistics
import sys
import time

import torch

from kvserve import LLM, SamplingParams
from kvserve.kernels.cpu import read_bandwidth_bytes_per_s
from kvserve.model.loader import default_model_path

SEED = 0
# 20 tokens; a plain continuation, so neither engine's first greedy token is end-of-turn.
DECODE_PROMPT = ("The old lighthouse keeper climbed the spiral stairs at dusk, and when he reached "
                 "the lamp room he saw")
PREFILL_TEXTS = [
    "The history of cartography reaches back to clay tablets from Babylon, on which surveyors "
    "scratched rivers, fields and the walls of cities. ",
    "def merge(a, b):\n    out = []\n    while a and b:\n"
    "        out.append(a.pop(0) if a[0] < b[0] "
    "else b.pop(0))\n    return out + a + b\n",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen; chlorophyll "
    "absorbs red and blue light and reflects green. ",
    "Q: How many legs does a spider have? A: Eight. Q: And an insect? A: Six, in three pairs, "
    "attached to the thorax. ",
    "Le marché ouvre à sept heures; les pêcheurs arrivent avec des caisses de sardines, de "
    "maquereaux et de crevettes grises. ",
    "In 1969 the Apollo 11 lunar module landed in the Sea of Tranquility with about 25 seconds "
    "of fuel to spare, 2.5 km from its planned site. ",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-tokens", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-run-s", type=float, default=120.0,
                   help="a warm-up longer than this leaves one timed run instead of --repeats")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    p.add_argument("--skip-hf", action="store_true", help="measure kvserve only")
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens, args.prefill_tokens, args.repeats = 8, 64, 1
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    return args


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def bandwidth_gbps(quick: bool) -> float:
    num_bytes = (256 << 20) if quick else (1 << 30)
    return read_bandwidth_bytes_per_s(num_bytes, repeats=2 if quick else 5) / 1e9


def log(message: str) -> None:
    """Progress on stderr, so stdout stays the table and the JSON line."""
    print(message, file=sys.stderr, flush=True)


def timed_runs(run, repeats: int, max_run_s: float) -> tuple[list, int]:
    """Warm up once, then `repeats` runs (1 if the warm-up exceeded max_run_s).
    `run()` returns (value, result); returns the values' list and the runs made."""
    t0 = time.perf_counter()
    run()
    n = 1 if time.perf_counter() - t0 > max_run_s else repeats
    return [run() for _ in range(n)], n


def summarize(samples: list, n: int) -> tuple[float, int, object]:
    values = [v for v, _ in samples]
    return statistics.median(values), n, samples[-1][1]


# -- kvserve ----------------------------------------------------------------------------------
def load_kvserve(dtype: str) -> LLM:
    # weights dequantized to `dtype`, as transformers holds them (bench_native.py measures the
    # default path, which multiplies the GGUF's blocks as stored)
    return LLM(dtype=dtype, seed=SEED, quantization="none")


def check_cold(num_cached_tokens: int, what: str) -> None:
    if num_cached_tokens:
        raise SystemExit(f"bench_core: {what}: {num_cached_tokens} prompt tokens came from the "
                         "prefix cache; this is not a cold prefill")


def bench_kvserve(llm: LLM, decode_ids: list[int], prefill_ids: list[list[int]], args) -> dict:
    decode_params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    prefill_params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

    def decode():
        out = llm.generate({"prompt_token_ids": decode_ids}, decode_params, use_tqdm=False)[0]
        return out.metrics["decode_tokens_per_s"], list(out.outputs[0].token_ids)

    fresh = iter(prefill_ids)

    def prefill():
        ids = next(fresh)
        before = llm.engine.model.num_kv_projections
        out = llm.generate({"prompt_token_ids": ids}, prefill_params, use_tqdm=False)[0]
        computed = (llm.engine.model.num_kv_projections - before) // llm.engine.spec.num_layers
        check_cold(out.num_cached_tokens, "kvserve prefill")
        if computed != len(ids):  # every prompt token's K/V computed, once
            raise SystemExit(f"bench_core: kvserve prefill computed K/V for {computed} tokens "
                             f"of a {len(ids)}-token prompt")
        return len(ids) / out.metrics["ttft_s"], None

    decode_tps, decode_n, tokens = summarize(*timed_runs(decode, args.repeats, args.max_run_s))
    prefill_tps, prefill_n, _ = summarize(*timed_runs(prefill, args.repeats, args.max_run_s))
    weight_bytes = llm.engine.model.num_weight_bytes_per_token()
    return {"decode_tps": decode_tps, "decode_repeats": decode_n, "prefill_tps": prefill_tps,
            "prefill_repeats": prefill_n, "weight_bytes_per_token": weight_bytes,
            "tokens": tokens}


# -- transformers -----------------------------------------------------------------------------
class TokenClock:
    """A generate() streamer that records when each new token is handed over (the first put()
    is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value) -> None:
        if self._seen_prompt:
            self.times.append(time.perf_counter())
        self._seen_prompt = True

    def end(self) -> None:
        pass


def load_hf(dtype: str):
    """Plain nn.Linear weights, dequantized to `dtype`. transformers' warning that GGUF weights
    "stay quantized" is not what 5.23 does here (checked: bf16/fp32 Linear), so it is silenced."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    path = default_model_path()
    # Its GGUF reader draws a tqdm bar that no transformers setting turns off.
    with contextlib.redirect_stderr(io.StringIO()):
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=getattr(torch, dtype))
    return model.eval()


def bench_hf(model, decode_ids: list[int], prefill_ids: list[list[int]], args) -> dict:
    n = args.new_tokens
    ids = torch.tensor([decode_ids])
    fresh = iter(prefill_ids)
    pad = model.generation_config.eos_token_id
    pad = pad[0] if isinstance(pad, list) else pad

    def decode():
        clock = TokenClock()
        torch.manual_seed(SEED)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 do_sample=False, eos_token_id=None, pad_token_id=pad,
                                 streamer=clock)
        assert len(clock.times) == n, f"transformers made {len(clock.times)} tokens, not {n}"
        tps = (n - 1) / (clock.times[-1] - clock.times[0]) if n > 1 else float("nan")
        return tps, out[0, ids.shape[1]:].tolist()

    def prefill():
        long_ids = torch.tensor([next(fresh)])
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(long_ids, logits_to_keep=1)
            return long_ids.shape[1] / (time.perf_counter() - t0), None

    decode_tps, decode_n, tokens = summarize(*timed_runs(decode, args.repeats, args.max_run_s))
    prefill_tps, prefill_n, _ = summarize(*timed_runs(prefill, args.repeats, args.max_run_s))
    return {"decode_tps": decode_tps, "decode_repeats": decode_n, "prefill_tps": prefill_tps,
            "prefill_repeats": prefill_n, "tokens": tokens}


def load_and_bench(load, bench, dtype: str, *inputs) -> dict:
    """One engine at a time: load, measure, free before the next one loads."""
    log(f"{dtype}: {load.__name__} and measure ...")
    model = load(dtype)
    result = bench(model, *inputs)
    log(f"{dtype}: decode {result['decode_tps']:.1f} tok/s, prefill {result['prefill_tps']:.1f} "
        "tok/s")
    del model
    gc.collect()
    return result


# -- inputs, results, report ------------------------------------------------------------------
def build_inputs(num_prefill_tokens: int, num_prompts: int) -> tuple[list[int], list[list[int]]]:
    """Token ids of the decode prompt, and num_prompts different prompts of exactly
    num_prefill_tokens of varied text (windows of one stream, 37 tokens apart: their first
    blocks differ, so no run can reuse another's cached blocks)."""
    from kvserve.model.loader import load_checkpoint

    tokenizer = load_checkpoint(None).tokenizer
    decode_ids = tokenizer.encode(DECODE_PROMPT)
    prefill_ids: list[int] = []
    i = 0
    stride = 37
    while len(prefill_ids) < num_prefill_tokens + stride * num_prompts:
        # Rotate the order each round so the long prompt does not repeat with a short period.
        k = i % len(PREFILL_TEXTS)
        prefill_ids += tokenizer.encode("".join(PREFILL_TEXTS[k:] + PREFILL_TEXTS[:k]),
                                        add_special_tokens=(i == 0))
        i += 1
    # the special tokens encode() puts first (BOS, if the model has one) start every prompt
    special = prefill_ids[:len(tokenizer.encode("x")) - len(tokenizer.encode(
        "x", add_special_tokens=False))]
    body = prefill_ids[len(special):]
    width = num_prefill_tokens - len(special)
    prompts = [special + body[i * stride:i * stride + width] for i in range(num_prompts)]
    assert len({tuple(p[:16]) for p in prompts}) == num_prompts, "prompts must start apart"
    return decode_ids, prompts


def leading_agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def finish(results: dict, bw_gbps: list[float]) -> None:
    """Add bandwidth fractions and ratios in place; drop the token lists."""
    limit_bps = max(bw_gbps) * 1e9
    for r in results.values():
        kv, hf = r["kvserve"], r.get("transformers")
        weight_bytes = kv["weight_bytes_per_token"]
        r["bw_limit_tps"] = limit_bps / weight_bytes
        for eng in (kv, hf) if hf else (kv,):
            eng["frac_of_bw_limit"] = eng["decode_tps"] / r["bw_limit_tps"]
        if hf:
            r["ratio_decode"] = kv["decode_tps"] / hf["decode_tps"]
            r["ratio_prefill"] = kv["prefill_tps"] / hf["prefill_tps"]
            r["greedy_agreement"] = leading_agreement(kv["tokens"], hf["tokens"])
            r["greedy_tokens"] = len(kv["tokens"])
            hf.pop("tokens")
        kv.pop("tokens")


def print_table(results: dict, bw_gbps: list[float], args) -> None:
    print(f"\nmemory read bandwidth: {bw_gbps[0]:.1f} GB/s before, {bw_gbps[1]:.1f} GB/s after "
          f"(limit uses {max(bw_gbps):.1f})")
    print(f"decode: {args.new_tokens} new tokens, greedy; prefill: {args.prefill_tokens} tokens; "
          f"median of up to {args.repeats} runs after one warm-up\n")
    head = (f"{'dtype':<9} {'engine':<13} {'decode tok/s':>12} {'% of bw limit':>13} "
            f"{'prefill tok/s':>13} {'runs d/p':>8}")
    print(head)
    print("-" * len(head))
    for dtype, r in results.items():
        for name in ("kvserve", "transformers"):
            e = r.get(name)
            if e is None:
                continue
            print(f"{dtype:<9} {name:<13} {e['decode_tps']:>12.1f} "
                  f"{100 * e['frac_of_bw_limit']:>12.1f}% {e['prefill_tps']:>13.1f} "
                  f"{e['decode_repeats']:>4}/{e['prefill_repeats']:<3}")
        if "ratio_decode" in r:
            print(f"{dtype:<9} {'kvserve/hf':<13} {r['ratio_decode']:>11.2f}x {'':>13} "
                  f"{r['ratio_prefill']:>12.2f}x")
            print(f"{dtype:<9} {'greedy agree':<13} {r['greedy_agreement']:>6}/{r['greedy_tokens']}"
                  f" leading tokens equal")
        print(f"{dtype:<9} {'bw limit':<13} {r['bw_limit_tps']:>12.1f} "
              f"({r['kvserve']['weight_bytes_per_token'] / 1e6:.0f} MB of weights per token)")
        print()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(SEED)
    torch.set_num_threads(torch.get_num_threads())  # the machine default, pinned for the run
    machine = machine_info()
    # one prompt per prefill run of each engine and dtype: a warm-up plus the repeats
    decode_ids, prefill_ids = build_inputs(args.prefill_tokens, args.repeats + 1)
    bw_gbps = [bandwidth_gbps(args.quick)]
    results: dict = {}
    for dtype in args.dtypes:
        inputs = (decode_ids, prefill_ids, args)
        r = results[dtype] = {"kvserve": load_and_bench(load_kvserve, bench_kvserve, dtype,
                                                        *inputs)}
        if not args.skip_hf:
            r["transformers"] = load_and_bench(load_hf, bench_hf, dtype, *inputs)
    bw_gbps.append(bandwidth_gbps(args.quick))
    finish(results, bw_gbps)
    print_table(results, bw_gbps, args)
    print(json.dumps({
        "bench": "core", "machine": machine, "bandwidth_gbps": [round(b, 2) for b in bw_gbps],
        "config": {"new_tokens": args.new_tokens, "prefill_tokens": args.prefill_tokens,
                   "decode_prompt_tokens": len(decode_ids), "repeats": args.repeats,
                   "quick": args.quick, "seed": SEED},
        "results": results}))


if __name__ == "__main__":
    main()
