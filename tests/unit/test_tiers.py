"""The prefix cache's tiers below the pool, without a model: LRU order, parked swap blocks, the
copies a plan orders (reads before writes, drops after), fetch-or-recompute decisions from the
cost model, and the block manager bringing a host hit back under the tenant it was made under."""

import pytest

from kvserve.config import SchedulerConfig
from kvserve.kvcache.block_manager import BlockManager
from kvserve.kvcache.block_pool import BlockPool
from kvserve.kvcache.costs import PrefillRate, TransferRate, attention_ratio, decide
from kvserve.kvcache.prefix_index import PrefixIndex
from kvserve.kvcache.tiers import LowerTiers, TierBlock, TierIndex
from kvserve.request import Request, SamplingParams
from kvserve.scheduler.plan import SampledToken, StepResult, Tier
from kvserve.scheduler.scheduler import Scheduler

BS = 4


def block(*tokens, tenant=None):
    return TierBlock(tuple(tokens), tenant)


def test_tier_index_is_lru_and_checks_tokens():
    t = TierIndex("host", 2)
    assert t.insert(b"a", block(1, 2)) == [] and t.insert(b"b", block(3, 4)) == []
    t.touch(b"a")
    assert t.insert(b"c", block(5, 6)) == [(b"b", block(3, 4))]  # b was least recently used
    assert t.find(b"a", [1, 2]) == block(1, 2)
    assert t.find(b"a", [1, 3]) is None  # same key, other tokens: a miss, never wrong K/V
    assert t.park(1) == [(b"a", block(1, 2))]  # a swapped-out block takes a cached one's room
    assert list(t.entries) == [b"c"] and t.num_parked == 1
    t.unpark(1)
    assert t.insert(b"d", block(7, 8)) == [] and len(t) == 2
    t.touch(b"gone")  # pushed out already: nothing to do
    t.pin(b"c")  # a waiting request will fetch c: the next oldest goes instead
    assert t.insert(b"e", block(9, 9)) == [(b"d", block(7, 8))]
    t.unpin(b"c")
    assert t.insert(b"f", block(1, 1)) == [(b"c", block(5, 6))]


def test_costs_follow_measurements():
    rate = TransferRate(bytes_per_s=1e9, latency_s=1e-3)
    assert rate.seconds(10**9) == pytest.approx(1.001)
    rate.observe(10**9, 0.5 + 1e-3)  # 2 GB/s measured: the average moves a fifth of the way
    assert rate.bytes_per_s == pytest.approx(1.2e9)
    prefill = PrefillRate(per_token_s=1e-3, attention_ratio=1e-3)
    assert prefill.seconds(100, 0) == pytest.approx(100 * 1e-3 * (1 + 0.05))
    assert prefill.seconds(100, 1000) == pytest.approx(100 * 1e-3 * (1 + 1.05))  # long prefix
    prefill.observe_many([(100, 0)], 2 * prefill.seconds(100, 0))  # twice as slow as thought
    assert prefill.per_token_s == pytest.approx(1.2e-3)
    fast = decide(TransferRate(1e9), PrefillRate(1e-3, 0.0), num_bytes=10**6, num_tokens=16,
                  start=0)
    assert fast.fetch and fast.fetch_s == pytest.approx(1e-3) and fast.recompute_s == 0.016
    slow = decide(TransferRate(1e6), PrefillRate(1e-3, 0.0), 10**6, 16, 0)
    assert not slow.fetch  # one second to move, 16 ms to recompute
    # SmolLM2-135M's shape: each context token adds ~1/3000 of a token's matmul work
    per_layer = 576 * (2 * 9 + 2 * 3) * 64 + 3 * 576 * 1536
    assert attention_ratio(30, 9, 64, 30 * per_layer) == pytest.approx(3.25e-4, rel=0.01)


def lower_tiers(capacity, bytes_per_s=1e9):
    return LowerTiers(TierIndex("host", capacity), TransferRate(bytes_per_s),
                      PrefillRate(1e-3, 0.0), 1000, BS)


def run_to_end(scheduler, plans):
    while scheduler.has_unfinished():
        plan = scheduler.schedule()
        plans.append(plan)
        scheduler.update(plan, StepResult(tuple(SampledToken(s.request_id, 5)
                                                for s in plan.seqs if s.sample)))


def engine_parts(lower, num_blocks=6):
    manager = BlockManager(BlockPool(num_blocks), BS, PrefixIndex(), "m", lower=lower)
    config = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64)
    return manager, Scheduler(config, 64, True, (0,), manager)


def test_an_evicted_prefix_comes_back_from_the_host_tier_under_its_own_salt():
    lower = lower_tiers(capacity=8)
    manager, scheduler = engine_parts(lower)
    a = list(range(10, 22))  # three full blocks
    plans = []
    scheduler.add(Request("a", a + [1], SamplingParams(max_tokens=1), cache_salt="s"))
    run_to_end(scheduler, plans)
    scheduler.add(Request("b", list(range(40, 60)) + [1], SamplingParams(max_tokens=1)))
    run_to_end(scheduler, plans)  # b's six blocks evict a's three: copied down, reads first
    offload = next(t for p in plans for t in p.transfers if t.dst is Tier.HOST)
    assert offload.request_id is None and len(offload.block_ids) == 3
    assert len(lower.host) == 3 and lower.counters["host"].num_stored_blocks == 3
    other = Request("c", a + [2], SamplingParams(max_tokens=1), cache_salt="t")
    scheduler.add(other)
    run_to_end(scheduler, plans)
    assert other.num_cached_tokens == 0  # same tokens, another tenant: no hit in any tier
    again = Request("d", a + [3], SamplingParams(max_tokens=1), cache_salt="s")
    plans.clear()
    scheduler.add(again)
    run_to_end(scheduler, plans)
    assert again.num_cached_tokens == 12  # all three blocks fetched from the host tier
    fetch = [t for t in plans[0].transfers if t.dst is Tier.DEVICE]
    assert len(fetch) == 1 and fetch[0].request_id is None and len(fetch[0].block_ids) == 3
    reads = [i for i, t in enumerate(plans[0].transfers) if t.src is Tier.DEVICE]
    assert all(i < plans[0].transfers.index(fetch[0]) for i in reads)  # reads before writes
    c = lower.counters["host"]
    assert (c.num_hit_blocks, c.num_fetched_blocks, c.num_fetch_decisions) == (3, 3, 1)
    assert c.expected_saved_s > 0
    manager.check_invariants()


def test_a_slow_tier_is_recomputed_and_counted():
    lower = lower_tiers(capacity=8, bytes_per_s=1e3)  # 1 KB/s: a second a block
    manager, scheduler = engine_parts(lower)
    a = list(range(10, 22))
    for rid, prompt in (("a", a + [1]), ("b", list(range(40, 60)) + [1]), ("c", a + [2])):
        r = Request(rid, prompt, SamplingParams(max_tokens=1))
        scheduler.add(r)
        run_to_end(scheduler, [])
    assert r.num_cached_tokens == 0
    c = lower.counters["host"]
    assert (c.num_hit_blocks, c.num_recomputed_blocks, c.num_recompute_decisions) == (3, 3, 1)
    assert c.num_fetched_blocks == 0


def test_a_full_host_tier_drops_its_oldest_after_the_plans_copies():
    lower = lower_tiers(capacity=2)
    manager, scheduler = engine_parts(lower)
    plans = []
    scheduler.add(Request("a", list(range(10, 22)) + [1], SamplingParams(max_tokens=1)))
    run_to_end(scheduler, plans)
    scheduler.add(Request("b", list(range(40, 60)) + [1], SamplingParams(max_tokens=1)))
    run_to_end(scheduler, plans)
    drops = [k for p in plans for k in p.host_drops]
    assert len(drops) == 1 and len(lower.host) == 2  # three copied down, the first dropped
    assert lower.counters["host"].num_evicted_blocks == 1


def test_tier_counters_reach_prometheus():
    from prometheus_client import CollectorRegistry, generate_latest

    from kvserve.server.metrics import _tier_metrics

    lower = lower_tiers(capacity=8)
    manager, scheduler = engine_parts(lower)
    a = list(range(10, 22))
    for rid, prompt in (("a", a + [1]), ("b", list(range(40, 60)) + [1]), ("c", a + [2])):
        scheduler.add(Request(rid, prompt, SamplingParams(max_tokens=1)))
        run_to_end(scheduler, [])

    class Tiers:
        def collect(self):
            return _tier_metrics(lower.snapshots(), ["model_name"], ["m"])

    registry = CollectorRegistry()
    registry.register(Tiers())
    text = generate_latest(registry).decode()
    assert 'kvserve_kv_tier_fetched_blocks_total{model_name="m",tier="host"} 3.0' in text
    assert 'kvserve_kv_tier_recompute_decisions_total{model_name="m",tier="host"} 0.0' in text
    assert 'kvserve_kv_tier_capacity_blocks{model_name="m",tier="host"} 8.0' in text


A_IDS = list(range(10, 22))  # three full blocks


def a_on_disk():
    """A disk tier below a host tier of 8 holding request a's three blocks (an earlier
    process's), a scheduler of 2 sequences over them, and a's block keys."""
    from kvserve.kvcache.prefix_index import chain_keys, root_key

    lower = LowerTiers(TierIndex("host", 8), TransferRate(1e9), PrefillRate(1e-3, 0.0), 1000,
                       BS, TierIndex("disk", 8), TransferRate(1e9))
    manager = BlockManager(BlockPool(12), BS, PrefixIndex(), "m", lower=lower)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64), 64, True,
                          (0,), manager)
    keys = chain_keys(root_key(("m", None, None)), A_IDS, BS)
    for i, key in enumerate(keys):
        lower.disk.insert(key, block(*A_IDS[i * BS:(i + 1) * BS]))
    return lower, scheduler, keys


def test_a_request_loading_from_disk_lets_the_next_one_run():
    from kvserve.kvcache.tiers import LoadResult

    lower, scheduler, keys = a_on_disk()
    a = Request("a", A_IDS + [1], SamplingParams(max_tokens=1))
    b = Request("b", [5, 6, 7], SamplingParams(max_tokens=1))
    scheduler.add(a)
    scheduler.add(b)
    plan = scheduler.schedule()
    assert [s.request_id for s in plan.seqs] == ["b"] and "a" in scheduler.loading
    reads = [op.key for op in plan.tier_io if op.op == "read"]
    assert reads == keys and set(lower.host.pinned) == set(keys)
    scheduler.update(plan, StepResult((SampledToken("b", 5),)))
    lower.loaded([LoadResult("disk", k, True, lower.disk.entries[k]) for k in keys])
    plan = scheduler.schedule()  # a is back, its blocks fetched from the host tier
    assert [s.request_id for s in plan.seqs] == ["a"] and a.num_cached_tokens == 12
    assert not scheduler.loading and not lower.pins and not lower.host.pinned
    assert any(t.dst is Tier.DEVICE and len(t.block_ids) == 3 for t in plan.transfers)


def test_a_request_aborted_while_loading_leaves_nothing_pinned():
    from kvserve.request import FinishReason

    lower, scheduler, _ = a_on_disk()
    a = Request("a", A_IDS + [1], SamplingParams(max_tokens=1))
    scheduler.add(a)
    scheduler.schedule()
    assert "a" in scheduler.loading and lower.host.pinned
    scheduler.finish(a, FinishReason.ABORT)
    assert not scheduler.loading and not scheduler.has_unfinished()
    assert not lower.pins and not lower.host.pinned


def test_prefill_rate_fits_both_terms_from_steps_at_several_contexts():
    truth = PrefillRate(per_token_s=2e-3, attention_ratio=6e-4)  # attention dearer than FLOPs
    fit = PrefillRate(per_token_s=5e-3, attention_ratio=3e-4)  # a start-up probe and a prior
    for start in (0, 2048, 4096, 6144, 0, 1024):
        fit.observe_many([(2048, start)], truth.seconds(2048, start))
    assert fit.per_token_s == pytest.approx(2e-3, rel=1e-6)
    assert fit.attention_ratio == pytest.approx(6e-4, rel=1e-6)
    one = PrefillRate(per_token_s=5e-3, attention_ratio=3e-4)
    one.observe_many([(128, 0)], 2 * one.seconds(128, 0))  # one context only: the average moves
    assert one.attention_ratio == 3e-4 and one.per_token_s > 5e-3


def test_redis_keys_it_did_not_have_are_not_asked_again_at_once():
    from kvserve.kvcache.tiers import MISSING, LoadResult

    now = [0.0]
    lower = LowerTiers(TierIndex("host", 8), TransferRate(1e9), PrefillRate(1e-3, 0.0), 1000,
                       BS, redis_rate=TransferRate(1e9), clock=lambda: now[0])
    keys, tokens = [b"k1", b"k2"], list(range(8))
    assert lower.prefetch("a", keys, tokens, 0)  # asks Redis, waits
    assert [op.op for op in lower.take_ops().redis_ops] == ["get"]
    lower.loaded([LoadResult("redis", k, False, reason=MISSING) for k in keys])
    assert not lower.prefetch("a", keys, tokens, 0)  # its answers are in: admitted
    lower.unpin("a")
    assert not lower.prefetch("b", keys, tokens, 0)  # another request: not asked again
    assert lower.take_ops().redis_ops == ()
    now[0] = 10.0  # later, someone may have computed them
    assert lower.prefetch("c", keys, tokens, 0)
    assert not lower.host.pinned or set(lower.host.pinned) == set(keys)
