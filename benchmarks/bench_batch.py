"""Batched generation of kvserve beside Hugging Face transformers, KV waste and concurrency in a
fixed KV budget, on the embedded SmolLM2-135M-Instruct GGUF.

Prints a table for people and one JSON line last. Both engines get the same token ids (prompts of
seeded random lengths, cut from varied text encoded once by kvserve's tokenizer).

Methods:
  Prefix caching is off in every kvserve engine here, and each run checks that no prompt token
  came from a cache (num_cached_tokens == 0): repeats of one batch on one engine, and prompts that
  happen to share a first block, must not turn a throughput or waste figure into cache hits.
  (a) throughput = C * new_tokens / wall time of one call generating C prompts at once, greedy,
      EOS ignored. kvserve: LLM(max_num_seqs=C, paged, default memory).generate(...).
      transformers: one batched generate(), left-padded with attention_mask, eos_token_id=None so
      every row makes exactly new_tokens. One small warm-up, then the median of --repeats.
  (b) KV waste over the --requests mix, engine driven step by step: paged waste = allocated slots
      holding no token / allocated slots (the cache snapshot after every step), average and peak;
      contiguous (computed) = running requests * reserve_len slots reserved vs tokens held.
  (c) concurrency in --budget bytes of KV: paged = len(scheduler.running) after every step of
      LLM(kv_cache_memory=budget, max_num_seqs=requests, max_model_len=reserve_len), max and mean;
      contiguous (computed) = floor(budget / (reserve_len * kv bytes per token)).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import statistics
import time

import torch
from bench_core import load_hf, log, machine_info

from kvserve import LLM, SamplingParams
from kvserve.config import parse_memory

SEED = 0
SENTENCES = [
    "The old lighthouse keeper climbed the spiral stairs at dusk to light the lamp.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "In 1969 the Apollo 11 lunar module landed in the Sea of Tranquility.",
    "def merge(a, b):\n    return sorted(a + b)\n",
    "Le marché ouvre à sept heures; les pêcheurs arrivent avec des caisses de sardines.",
    "A spider has eight legs, while an insect has six, attached to the thorax.",
    "The treaty was signed in a small town on the river, far from either capital.",
    "SELECT name, count(*) FROM orders GROUP BY name HAVING count(*) > 10;",
    "Rain fell for three days, and the village square became a shallow lake.",
    "Bach wrote the Goldberg Variations for a harpsichord with two manuals.",
    "Prime numbers thin out slowly: about one in every ln(n) numbers near n is prime.",
    "She packed a map, a compass, two apples and a notebook full of questions.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", default="100,300", help="min,max prompt tokens (uniform)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per measurement (default 3, 1 for C >= 32)")
    p.add_argument("--skip-hf-above", type=int, default=None, help="no transformers above this C")
    p.add_argument("--requests", type=int, default=64, help="request mix of (b) and (c)")
    p.add_argument("--reserve-len", type=int, default=2048,
                   help="tokens a contiguous cache reserves per request (its max_model_len)")
    p.add_argument("--budget", default="256MiB", help="KV memory for (c); >= reserve_len tokens")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.new_tokens, args.prompt_len, args.requests = "1,4", 8, "16,48", 8
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.prompt_len = tuple(int(x) for x in args.prompt_len.split(","))
    return args


def build_prompts(tokenizer, n: int, lo: int, hi: int) -> list[list[int]]:
    """n prompts of uniform random length in [lo, hi], each from its own shuffle of SENTENCES."""
    rng = random.Random(SEED)
    prompts = []
    for _ in range(n):
        length, ids = rng.randint(lo, hi), []
        while len(ids) < length:
            order = rng.sample(SENTENCES, len(SENTENCES))
            ids += tokenizer.encode(" ".join(order) + " ", add_special_tokens=not ids)
        prompts.append(ids[:length])
    return prompts


def timed(run, repeats: int) -> dict:
    """Median wall seconds of `repeats` runs of run(), each run's seconds, the last run's tokens."""
    walls, tokens = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = run()
        walls.append(time.perf_counter() - t0)
    return {"wall_s": statistics.median(walls), "walls_s": walls, "repeats": repeats,
            "tokens": tokens}


def check_cold(llm: LLM, prompts: list[list[int]], new_tokens: int, num_cached: list[int],
               projections_before: int, what: str) -> None:
    """The premise of every kvserve column: no prefix cache, no prompt token reused, and the
    model computed K/V for every prompt token and every generated token but the last, exactly
    once (a run that reused anything, or recomputed after preemption, shows here)."""
    engine = llm.engine
    num_layers = engine.spec.num_layers
    expected = (sum(len(p) for p in prompts) + len(prompts) * (new_tokens - 1)) * num_layers
    computed = engine.model.num_kv_projections - projections_before
    preempted = engine.cache_snapshot().num_preemptions > 0  # recompute costs extra, not less
    if engine.cache_snapshot().prefix is not None or any(num_cached) or computed < expected or (
            computed != expected and not preempted):
        raise SystemExit(f"bench_batch: {what}: {sum(num_cached)} prompt tokens from a cache, "
                         f"{computed:,} K/V projections computed vs {expected:,} for a cold run; "
                         "the figure would not measure what it says")


def bench_kvserve(prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    llm = LLM(dtype="float32", max_num_seqs=len(prompts), seed=SEED,
              enable_prefix_caching=False)
    items = [{"prompt_token_ids": ids} for ids in prompts]

    def run(batch=items, n=new_tokens):
        before = llm.engine.model.num_kv_projections
        outs = llm.generate(batch, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                            use_tqdm=False)
        check_cold(llm, [b["prompt_token_ids"] for b in batch], n,
                   [o.num_cached_tokens for o in outs], before,
                   f"throughput, {len(batch)} prompts")
        return [list(o.outputs[0].token_ids) for o in outs]

    run(items[:4], min(new_tokens, 4))  # warm-up
    return {**timed(run, repeats), "preemptions": llm.engine.cache_snapshot().num_preemptions,
            "matmul_flops": matmul_flops(llm.engine.model, prompts, new_tokens)}


def matmul_flops(model, prompts: list[list[int]], new_tokens: int) -> float:
    """Weight-matmul FLOPs any engine must spend on this mix (attention left out): every prompt
    token through every layer, one LM-head row per sampled token."""
    # shapes, not tensors: matrices may be kept in GGUF blocks (QuantWeight)
    layer = 2 * sum(math.prod(x.shape) for lw in model.layers for x in vars(lw).values()
                    if x is not None and len(x.shape) == 2)  # optional parts may be None
    head = 2 * math.prod(model.lm_head.shape)
    tokens = sum(len(p) for p in prompts) + len(prompts) * (new_tokens - 1)
    return tokens * layer + len(prompts) * new_tokens * head


def matmul_peak_flops(repeats: int = 5) -> float:
    """Best float32 GEMM rate of this machine through torch, on a prefill-sized product."""
    a, b = torch.randn(1024, 576), torch.randn(576, 1536)
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / best


def bench_hf(model, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    pad = model.generation_config.eos_token_id
    pad = pad[0] if isinstance(pad, list) else pad
    model.generation_config.pad_token_id = pad
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run(ids=ids, mask=mask, n=new_tokens):
        torch.manual_seed(SEED)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                 eos_token_id=None, pad_token_id=pad)
        assert out.shape[1] - ids.shape[1] == n, f"transformers made {out.shape[1] - width} tokens"
        return out[:, ids.shape[1]:].tolist()

    run(ids[:4], mask[:4], min(new_tokens, 4))  # warm-up
    return timed(run, repeats)


def leading_agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def drive(llm: LLM, prompts: list[list[int]], new_tokens: int) -> tuple[list[dict], object]:
    """Run the prompts through llm's engine one step at a time; the cache snapshot's waste and
    the running count after every step that leaves KV allocated; the last snapshot."""
    eng, params = llm.engine, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    before = eng.model.num_kv_projections
    ids = [f"drive-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        eng.add_request(rid, p, params)
    samples = []
    while eng.has_unfinished_requests():
        eng.step()
        kv = eng.cache_snapshot()
        if kv.num_bytes_used:
            samples.append({"running": len(eng.scheduler.running),
                            "tokens_held": kv.num_tokens_stored,
                            "waste_fraction": kv.waste_fraction,
                            "waste_bytes": kv.num_waste_bytes})
    check_cold(llm, prompts, new_tokens,
               [eng.pop_finished(rid).num_cached_tokens or 0 for rid in ids], before,
               "step-by-step run")
    return samples, eng.cache_snapshot()


def bench_waste(prompts, new_tokens: int, reserve_len: int) -> dict:
    llm = LLM(dtype="float32", max_num_seqs=len(prompts), seed=SEED,
              enable_prefix_caching=False)
    samples, final = drive(llm, prompts, new_tokens)
    bpt = final.bytes_per_token
    reserved = [s["running"] * reserve_len * bpt for s in samples]
    held = [s["tokens_held"] * bpt for s in samples]
    contig_frac = [1 - h / r for h, r in zip(held, reserved) if r]
    contig_bytes = [r - h for h, r in zip(held, reserved)]
    series = {"paged": ([s["waste_fraction"] for s in samples],
                        [s["waste_bytes"] for s in samples]),
              "contig": (contig_frac, contig_bytes)}
    out = {"steps": len(samples), "kv_bytes_per_token": bpt, "block_size": final.pool.block_size,
           "preemptions": final.num_preemptions}
    for name, (frac, nbytes) in series.items():
        out.update({f"{name}_waste_frac_avg": statistics.mean(frac),
                    f"{name}_waste_frac_peak": max(frac),
                    f"{name}_waste_bytes_avg": statistics.mean(nbytes),
                    f"{name}_waste_bytes_peak": max(nbytes)})
    return out


def bench_budget(prompts, new_tokens: int, reserve_len: int, budget: int) -> dict:
    llm = LLM(dtype="float32", kv_cache_memory=budget, max_num_seqs=len(prompts),
              max_model_len=reserve_len, seed=SEED, enable_prefix_caching=False)
    samples, final = drive(llm, prompts, new_tokens)
    running = [s["running"] for s in samples]
    contig = budget // (reserve_len * final.bytes_per_token)
    return {"budget_bytes": budget, "num_blocks": final.pool.num_blocks,
            "paged_max_running": max(running), "paged_mean_running": statistics.mean(running),
            "preemptions": final.num_preemptions, "contig_running": contig,
            "ratio_max": max(running) / contig if contig else None,  # None: 0 fit contiguously
            "ratio_mean": statistics.mean(running) / contig if contig else None}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(SEED)
    torch.set_num_threads(torch.get_num_threads())  # the machine default, pinned for the run
    from kvserve.model.loader import load_checkpoint
    tokenizer = load_checkpoint(None).tokenizer
    n_prompts = max(args.requests, *args.concurrency)
    prompts = build_prompts(tokenizer, n_prompts, *args.prompt_len)
    hf_model = None
    throughput = {}
    peak_before = matmul_peak_flops()
    for c in args.concurrency:
        batch, repeats = prompts[:c], args.repeats or (1 if c >= 32 else 3)
        log(f"(a) C={c}: kvserve ...")
        kv = bench_kvserve(batch, args.new_tokens, repeats)
        gc.collect()
        r = throughput[c] = {"kvserve": kv}
        kv["tokens_per_s"] = c * args.new_tokens / kv["wall_s"]
        if args.skip_hf_above is None or c <= args.skip_hf_above:
            log(f"(a) C={c}: transformers ...")
            hf_model = hf_model or load_hf("float32")
            hf = r["transformers"] = bench_hf(hf_model, batch, args.new_tokens, repeats)
            hf["tokens_per_s"] = c * args.new_tokens / hf["wall_s"]
            r["ratio"] = kv["tokens_per_s"] / hf["tokens_per_s"]
            agree = [leading_agreement(a, b) for a, b in zip(kv["tokens"], hf.pop("tokens"))]
            r["greedy_agree_mean"] = statistics.mean(agree) / args.new_tokens
        kv.pop("tokens")
    del hf_model
    gc.collect()
    peak = max(peak_before, matmul_peak_flops())
    for c, r in throughput.items():
        # The fastest any engine could go on this machine: the mix's weight matmuls at peak.
        r["matmul_floor_s"] = r["kvserve"]["matmul_flops"] / peak
        r["matmul_bound_tokens_per_s"] = c * args.new_tokens / r["matmul_floor_s"]
    mix = prompts[:args.requests]
    log(f"(b) KV waste over {len(mix)} requests ...")
    waste = bench_waste(mix, args.new_tokens, args.reserve_len)
    gc.collect()
    budget = parse_memory(args.budget)
    log(f"(c) concurrency in {args.budget} ...")
    conc = bench_budget(mix, args.new_tokens, args.reserve_len, budget)

    lo, hi = args.prompt_len
    print(f"\nfloat32, prompts {lo}-{hi} tokens (seed {SEED}), {args.new_tokens} new tokens, "
          "greedy, EOS ignored; wall-clock median after one warm-up\n")
    print(f"float32 matmul peak (torch, best of 5, before/after): {peak_before / 1e9:.0f} / "
          f"{peak / 1e9:.0f} GFLOP/s; 'bound' = C * new tokens / (the mix's weight-matmul FLOPs "
          "at that peak)\n")
    head = (f"{'C':>4} {'kvserve tok/s':>14} {'hf tok/s':>10} {'kvserve/hf':>11} {'runs':>5} "
            f"{'preempt':>8} {'greedy agree':>13} {'bound tok/s':>12} {'kvserve/bound':>14}")
    print(head + "\n" + "-" * len(head))
    for c, r in throughput.items():
        kv, hf = r["kvserve"], r.get("transformers")
        hf_cols = (f"{hf['tokens_per_s']:>10.1f} {r['ratio']:>10.2f}x" if hf
                   else f"{'-':>10} {'-':>11}")
        agree = f"{100 * r['greedy_agree_mean']:>12.0f}%" if hf else f"{'-':>13}"
        bound = r["matmul_bound_tokens_per_s"]
        print(f"{c:>4} {kv['tokens_per_s']:>14.1f} {hf_cols} {kv['repeats']:>5} "
              f"{kv['preemptions']:>8} {agree} {bound:>12.1f} "
              f"{kv['tokens_per_s'] / bound:>13.0%}")
    mib, w = 1 << 20, waste
    print(f"\nKV waste, {len(mix)} requests, block {w['block_size']}, "
          f"{w['kv_bytes_per_token']} B/token, over {w['steps']} steps; "
          f"contiguous reserves {args.reserve_len} tokens/request (computed)")
    for name, label, note in (("paged", "paged", "  (target < 4%)"),
                              ("contig", "contiguous", "")):
        print(f"  {label:<11} waste avg {100 * w[name + '_waste_frac_avg']:6.2f}%  peak "
              f"{100 * w[name + '_waste_frac_peak']:6.2f}%  |  avg "
              f"{w[name + '_waste_bytes_avg'] / mib:8.2f} MiB  peak "
              f"{w[name + '_waste_bytes_peak'] / mib:8.2f} MiB{note}")
    print(f"\nconcurrency in {args.budget} of KV ({conc['num_blocks']} blocks), "
          f"{len(mix)} requests queued")
    print(f"  paged       max {conc['paged_max_running']} running, mean "
          f"{conc['paged_mean_running']:.1f}, {conc['preemptions']} preemptions")
    print(f"  contiguous  {conc['contig_running']} running ({args.reserve_len} tokens reserved "
          f"each)\n  paged/contiguous  max {conc['ratio_max'] or float('inf'):.2f}x  mean "
          f"{conc['ratio_mean'] or float('inf'):.2f}x  (target >= 2x)\n")
    print(json.dumps({
        "bench": "batch", "machine": machine_info(),
        "config": {"dtype": "float32", "concurrency": args.concurrency,
                   "new_tokens": args.new_tokens, "prompt_len": [lo, hi],
                   "requests": args.requests, "reserve_len": args.reserve_len,
                   "budget": args.budget, "repeats": args.repeats,
                   "skip_hf_above": args.skip_hf_above, "quick": args.quick, "seed": SEED},
        "matmul_peak_flops": peak,
        "throughput": {str(c): r for c, r in throughput.items()},
        "waste": waste, "concurrency_in_budget": conc}))


if __name__ == "__main__":
    main()
