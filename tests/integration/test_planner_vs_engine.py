"""The planner's bytes per token equal what the engine's pool allocates for the default model, for
every KV dtype the engine runs (given as the compute dtype with kv_cache_dtype auto, and as an
explicit kv_cache_dtype), measured from the allocated tensors (not the formula)."""

import pytest
import torch

from kvserve.config import DTYPES, CacheConfig
from kvserve.engine.kv_setup import build_kv
from kvserve.kvcache.layout import short_kv_dtype
from kvserve.model.loader import load_checkpoint
from kvserve.planner.capacity import plan


@pytest.fixture(scope="module")
def spec():
    return load_checkpoint(None).spec  # the default model as the engine loads it


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_planner_bytes_per_token_equal_the_allocated_pool(spec, dtype, explicit):
    # auto follows the compute dtype; an explicit kv_cache_dtype under float32 compute
    compute, kv_dtype = ("float32", dtype) if explicit else (dtype, "auto")
    check_against_planner(spec, compute, kv_dtype, dtype)


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3", "fp8_e5m2"])
def test_planner_bytes_per_token_equal_the_allocated_quantized_pool(spec, kv_dtype):
    check_against_planner(spec, "float32", kv_dtype, kv_dtype)


def check_against_planner(spec, compute: str, kv_dtype: str, resolved: str) -> None:
    block_size = 16
    built = build_kv(CacheConfig(kv_cache_memory="32MiB", block_size=block_size,
                                 kv_cache_dtype=kv_dtype), spec, compute,
                     torch.device("cpu"), max_model_len=256)
    assert built.kv_cache_dtype == resolved
    store = built.kv_store
    num_blocks = built.block_manager.pool.num_blocks
    per_block = sum(t.numel() * t.element_size() for t in store.parts.values())
    # one token's K and V in every layer, every part (codes and scales)
    measured = sum(t[:, :, 0, 0].numel() * t.element_size() for t in store.parts.values())
    assert per_block == measured * num_blocks * block_size
    fixed = store.num_bytes_allocated() - per_block  # per-tensor scales (fp8)

    p = plan(None, kv_cache_dtype=short_kv_dtype(resolved), block_size=block_size,
             memory="32MiB", weights_memory="1B", reserve="0")
    assert p.kv.bytes_per_token == measured
    assert p.kv.bytes_per_block * num_blocks == per_block
    assert built.layout.fixed_bytes == fixed
    # the planner's budget holds exactly the pool's blocks
    assert p.kv_budget_bytes // p.kv.bytes_per_block in (num_blocks, num_blocks + 1)
    assert p.kv.bytes_per_request == p.kv.blocks_per_request * measured * block_size
