"""Builds the attention backend a CacheConfig asks for, with its block pool when paged.

Resolves the paged pool's memory budget (bytes, or a fraction of free device memory) into a number
of blocks with KVLayout, and refuses at start-up a budget that cannot hold one max-length request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kvserve.cache.block_manager import BlockManager
from kvserve.cache.block_pool import BlockPool
from kvserve.cache.dense import ContiguousCache, NoCache
from kvserve.cache.kv_storage import PagedKVStorage
from kvserve.cache.layout import KVLayout
from kvserve.cache.paged import PagedCache
from kvserve.cache.prefix_cache import PrefixCache
from kvserve.config import CacheConfig, ModelSpec, format_bytes
from kvserve.errors import ConfigError


@dataclass
class BuiltCache:
    backend: NoCache | ContiguousCache | PagedCache
    block_manager: BlockManager | None = None
    layout: KVLayout | None = None


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def build_cache(config: CacheConfig, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                max_model_len: int, model_key: str = "") -> BuiltCache:
    """The attention backend for config.cache_mode; for paged, its storage and block manager
    (with a prefix cache whose keys start from model_key, unless prefix caching is off)."""
    if config.cache_mode == "none":
        return BuiltCache(NoCache(spec))
    if config.cache_mode == "contiguous":
        return BuiltCache(ContiguousCache(spec, dtype, device))
    layout = KVLayout(spec, config.block_size, str(dtype).removeprefix("torch."))
    budget = config.kv_cache_memory_spec
    num_bytes = int(budget * free_memory_bytes(device)) if isinstance(budget, float) else budget
    num_blocks = layout.num_blocks_for_bytes(num_bytes)
    needed = layout.num_blocks_for_tokens(max_model_len)
    if num_blocks < needed:
        need_bytes = format_bytes(needed * layout.bytes_per_block)
        raise ConfigError(
            f"kv_cache_memory {config.kv_cache_memory!r} ({format_bytes(num_bytes)}) holds "
            f"{num_blocks} blocks of {config.block_size} tokens, but one max_model_len "
            f"({max_model_len}) request needs {needed} ({need_bytes}): raise kv_cache_memory "
            f"or lower max_model_len")
    storage = PagedKVStorage(layout, num_blocks, dtype, device)
    prefix_cache = PrefixCache() if config.enable_prefix_caching else None
    manager = BlockManager(BlockPool(num_blocks), config.block_size, prefix_cache, model_key)
    return BuiltCache(PagedCache(storage), manager, layout)
