"""Builds the K/V side of an engine from its CacheConfig: the attention backend, and for the paged
mode the pool's tensors and the block manager that hands their blocks out.

Resolves the paged pool's memory budget (bytes, or a fraction of free device memory) into a number
of blocks with KVLayout, and refuses at start-up a budget that cannot hold one max-length request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from kvserve.config import CacheConfig, ModelSpec, format_bytes
from kvserve.errors import ConfigError
from kvserve.kvcache.block_manager import BlockManager
from kvserve.kvcache.block_pool import BlockPool
from kvserve.kvcache.groups import KVGroups, kv_groups
from kvserve.kvcache.layout import KVLayout
from kvserve.kvcache.policy import (
    FullHistory,
    RetentionPolicy,
    Sinks,
    SlidingWindow,
    group_policy,
    most_blocks_held,
    policy_for,
)
from kvserve.kvcache.prefix_index import PrefixIndex
from kvserve.kvstore.paged import TORCH_KV_DTYPES, PagedKVStore
from kvserve.model.attention import AttentionBackend
from kvserve.model.attention.dense import ContiguousAttention, NoCacheAttention
from kvserve.model.attention.paged import PagedAttention


@dataclass(frozen=True)
class KVSetup:
    attention: AttentionBackend
    kv_cache_dtype: str  # the resolved storage format
    layout: KVLayout  # bytes per token and block of that format (the planner's formula)
    kv_store: PagedKVStore | None = None  # paged only
    block_manager: BlockManager | None = None  # paged only
    budget_bytes: int = 0  # paged: the pool's budget (kv_cache_memory resolved to bytes)


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def build_kv(config: CacheConfig, spec: ModelSpec, dtype: str, device: torch.device,
             max_model_len: int, model_key: str = "", max_num_seqs: int = 1,
             max_num_batched_tokens: int | None = None, tiers: bool = False) -> KVSetup:
    """The attention backend for config.cache_mode with K/V stored in the format "auto" (or the
    setting) gives for compute dtype `dtype`; for paged, its store and block manager (with a
    prefix index whose keys start from model_key, unless prefix caching is off, and the
    retention policy the model's windows allow: a table per KV group where layers differ,
    unless residual windows or offload tiers (tiers) need one table). A quantized format holds
    a residual window for each of max_num_seqs sequences."""
    kv_dtype = config.resolved_kv_cache_dtype(dtype)
    block_size = config.block_size
    layout = KVLayout(spec, block_size, kv_dtype, residual_seqs=max_num_seqs,
                      window_tokens=config.residual_window_tokens)
    groups = kv_groups(spec.layer_windows, spec.num_layers)
    step = max_num_batched_tokens or max_model_len
    group_policies = [(group_policy(w), len(layers))
                      for w, layers in zip(groups.windows, groups.layers)]
    if (groups.num_groups > 1 and not tiers and not any(layout.window_blocks)
            and _groups_hold_less(layout, groups, [p for p, _ in group_policies],
                                  max_model_len, step)):
        layout = replace(layout, groups=groups)
    else:
        group_policies = None  # one table
    if config.cache_mode == "none":
        return KVSetup(NoCacheAttention(spec), kv_dtype, layout)
    if config.cache_mode == "contiguous":
        return KVSetup(ContiguousAttention(spec, TORCH_KV_DTYPES[kv_dtype], device), kv_dtype,
                       layout)
    budget = config.kv_cache_memory_spec
    num_bytes = int(budget * free_memory_bytes(device)) if isinstance(budget, float) else budget
    num_blocks = layout.num_blocks_for_bytes(num_bytes)
    index = PrefixIndex() if config.enable_prefix_caching else None
    policy = retention_policy(config, spec, max_num_batched_tokens or max_model_len)
    if group_policies is not None:  # each group's own window; attention reads each group's
        policy = FullHistory()  # table, so releasing is the tables' business
    manager = BlockManager(BlockPool(num_blocks), block_size, index, model_key, policy,
                           groups=group_policies)
    # a sliding window: a sequence holds its window's keys and one step's tokens at most
    needed = manager.most_blocks_held(max_model_len, max_num_batched_tokens or max_model_len)
    what = f"one max_model_len ({max_model_len}) request"
    if isinstance(policy, SlidingWindow) and needed < manager.num_blocks_for(max_model_len):
        what = (f"one request (its {policy.window}-token window and a step of "
                f"{max_num_batched_tokens} tokens)")
    if num_blocks < needed:
        need_bytes = format_bytes(needed * layout.bytes_per_page)
        raise ConfigError(
            f"kv_cache_memory {config.kv_cache_memory!r} ({format_bytes(num_bytes)}) holds "
            f"{num_blocks} blocks of {block_size} tokens, but {what} needs {needed} "
            f"({need_bytes}): raise kv_cache_memory or lower max_model_len")
    store = PagedKVStore(layout, num_blocks, device, residual_slots=max_num_seqs)
    if isinstance(policy, Sinks) and store.has_residual:
        raise ConfigError(f"cache_policy 'sinks' reads K/V from the pool only; kv_cache_dtype "
                          f"{kv_dtype!r} keeps a residual window: use a float or fp8 format "
                          f"with kv_residual_tokens 0")
    return KVSetup(PagedAttention(store, policy), kv_dtype, layout, store, manager, num_bytes)


def _groups_hold_less(layout: KVLayout, groups: KVGroups, policies: list[RetentionPolicy],
                      max_model_len: int, step_tokens: int) -> bool:
    """Whether a max_model_len request holds fewer bytes with a table per group than with one
    table: the groups' padding rows cost on every block, and a window longer than the
    sequences releases nothing."""
    pages = most_blocks_held(policies, max_model_len, step_tokens, layout.block_size)
    return pages * layout.bytes_per_block_per_layer * groups.page_layers \
        < layout.num_blocks_for_tokens(max_model_len) * layout.bytes_per_block


def retention_policy(config: CacheConfig, spec: ModelSpec, step_tokens: int) -> RetentionPolicy:
    """--cache-policy sinks: Sinks, its window by default as large as keeps every distance
    attention sees (sinks + window + one step + a block) within the model's context; else the
    model's own sliding window where every layer has one, or full history."""
    if config.cache_policy != "sinks":
        return policy_for(spec.layer_windows)
    if spec.has_windows:
        raise ConfigError("cache_policy 'sinks' is for models with full attention; this one has "
                          "its own sliding windows (cache_policy 'full' releases what they "
                          "drop)")
    bs, context = config.block_size, spec.max_position_embeddings
    policy = Sinks(config.sink_tokens, config.window_tokens or Sinks.default_window(
        context, config.sink_tokens, bs, step_tokens), bs)
    apart = policy.sink_tokens + policy.window + step_tokens + bs
    if apart > context:
        raise ConfigError(
            f"cache_policy 'sinks' with {policy.sink_tokens} sink and {policy.window} window "
            f"tokens and steps of {step_tokens} tokens would place keys {apart} positions "
            f"apart, past the model's context ({context}): lower window_tokens or "
            f"max_num_batched_tokens")
    return policy
