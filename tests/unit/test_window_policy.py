"""Sliding-window retention without a model: which blocks a window policy keeps, the exact blocks
the block manager gives back mid-sequence (their table entries become HOLE), a swap round trip
that keeps the holes, and the scheduler releasing blocks as tokens are computed."""

from __future__ import annotations

import pytest

from kvserve.config import SchedulerConfig
from kvserve.kvcache.block_manager import HOLE, BlockManager
from kvserve.kvcache.block_pool import BlockPool
from kvserve.kvcache.policy import FullHistory, SlidingWindow, policy_for
from kvserve.kvcache.prefix_index import PrefixIndex
from kvserve.request import Request, SamplingParams
from kvserve.scheduler.plan import SampledToken, StepResult
from kvserve.scheduler.scheduler import Scheduler

BS = 4


def test_kept_blocks_start_at_the_block_of_the_next_querys_first_key():
    w = SlidingWindow(6)
    # n computed tokens: the next query (position n) reads keys n - 5 .. n
    assert w.released_blocks(5, BS) == range(0, 0)
    assert w.released_blocks(9, BS) == range(0, 1)  # key 4 on: block 1
    assert w.released_blocks(12, BS) == range(0, 1)  # key 7: still block 1
    assert w.released_blocks(13, BS) == range(0, 2)
    assert w.exact_blocks(BS) is None and w.most_tokens_held(100, 8, BS) == 6 + 8 + BS
    assert policy_for((6, 8)).window == 8 and isinstance(policy_for((0, 8)), FullHistory)
    assert isinstance(policy_for(()), FullHistory)
    with pytest.raises(ValueError):
        SlidingWindow(0)


def _request(n: int) -> Request:
    return Request("r", list(range(10, 10 + n)), SamplingParams(max_tokens=50))


@pytest.mark.parametrize("indexed", [False, True])
def test_released_blocks_are_exactly_the_ones_before_the_window(indexed):
    pool = BlockPool(16)
    m = BlockManager(pool, BS, PrefixIndex() if indexed else None, policy=SlidingWindow(6))
    r = _request(10)
    assert m.allocate_slots("r", 10) and m.block_ids("r") == [0, 1, 2]
    r.num_computed_tokens = 10
    m.cache_full_blocks(r)
    assert m.release_unread(r) == [0]  # keys 5.. are read next: block 0 (keys 0-3) goes
    assert m.block_ids("r") == [HOLE, 1, 2] and pool.ref_counts[0] == 0
    assert 0 in pool.free_queue and m.num_blocks_held("r") == 2
    assert m.release_unread(r) == []  # nothing new
    r.output_token_ids.extend(range(7))
    assert m.allocate_slots("r", 17) and m.block_ids("r") == [HOLE, 1, 2, 3, 4]
    r.num_computed_tokens = 17
    m.cache_full_blocks(r)
    assert m.release_unread(r) == [1, 2]  # keys 12.. next: blocks 1 and 2 go
    assert m.block_ids("r") == [HOLE, HOLE, HOLE, 3, 4]
    assert pool.num_used_blocks == 2
    if indexed:  # full blocks stay cached after their release, as any freed block does
        assert m.prefix_index.num_cached_blocks == 4
    m.check_invariants()
    assert m.free("r") == [3, 4] and pool.num_used_blocks == 0
    m.check_invariants()


def test_a_swap_keeps_the_holes_where_they_were():
    pool = BlockPool(16)
    m = BlockManager(pool, BS, policy=SlidingWindow(6))
    r = _request(17)
    m.allocate_slots("r", 17)
    r.num_computed_tokens = 17
    m.release_unread(r)
    assert m.block_ids("r") == [HOLE, HOLE, HOLE, 3, 4]
    assert m.free("r", swap=True) == [3, 4]  # only real blocks go to the host
    assert m.parked_holes == {"r": range(0, 3)}
    m.adopt("r", m.allocate_blocks(2))
    assert m.block_ids("r")[:3] == [HOLE] * 3 and m.num_blocks_held("r") == 2
    m.check_invariants()
    m.free("r", swap=True)
    m.free("r")  # it ended while swapped out: its holes are forgotten
    assert m.parked_holes == {}


def test_full_history_releases_nothing():
    pool = BlockPool(8)
    m = BlockManager(pool, BS)
    r = _request(20)
    m.allocate_slots("r", 20)
    r.num_computed_tokens = 20
    assert m.release_unread(r) == [] and HOLE not in m.block_ids("r")


def test_the_scheduler_releases_blocks_as_decode_moves_the_window():
    pool = BlockPool(6)
    s = Scheduler(SchedulerConfig(max_num_seqs=2), 64, True, (2,),
                  BlockManager(pool, BS, policy=SlidingWindow(5)))
    s.add(Request("a", list(range(10, 19)), SamplingParams(max_tokens=40, ignore_eos=True)))
    most = 0
    for _ in range(40):
        plan = s.schedule()
        s.update(plan, StepResult(tuple(SampledToken(q.request_id, 7) for q in plan.seqs)))
        most = max(most, pool.num_used_blocks)
        if s.running:
            r = s.running[0]
            table = s.blocks.block_ids("a")
            first = s.blocks.policy.released_blocks(r.num_computed_tokens, BS).stop
            assert table[:first] == [HOLE] * first and HOLE not in table[first:]
    # 49 tokens in all through a 6-block pool: a 5-token window never holds more than 3 blocks
    assert not s.running and most <= 3


def test_a_cached_prompt_longer_than_the_pool_is_admitted_under_a_window():
    """A prompt whose cached prefix fills the whole pool (a second chat turn): its hits before
    the window go straight back, so its step fits, it runs, and the request behind it too
    (before, admission retried the same hits forever)."""
    pool = BlockPool(6)
    m = BlockManager(pool, BS, PrefixIndex(), policy=SlidingWindow(5))
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=8), 64, True, (2,), m)
    prompt = list(range(10, 10 + 6 * BS))
    s.add(Request("a", prompt, SamplingParams(max_tokens=1, ignore_eos=True)))
    s.add(Request("b", prompt + [99], SamplingParams(max_tokens=1, ignore_eos=True)))
    s.add(Request("c", [1, 2, 3], SamplingParams(max_tokens=1, ignore_eos=True)))
    done = set()
    for _ in range(40):
        plan = s.schedule()
        finished = s.update(plan, StepResult(tuple(SampledToken(q.request_id, 7)
                                                   for q in plan.seqs if q.sample)))
        done |= {r.request_id for r in finished}
        for r in finished:
            m.free(r.request_id)
        m.check_invariants()
    assert done == {"a", "b", "c"}
    assert m.prefix_index.num_hit_tokens > 0  # b reused a's blocks


def test_the_largest_window_decides_what_no_layer_reads():
    assert policy_for((4, 8)).window == 8
