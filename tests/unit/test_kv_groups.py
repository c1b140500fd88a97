"""KV groups without a model: how layers are grouped into tables of equal page size, the exact
blocks each group's table keeps and releases over one pool, a swap round trip of every group's
table, and prefix hits that need only the blocks attention will read (a window's), by block id."""

from __future__ import annotations

import pytest

from kvserve.kvcache.block_manager import HOLE, BlockManager
from kvserve.kvcache.block_pool import BlockPool
from kvserve.kvcache.groups import kv_groups
from kvserve.kvcache.policy import FullHistory, SlidingWindow
from kvserve.kvcache.prefix_index import PrefixIndex
from kvserve.request import Request, SamplingParams

BS = 4


def test_one_layer_type_is_one_group_of_every_layer():
    for windows in [(), (0, 0, 0), (8, 8, 8)]:
        g = kv_groups(windows, 3)
        assert g.layers == ((0, 1, 2),) and g.page_layers == 3 and g.padding_layers == 0
    assert kv_groups((8, 8), 2).windows == (8,) and kv_groups((), 2).windows == (None,)


def test_types_are_cut_into_groups_of_the_smallest_types_size():
    # Gemma 2: local and global alternating -> a group each
    g = kv_groups((6, 0) * 3, 6)
    assert g.layers == ((1, 3, 5), (0, 2, 4)) and g.windows == (None, 6)
    assert g.group_of_layer == (1, 0, 1, 0, 1, 0) and g.row_of_layer == (0, 0, 1, 1, 2, 2)
    # Gemma 3: five local to one global, 12 layers -> groups of 2: one full, five local
    g = kv_groups((8, 8, 8, 8, 8, 0) * 2, 12)
    assert g.layers[0] == (5, 11) and g.windows == (None,) + (8,) * 5
    assert g.layers[1:] == ((0, 1), (2, 3), (4, 6), (7, 8), (9, 10)) and g.padding_layers == 0
    # 3 local, 2 global: the local type's last group is short (one padding row per page)
    g = kv_groups((8, 8, 8, 0, 0), 5)
    assert g.layers == ((3, 4), (0, 1), (2,)) and g.page_layers == 2 and g.padding_layers == 1
    assert "3 block tables" in g.describe() and "2 layers per block" in g.describe()
    # two windows and full attention: three types
    g = kv_groups((4, 0, 8, 4, 0, 8), 6)
    assert g.windows == (None, 4, 8) and g.layers == ((1, 4), (0, 3), (2, 5))


def _manager(pool: BlockPool, indexed: bool = False) -> BlockManager:
    """Two KV groups over one pool: full attention (group 0) and a 6-token window (group 1)."""
    return BlockManager(pool, BS, PrefixIndex() if indexed else None,
                        groups=[(FullHistory(), 1), (SlidingWindow(6), 1)])


def _request(n: int, rid: str = "r") -> Request:
    return Request(rid, list(range(10, 10 + n)), SamplingParams(max_tokens=50))


def test_each_groups_table_keeps_what_its_layers_read():
    pool = BlockPool(16)
    m = _manager(pool)
    r = _request(10)
    assert m.num_new_blocks("r", 10) == 6  # three blocks in each table
    assert m.allocate_slots("r", 10)
    assert m.block_ids("r") == [0, 1, 2] and m.group_block_ids("r") == ((3, 4, 5),)
    r.num_computed_tokens = 10
    assert m.release_unread(r) == [3]  # the window's group: keys 5.. next, block 0 goes
    assert m.block_ids("r") == [0, 1, 2] and m.group_block_ids("r") == ((HOLE, 4, 5),)
    assert pool.ref_counts[3] == 0 and 3 in pool.free_queue and m.num_blocks_held("r") == 5
    r.output_token_ids.extend(range(7))
    assert m.allocate_slots("r", 17)  # two more blocks in each table, least recently freed
    assert m.block_ids("r") == [0, 1, 2, 6, 7] and m.group_block_ids("r") == ((HOLE, 4, 5, 8, 9),)
    r.num_computed_tokens = 17
    assert m.release_unread(r) == [4, 5]
    assert m.group_block_ids("r") == ((HOLE, HOLE, HOLE, 8, 9),) and pool.num_used_blocks == 7
    # the full group keeps every block; the window's group holds its window and a step at most
    assert m.most_blocks_held(100, 8) == 25 + -(-(6 + 8 + BS) // BS)
    assert m.num_tokens_released("r") == 3 * BS // 2  # half the layers released 3 blocks
    m.check_invariants()


def test_a_swap_round_trip_restores_every_groups_table_and_holes():
    pool = BlockPool(16)
    m = _manager(pool)
    r = _request(13)
    m.allocate_slots("r", 13)
    r.num_computed_tokens = 13
    m.release_unread(r)
    tables = (m.block_ids("r"), m.group_block_ids("r"))
    assert tables == ([0, 1, 2, 3], ((HOLE, HOLE, 6, 7),))
    parked = m.free("r", swap=True)
    assert parked == [0, 1, 2, 3, 6, 7] and pool.num_used_blocks == 0
    assert m.blocks_to_resume("r", 13) == 6 and m.blocks_to_resume("r", 17) == 4 + 1 + 3
    m.adopt("r", [9, 8, 7, 6, 5, 4])
    assert m.block_ids("r") == [9, 8, 7, 6] and m.group_block_ids("r") == ((HOLE, HOLE, 5, 4),)
    pool.incref([9, 8, 7, 6, 5, 4])  # adopt takes blocks the scheduler allocated
    m.check_invariants()


def _compute(m: BlockManager, r: Request, grouped: bool) -> tuple[list[int], list[int]]:
    """r's whole prompt computed: its blocks cached, the window's released. Returns the full
    group's table and the window's table as they were before the release."""
    assert m.allocate_slots(r.request_id, r.num_tokens)
    full = list(m.block_ids(r.request_id))
    window = list(m.group_block_ids(r.request_id)[0]) if grouped else full
    r.num_computed_tokens = r.num_tokens
    m.cache_full_blocks(r)
    m.release_unread(r)
    return full, window


def _evict(m: BlockManager, block_ids: list[int]) -> None:
    """The pool hands these cached, free blocks out again (to nobody's table: back at once)."""
    for b in block_ids:
        assert m.prefix_index.key_of_block(b) is not None and b in m.pool.free_queue
        m.pool.free_queue.move_to_end(b, last=False)
    taken = m.allocate_blocks(len(block_ids))
    assert sorted(taken) == sorted(block_ids)
    m.pool.free(taken)


@pytest.mark.parametrize("grouped", [False, True])
def test_a_prefix_hit_needs_only_the_blocks_the_window_reads(grouped):
    """A 41-token prompt computed and finished; then its window layers' first 7 blocks are
    evicted. The same prompt hits all 10 full blocks: the full group's all, the window's only
    the two its next query reads (keys 35..40: blocks 8 and 9); a run from block 0, as before,
    would hit nothing in the window's table."""
    pool = BlockPool(40)
    m = _manager(pool, indexed=True) if grouped else BlockManager(
        pool, BS, PrefixIndex(), policy=SlidingWindow(6))
    full, window = _compute(m, _request(41, "a"), grouped)
    m.free("a")
    _evict(m, window[:7])
    b = _request(41, "b")
    assert m.match_prefix(b) == 40
    got = list(m.group_block_ids("b")[0] if grouped else m.block_ids("b"))
    assert got == [HOLE] * 8 + window[8:10]
    if grouped:
        assert m.block_ids("b") == full[:10]
    assert all(pool.ref_counts[x] == 1 for x in got if x != HOLE)
    m.check_invariants()
    # a block the window reads goes too: the hit stops where every block read is cached
    m.free("b")
    _evict(m, [window[9]])
    c = _request(41, "c")
    assert m.match_prefix(c) == 36  # 9 blocks: the next query reads keys 31..36, blocks 7, 8
    got = list(m.group_block_ids("c")[0] if grouped else m.block_ids("c"))
    assert got == [HOLE] * 7 + window[7:9]
    m.check_invariants()


def test_a_full_groups_miss_ends_the_hit_where_it_is():
    pool = BlockPool(40)
    m = _manager(pool, indexed=True)
    full, _ = _compute(m, _request(41, "a"), True)
    m.free("a")
    _evict(m, [full[5]])
    b = _request(41, "b")
    assert m.match_prefix(b) == 5 * BS and m.block_ids("b") == full[:5]
    # at 20 tokens the window reads keys 15..: blocks 3 and 4, both still cached
    assert m.group_block_ids("b")[0][:3] == (HOLE,) * 3
    m.check_invariants()


def test_a_miss_costs_what_the_hits_are_not_the_prompt_length():
    """A 131,072-token prompt with nothing cached: the full group stops at its first miss and
    the policy is asked once, for the tables of the 0-token hit (it was once asked for every
    block of the prompt)."""
    calls = []

    class Counting(FullHistory):
        def released_blocks(self, num_tokens, block_size):
            calls.append(num_tokens)
            return super().released_blocks(num_tokens, block_size)

    for groups in ([(Counting(), 1)], [(Counting(), 1), (SlidingWindow(64), 2)]):
        m = BlockManager(BlockPool(100), 16, PrefixIndex(), "m", groups=groups)
        calls.clear()
        assert m.match_prefix(_request(131072)) == 0 and calls == [0]
