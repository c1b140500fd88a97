"""The cache lab: one greedy generation run without the KV cache and with it (contiguous, paged),
step by step, recording what each step cost in time, K/V projections and KV memory.

Everything reported is read from the engine as it runs (its projection counter, its cache's
allocation, its block pool), not derived from formulas; report.py turns the runs into files.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from kvserve.bench.runs import CacheLabResult, ModeRun, StepSample
from kvserve.cli_flags import add_setting_flags
from kvserve.config import CACHE_MODES

# A plain passage the prompt is cut from (repeated when --prompt-tokens asks for more).
PASSAGE = (
    "The KV cache keeps the keys and values of every token a model has already seen, so that "
    "each new token only computes its own. Write a long, careful explanation of how a "
    "lighthouse keeper in the nineteenth century kept the lamp burning through a winter storm, "
    "covering the oil, the wick, the lens, the clockwork and the long hours of the night. "
)


def build_prompt(tokenizer, num_tokens: int) -> list[int]:
    """The first num_tokens token ids of PASSAGE repeated (BOS, if the model has one, first)."""
    ids = tokenizer.encode(PASSAGE, add_special_tokens=True)
    more = tokenizer.encode(PASSAGE, add_special_tokens=False)
    while len(ids) < num_tokens:
        ids += more
    return ids[:num_tokens]


def kv_held(engine, block_bytes: int) -> tuple[int, int | None]:
    """(bytes, blocks) of KV held when the last step's forward pass ended: for paged, the blocks
    in use (the pool itself is reserved up front); otherwise the cache's tensors as allocated
    (contiguous: with headroom; none: nothing). Read from the engine's peaks, which it takes
    before a finished request's KV is freed; with one request KV only grows, so the peak is the
    step's own."""
    kv = engine.cache_snapshot()
    if kv.pool is not None:
        return kv.pool.peak_used_blocks * block_bytes, kv.pool.peak_used_blocks
    return kv.peak_bytes_allocated, None


def make_llm(mode: str, max_model_len: int, engine_kwargs: dict):
    from kvserve.engine.llm import LLM

    # one step per token: the lab times each token's step (multi-step would batch them)
    return LLM(cache_mode=mode, max_model_len=max_model_len, num_scheduler_steps=1,
               **engine_kwargs)


def run_mode(mode: str, prompt_ids: list[int], new_tokens: int, engine_kwargs: dict,
             progress: tqdm | None = None) -> ModeRun:
    llm = make_llm(mode, len(prompt_ids) + new_tokens, engine_kwargs)
    return measure(llm, prompt_ids, new_tokens, progress)


def measure(llm, prompt_ids: list[int], new_tokens: int, progress: tqdm | None = None) -> ModeRun:
    """One greedy generation of new_tokens after prompt_ids on llm, step by step."""
    from kvserve.request import SamplingParams

    engine = llm.engine
    greedy = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    # Warm-up (kernel build, allocator, first-call costs), then count from zero.
    llm.generate({"prompt_token_ids": prompt_ids[:8]},
                 SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
    engine.reset_prefix_cache()  # the warm-up's blocks must not be reused by the measured run
    engine.reset_counters()
    kv = engine.cache_snapshot()
    run = ModeRun(kv.cache_mode, engine.spec.num_layers, kv.bytes_per_token,
                  kv.pool.block_size if kv.pool is not None else None)
    block_bytes = kv.bytes_per_block  # a pool block (0 unless paged)
    request = engine.add_request("cache-lab", prompt_ids, greedy)
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        deltas = engine.step()
        step_s = time.perf_counter() - t0
        for delta in deltas:
            run.token_ids.extend(delta.new_token_ids)
            kv_bytes, kv_blocks = kv_held(engine, block_bytes)
            run.samples.append(StepSample(
                len(run.token_ids) - 1, len(prompt_ids) + len(run.token_ids) - 1, step_s,
                engine.model.num_kv_projections, kv_bytes, kv_blocks))
            if progress is not None:
                progress.update(len(delta.new_token_ids))
    engine.pop_finished(request.request_id)
    return run


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_setting_flags(p, ("model", "dtype", "device", "block_size", "kv_cache_memory"))
    p.add_argument("--new-tokens", type=int, default=500, help="tokens to generate (default 500)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length in tokens")
    p.add_argument("--modes", default="none,contiguous,paged",
                   help="cache modes to run, comma-separated; the first is the baseline")
    p.add_argument("--out", default="kvserve-lab", help="folder for CSV, PNG and JSON")
    p.add_argument("--json", action="store_true", help="print the JSON summary as the last line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_arguments(args: argparse.Namespace) -> list[str]:
    """The modes to run; raises ConfigError naming the bad flag."""
    from kvserve.errors import ConfigError

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in CACHE_MODES]
    if bad or not modes:
        raise ConfigError(f"--modes: unknown cache mode(s) {', '.join(bad) or '(none given)'}; "
                          f"choose from {', '.join(CACHE_MODES)}")
    if len(set(modes)) != len(modes):
        raise ConfigError(f"--modes lists a mode twice: {args.modes}")
    if args.new_tokens < 2:
        raise ConfigError(f"--new-tokens must be at least 2, got {args.new_tokens}")
    if args.prompt_tokens < 1:
        raise ConfigError(f"--prompt-tokens must be at least 1, got {args.prompt_tokens}")
    return modes


def main(args: argparse.Namespace) -> int:
    from kvserve.bench import report

    modes = check_arguments(args)  # before torch loads: a bad flag fails at once
    engine_kwargs = dict(model=args.model, dtype=args.dtype, device=args.device,
                         block_size=args.block_size, kv_cache_memory=args.kv_cache_memory)
    prompt_ids: list[int] | None = None
    runs = []
    with tqdm(total=len(modes) * args.new_tokens, unit="tok", disable=args.no_progress,
              file=sys.stderr) as bar:
        for mode in modes:
            bar.set_description(f"cache lab: {mode}")
            llm = make_llm(mode, args.prompt_tokens + args.new_tokens, engine_kwargs)
            # The first engine's tokenizer builds the prompt every mode then runs.
            prompt_ids = prompt_ids or build_prompt(llm.tokenizer, args.prompt_tokens)
            runs.append(measure(llm, prompt_ids, args.new_tokens, bar))
    result = CacheLabResult(
        model=args.model or "embedded SmolLM2-135M-Instruct", dtype=args.dtype,
        device=args.device, prompt_tokens=len(prompt_ids), new_tokens=args.new_tokens, runs=runs)
    files = report.write_cache_lab(result, Path(args.out))
    print(report.cache_lab_summary(result, files))
    if args.json:
        print(report.cache_lab_json(result, files))
    return 0 if result.tokens_match() else 1
