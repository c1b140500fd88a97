"""Block pool and block manager: exact block ids, eviction order, all-or-nothing allocation."""

import pytest

from kvserve.config import ModelSpec
from kvserve.kvcache.block_manager import BlockManager
from kvserve.kvcache.block_pool import BlockPool, NoFreeBlocksError
from kvserve.kvcache.layout import KVLayout


def test_allocate_takes_lowest_free_ids_and_free_returns_them_to_the_tail():
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    pool.free([0])
    assert list(pool.free_queue) == [2, 3, 0]  # eviction order: least recently freed first
    assert pool.allocate(3) == [2, 3, 0]
    assert pool.num_free_blocks == 0
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)
    pool.check_invariants()


def test_shared_blocks_are_freed_by_their_last_reference():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.incref([b])
    pool.free([b])
    assert pool.ref_counts[b] == 1 and b not in pool.free_queue
    pool.free([b])
    assert pool.ref_counts[b] == 0 and b in pool.free_queue
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([b])


def test_manager_grows_tables_a_block_at_a_time_all_or_nothing():
    manager = BlockManager(BlockPool(3), block_size=4)
    assert manager.allocate_slots("a", 5)  # 2 blocks
    assert manager.block_ids("a") == [0, 1]
    assert manager.allocate_slots("a", 8)  # still 2 blocks
    assert manager.block_ids("a") == [0, 1]
    assert not manager.allocate_slots("b", 9)  # needs 3, 1 free: takes nothing
    assert manager.block_ids("b") == [] and manager.pool.num_free_blocks == 1
    assert manager.allocate_slots("a", 9)
    assert manager.free("a") == [0, 1, 2]
    assert manager.pool.num_free_blocks == 3
    manager.check_invariants()


def test_layout_bytes_for_the_default_model():
    spec = ModelSpec(name="smollm2", num_layers=30, hidden_size=576, intermediate_size=1536,
                     num_heads=9, num_kv_heads=3, head_dim=64, vocab_size=49152,
                     max_position_embeddings=8192)
    fp16 = KVLayout(spec, 16, "float16")
    assert fp16.bytes_per_token == 23_040
    assert fp16.bytes_per_token_per_layer == 768
    assert fp16.bytes_per_block == 23_040 * 16
    assert KVLayout(spec, 16, "float32").bytes_per_token == 46_080
    assert fp16.num_blocks_for_tokens(17) == 2
    assert fp16.num_blocks_for_bytes(23_040 * 16 * 10 + 5) == 10


def test_layout_formula_equals_the_bytes_of_the_allocated_store():
    """The one memory formula against the tensors the paged storage actually allocates."""
    import torch

    from kvserve.kvstore.paged import PagedKVStore

    spec = ModelSpec(name="t", num_layers=3, hidden_size=32, intermediate_size=64, num_heads=4,
                     num_kv_heads=2, head_dim=8, vocab_size=50, max_position_embeddings=64)
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16"),
                        (torch.float16, "float16")):
        layout = KVLayout(spec, 4, name)
        storage = PagedKVStore(layout, num_blocks=5, device=torch.device("cpu"))
        assert storage.keys(0).dtype == storage.values(0).dtype == dtype
        assert storage.num_bytes_allocated() == 5 * layout.bytes_per_block
        per_token = sum(t[:, 0, 0].numel() * t.element_size() for t in storage.parts.values())
        assert per_token == layout.bytes_per_token
