"""Property tests (hypothesis) on the pool, block manager and scheduler with no model: random
interleavings of add / step / abort (with preemption forced by a tiny pool) never leak a block,
never drive a reference count below zero, never give one slot to two sequences, and leave every
block free when all requests end."""

from hypothesis import given, settings
from hypothesis import strategies as st

from kvserve.cache.block_manager import BlockManager
from kvserve.cache.block_pool import BlockPool
from kvserve.config import SchedulerConfig
from kvserve.request import FinishReason, Request, SamplingParams
from kvserve.scheduler.plan import SampledToken, StepResult
from kvserve.scheduler.scheduler import Scheduler

BLOCK_SIZE = 4
NUM_BLOCKS = 8
EOS = 0


def check_slots(scheduler, plan):
    """Every scheduled token's slot belongs to exactly one sequence."""
    owner = {}
    for s in plan.seqs:
        for p in range(s.start_position, s.start_position + len(s.token_ids)):
            slot = s.block_ids[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
            assert owner.setdefault(slot, s.request_id) == s.request_id, "slot shared"
    tables = scheduler.blocks.tables
    for r in scheduler.waiting:  # a waiting request never sits on device blocks
        assert r.request_id not in tables, f"waiting {r.request_id} holds blocks"
    seen = {}
    for rid, table in tables.items():
        for b in table:
            assert seen.setdefault(b, rid) == rid, f"block {b} in two tables"


def fake_step(scheduler, plan, rng_tokens):
    sampled = tuple(SampledToken(s.request_id, rng_tokens.pop() if rng_tokens else 7)
                    for s in plan.seqs if s.sample)
    return scheduler.update(plan, StepResult(sampled))


ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 20), st.integers(1, 12)),
    st.tuples(st.just("step"), st.just(0), st.just(0)),
    st.tuples(st.just("abort"), st.integers(0, 30), st.just(0)),
), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops=ops, mode=st.sampled_from(["recompute", "swap"]),
       budget=st.integers(4, 40), max_seqs=st.integers(1, 6),
       tokens=st.lists(st.integers(0, 9), max_size=200))
def test_random_interleavings_keep_blocks_consistent(ops, mode, budget, max_seqs, tokens):
    manager = BlockManager(BlockPool(NUM_BLOCKS), BLOCK_SIZE)
    config = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                             preemption_mode=mode)
    scheduler = Scheduler(config, max_model_len=NUM_BLOCKS * BLOCK_SIZE, retains_kv=True,
                          eos_token_ids=(EOS,), block_manager=manager)
    requests = []
    for op, a, b in ops:
        if op == "add":
            r = Request(f"r{len(requests)}", [1] * a, SamplingParams(max_tokens=b))
            requests.append(r)
            scheduler.add(r)
        elif op == "abort" and requests:
            r = requests[a % len(requests)]
            if not r.status.finished:
                scheduler.finish(r, FinishReason.ABORT)
        else:
            plan = scheduler.schedule()
            check_slots(scheduler, plan)
            fake_step(scheduler, plan, tokens)
        manager.check_invariants()
        assert min(manager.pool.ref_counts) >= 0
    for _ in range(2000):  # drain: everything must finish, nothing deadlocks
        if not scheduler.has_unfinished():
            break
        plan = scheduler.schedule()
        check_slots(scheduler, plan)
        fake_step(scheduler, plan, tokens)
        manager.check_invariants()
    assert not scheduler.has_unfinished()
    assert manager.pool.num_free_blocks == NUM_BLOCKS
    assert not manager.tables and not scheduler.swapped
