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


@pytest.mark.parametrize("kv_dtype", ["int8", "int4", "fp8_e4m3", "fp8_e5m2"])
def test_planner_bytes_per_token_equal_the_allocated_quantized_pool(spec, kv_dtype):
    check_against_planner(spec, "float32", kv_dtype, kv_dtype)


@pytest.mark.parametrize("k, v", [("int8", "int4"), ("bfloat16", "int8"), ("fp8_e4m3", "int4")])
def test_planner_equals_the_pool_with_k_and_v_in_two_formats(spec, k, v):
    check_against_planner(spec, "float32", "auto", f"{k}/{v}", k_cache_dtype=k, v_cache_dtype=v)


def check_against_planner(spec, compute: str, kv_dtype: str, resolved: str, **sides) -> None:
    block_size, seqs = 16, 4
    built = build_kv(CacheConfig(kv_cache_memory="32MiB", block_size=block_size,
                                 kv_cache_dtype=kv_dtype, **sides), spec, compute,
                     torch.device("cpu"), max_model_len=256, max_num_seqs=seqs)
    assert built.kv_cache_dtype == resolved
    store = built.kv_store
    num_blocks = built.block_manager.pool.num_blocks
    per_block = sum(t.numel() * t.element_size() for t in store.parts.values())
    # one block's K and V in every layer, every part (codes and scales)
    measured = sum(t[:, 0].numel() * t.element_size() for t in store.parts.values())
    assert per_block == measured * num_blocks
    # per-tensor scales (fp8) and the residual windows of `seqs` sequences (int8/int4)
    fixed = store.num_bytes_allocated() - per_block

    p = plan(None, kv_cache_dtype=short_kv_dtype(kv_dtype) if kv_dtype != "auto" else compute,
             k_cache_dtype=sides.get("k_cache_dtype"), v_cache_dtype=sides.get("v_cache_dtype"),
             block_size=block_size, memory="32MiB", weights_memory="1B", reserve="0",
             concurrency=seqs)
    assert p.kv.kv_cache_dtype == short_kv_dtype(resolved)
    assert p.kv.bytes_per_block == measured
    assert p.kv.bytes_per_token == -(-measured // block_size)
    assert built.layout.fixed_bytes == fixed
    window = built.layout.residual_bytes_per_seq
    assert fixed == seqs * window + (2 * spec.num_layers * 4 if "fp8" in resolved else 0)
    # the planner's budget holds exactly the pool's blocks beside the windows
    room = p.kv_budget_bytes - fixed
    assert room // p.kv.bytes_per_block in (num_blocks, num_blocks + 1)
    assert p.kv.bytes_per_request == p.kv.blocks_per_request * measured + window
