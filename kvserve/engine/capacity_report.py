"""The start-up capacity report: what the paged pool holds, in the numbers `kvserve plan` gives
for the same settings (the planner's own formula, called here), and the command that shows them.
"""

from __future__ import annotations

import shlex

from kvserve.config import EngineConfig, ModelSpec
from kvserve.errors import KVServeError
from kvserve.kvcache.layout import short_kv_dtype
from kvserve.planner.capacity import plan
from kvserve.planner.shapes import ModelShape


def plan_command(config: EngineConfig, max_model_len: int, kv_cache_dtype: str,
                 budget_bytes: int) -> list[str]:
    """The `kvserve plan` arguments that describe this engine's pool."""
    c = config.cache
    argv = ["kvserve", "plan"] + (["--model", config.model] if config.model else []) + [
        "--context", str(max_model_len), "--concurrency", str(config.scheduler.max_num_seqs),
        "--kv-cache-memory", str(budget_bytes), "--kv-cache-dtype", kv_cache_dtype,
        "--block-size", str(c.block_size)]
    if c.kv_residual_tokens is not None:
        argv += ["--kv-residual-tokens", str(c.kv_residual_tokens)]
    if c.cache_policy == "sinks":
        argv += ["--cache-policy", "sinks", "--sink-tokens", str(c.sink_tokens)]
        if c.window_tokens is not None:
            argv += ["--window-tokens", str(c.window_tokens)]
    return argv


def capacity_report(config: EngineConfig, spec: ModelSpec, max_model_len: int,
                    kv_cache_dtype: str, budget_bytes: int, pool_blocks: int,
                    page_layers: int) -> str:
    """One line for the log: the pool's blocks, tokens and bytes per token, how many
    max_model_len requests fit at once, and the plan command giving the same figures (the
    planner's shape of the loaded model: the file is not read again)."""
    c = config.cache
    try:
        p = plan(ModelShape.from_spec(spec, "the loaded model"), context=max_model_len,
                 concurrency=config.scheduler.max_num_seqs, kv_cache_memory=budget_bytes,
                 kv_cache_dtype=kv_cache_dtype,
                 block_size=c.block_size, kv_residual_tokens=c.kv_residual_tokens,
                 cache_policy=c.cache_policy, sink_tokens=c.sink_tokens,
                 window_tokens=c.window_tokens)
    except KVServeError as err:  # a model the planner cannot read: the pool alone
        return (f"KV capacity: {pool_blocks:,} blocks of {c.block_size} tokens "
                f"({budget_bytes / 2**30:.2f} GiB); no plan: {err}")
    kv = p.kv
    line = (f"KV capacity: {budget_bytes / 2**30:.2f} GiB = {kv.pool_blocks:,} blocks of "
            f"{c.block_size} tokens ({kv.pool_blocks * c.block_size:,} tokens at "
            f"{kv.bytes_per_token:,} B/token, {short_kv_dtype(kv_cache_dtype)}); a "
            f"{max_model_len:,}-token request takes {kv.blocks_per_request:,} blocks: "
            f"{kv.max_concurrent_requests:,} fit at once (max_num_seqs "
            f"{config.scheduler.max_num_seqs})")
    if page_layers != spec.num_layers:
        line += (f"; this pool: {pool_blocks:,} blocks of {page_layers} layers (a table per "
                 "KV group)")
    return line + "; as " + shlex.join(
        plan_command(config, max_model_len, kv_cache_dtype, budget_bytes))
