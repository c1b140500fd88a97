"""Property tests (hypothesis) on the pool, block manager and scheduler with no model: random
interleavings of add / step / abort (with preemption forced by a tiny pool) never leak a block,
never drive a reference count below zero, never give one slot to two sequences, and leave every
block free when all requests end."""

from hypothesis import given, settings
from hypothesis import strategies as st

from kvserve.config import SchedulerConfig
from kvserve.kvcache.block_manager import BlockManager
from kvserve.kvcache.block_pool import BlockPool
from kvserve.request import FinishReason, Request, SamplingParams
from kvserve.scheduler.plan import SampledToken, StepResult, Tier
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


def make_scheduler(manager, mode, budget, max_seqs):
    config = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                             preemption_mode=mode)
    return Scheduler(config, max_model_len=NUM_BLOCKS * BLOCK_SIZE, retains_kv=True,
                     eos_token_ids=(EOS,), block_manager=manager)


def abort_one(scheduler, requests, index):
    if requests:
        r = requests[index % len(requests)]
        if not r.status.finished:
            scheduler.finish(r, FinishReason.ABORT)


def drain(scheduler, manager, tokens, check):
    """Step until everything finishes (nothing may deadlock), checking every plan; then every
    block must be free and no request may hold blocks anywhere."""
    for _ in range(2000):
        if not scheduler.has_unfinished():
            break
        plan = scheduler.schedule()
        check(plan)
        fake_step(scheduler, plan, tokens)
        manager.check_invariants()
    assert not scheduler.has_unfinished()
    assert manager.pool.num_free_blocks == NUM_BLOCKS
    assert not manager.tables and not scheduler.swapped


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
    scheduler = make_scheduler(manager, mode, budget, max_seqs)
    requests = []
    for op, a, b in ops:
        if op == "add":
            # three tenants: fair-share preemption runs among the memory-pressure ones
            r = Request(f"r{len(requests)}", [1] * a, SamplingParams(max_tokens=b),
                        tenant=f"t{a % 3}")
            requests.append(r)
            scheduler.add(r)
        elif op == "abort":
            abort_one(scheduler, requests, a)
        else:
            plan = scheduler.schedule()
            check_slots(scheduler, plan)
            fake_step(scheduler, plan, tokens)
        manager.check_invariants()
        assert min(manager.pool.ref_counts) >= 0
    drain(scheduler, manager, tokens, lambda plan: check_slots(scheduler, plan))


def check_kv_contents(scheduler, plan, written, host):
    """Record what each written slot's K/V stands for (salt, every token up to it), then check
    that every running request reads, at each computed position, K/V made from its own salt and
    its own tokens: a prefix hit across salts or over different tokens would show here. Swaps
    copy slot contents out to `host` and back, as the runner does (outs first)."""
    def slots(block_ids):
        return [b * BLOCK_SIZE + i for b in block_ids for i in range(BLOCK_SIZE)]

    redis = host.setdefault("redis", {})  # a shared store: what other processes would read
    for op in plan.tier_io:  # Redis puts read the pool before the copies, as the runner does
        if op.op == "put":
            redis[op.keys[0]] = ([written.get(x) for x in slots((op.block_id,))], op.block)
    for t in plan.transfers:  # in plan order, as the runner does
        if t.dst is Tier.HOST:
            host.update(zip(t.block_keys, ([written.get(x) for x in slots((b,))]
                                           for b in t.block_ids)))
        else:  # a swap-in takes its copies; a hit in the host tier leaves them there
            for b, key in zip(t.block_ids, t.block_keys):
                copy = host.pop(key) if t.request_id is not None else host[key]
                for x, content in zip(slots((b,)), copy):
                    written[x] = content
    disk = host.setdefault("disk", {})  # the disk tier's entries and reads in flight
    for op in plan.tier_io:  # after the copies, before the drops, as the runner does
        if op.op == "write":
            disk[op.key] = host[op.key]
        elif op.op == "read":
            host.setdefault("reads", []).append(("disk", op.key))
        elif op.op == "get":
            host.setdefault("reads", []).extend(("redis", k) for k in op.keys)
        elif op.op == "delete":
            disk.pop(op.key, None)
    for key in plan.host_drops:
        del host[key]
    by_id = {r.request_id: r for r in scheduler.running}
    for s in plan.seqs:
        r = by_id[s.request_id]
        tokens = r.token_ids_between(0, s.start_position + len(s.token_ids))
        for p in range(s.start_position, s.start_position + len(s.token_ids)):
            block = s.block_ids[p // BLOCK_SIZE]
            assert scheduler.blocks.pool.ref_counts[block] == 1, (
                f"{r.request_id} writes block {block}, which another sequence reads")
            written[block * BLOCK_SIZE + p % BLOCK_SIZE] = (r.cache_salt, tuple(tokens[:p + 1]))
    for r in scheduler.running:
        table = scheduler.blocks.tables[r.request_id]
        tokens = r.token_ids_between(0, r.num_computed_tokens)
        for p in range(r.num_computed_tokens):
            slot = table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
            assert written.get(slot) == (r.cache_salt, tuple(tokens[:p + 1])), (
                f"{r.request_id} position {p} reads K/V made for something else")


# Prompts start with one of a few shared prefixes (a block and a half, two blocks, none), so hits
# are common; the tail varies over a two-token alphabet.
PREFIXES = ((), (1, 1, 2, 1, 2, 2), (2, 1, 1, 1, 2, 2, 1, 1))
prompts = st.builds(lambda head, tail: list(head + tuple(tail)) or [1],
                    st.sampled_from(PREFIXES), st.lists(st.integers(1, 2), max_size=8))
prefix_ops = st.lists(st.one_of(
    st.tuples(st.just("add"), prompts, st.integers(1, 8), st.sampled_from([None, "a", "b"])),
    st.tuples(st.just("step"), st.just(()), st.just(0), st.just(None)),
    st.tuples(st.just("abort"), st.just(()), st.integers(0, 30), st.just(None)),
    st.tuples(st.just("reset"), st.just(()), st.just(0), st.just(None)),
), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops=prefix_ops, mode=st.sampled_from(["recompute", "swap"]),
       budget=st.integers(4, 40), max_seqs=st.integers(1, 6),
       tokens=st.lists(st.integers(1, 2), max_size=200),
       host_blocks=st.one_of(st.none(), st.integers(0, 12)),
       disk_blocks=st.one_of(st.none(), st.integers(0, 12)))
def test_prefix_caching_shares_only_same_salt_same_tokens(ops, mode, budget, max_seqs, tokens,
                                                         host_blocks, disk_blocks):
    """Prompts over a two-token alphabet share prefixes often; three salts (None is the shared
    space) must never see each other's blocks, in the pool or through a host tier below it and
    a disk tier below that (host_blocks, disk_blocks: their capacities; None: no tier), whose
    reads land a step later; reference counts return to zero at the end."""
    from kvserve.kvcache.costs import PrefillRate, TransferRate
    from kvserve.kvcache.prefix_index import PrefixIndex
    from kvserve.kvcache.tiers import LoadResult, LowerTiers, TierIndex

    lower = None if host_blocks is None else LowerTiers(
        TierIndex("host", host_blocks), TransferRate(1e9), PrefillRate(1.0, 0.0), 1, BLOCK_SIZE,
        None if disk_blocks is None else TierIndex("disk", disk_blocks), TransferRate(1e9))

    def land_reads():
        """The disk reads issued by the last plan finish: into the host copies, then told."""
        if lower is None or lower.disk is None:
            return
        done = []
        for _, key in host.pop("reads", []):
            entry, block = host["disk"].get(key), lower.disk.entries.get(key)
            if entry is not None and block is not None:
                host[key] = entry
            done.append(LoadResult("disk", key, entry is not None and block is not None, block))
        lower.loaded(done)
    manager = BlockManager(BlockPool(NUM_BLOCKS), BLOCK_SIZE, PrefixIndex(), "m", lower=lower)
    scheduler = make_scheduler(manager, mode, budget, max_seqs)
    requests, written, host = [], {}, {}
    for op, prompt, n, salt in ops:
        if op == "add":
            r = Request(f"r{len(requests)}", list(prompt), SamplingParams(max_tokens=n),
                        cache_salt=salt, tenant=salt)
            requests.append(r)
            scheduler.add(r)
        elif op == "abort":
            abort_one(scheduler, requests, n)
        elif op == "reset":
            manager.prefix_index.reset()
        else:
            land_reads()
            plan = scheduler.schedule()
            check_kv_contents(scheduler, plan, written, host)
            fake_step(scheduler, plan, tokens)
        manager.check_invariants()

    def check(plan):
        check_kv_contents(scheduler, plan, written, host)
        land_reads()

    drain(scheduler, manager, tokens, check)
    assert not any(manager.pool.ref_counts)
    if lower is not None:  # the tier's index and the copies agree; parked blocks all returned
        assert set(lower.host.entries) == {k for k in host if isinstance(k, bytes)}
        assert lower.host.num_parked == 0 and len(lower.host) <= host_blocks


def test_a_disk_tier_below_a_small_host_tier_keeps_every_read_exact():
    """Seeded random traffic over a host tier of 3 blocks and a disk tier of 12 (so blocks do
    travel down and back up): every K/V a request reads is its own salt's and tokens' (the
    same check as above), and the disk reads really happen."""
    assert sum(tier_round(seed, redis=False)["disk"] for seed in range(100)) > 100


def test_a_shared_redis_tier_keeps_every_read_exact():
    """The same through a Redis tier (write-through puts of what the pool caches, reads of
    the runs past the local hits, answered a step later, "missing" when absent), below a host
    tier of 3 blocks and a disk tier of 12: every read is its own salt's and tokens'."""
    assert sum(tier_round(seed, redis=True)["redis"] for seed in range(100)) > 10


def tier_round(seed: int, redis: bool) -> dict[str, int]:
    """One seeded run; returns how many reads landed from each tier below the host."""
    import random

    from kvserve.kvcache.costs import PrefillRate, TransferRate
    from kvserve.kvcache.prefix_index import PrefixIndex
    from kvserve.kvcache.tiers import MISSING, LoadResult, LowerTiers, TierIndex

    rnd = random.Random(seed)
    lower = LowerTiers(TierIndex("host", 3), TransferRate(1e9), PrefillRate(1.0, 0.0), 1,
                       BLOCK_SIZE, TierIndex("disk", 12), TransferRate(1e9),
                       TransferRate(1e9) if redis else None)
    manager = BlockManager(BlockPool(NUM_BLOCKS), BLOCK_SIZE, PrefixIndex(), "m", lower=lower)
    scheduler = make_scheduler(manager, rnd.choice(["swap", "recompute"]), 16, 3)
    written, host, loaded = {}, {}, {"disk": 0, "redis": 0}
    tokens = [rnd.randint(1, 2) for _ in range(200)]

    def check(plan):
        check_kv_contents(scheduler, plan, written, host)
        done = []
        for tier, key in host.pop("reads", []):
            if tier == "redis":
                entry = host["redis"].get(key)
                if entry is None:
                    done.append(LoadResult("redis", key, False, reason=MISSING))
                else:
                    host[key] = entry[0]
                    done.append(LoadResult("redis", key, True, entry[1]))
                continue
            entry, block = host["disk"].get(key), lower.disk.entries.get(key)
            if entry is not None and block is not None:
                host[key] = entry
            done.append(LoadResult("disk", key, entry is not None and block is not None, block))
        for d in done:
            loaded[d.tier] += d.ok
        lower.loaded(done)

    for i in range(40):
        if rnd.random() < 0.4:
            ids = list(rnd.choice(PREFIXES)) + [rnd.randint(1, 2) for _ in range(rnd.randint(0, 6))]
            scheduler.add(Request(f"r{i}", ids or [1], SamplingParams(max_tokens=rnd.randint(1, 6)),
                                  cache_salt=rnd.choice([None, "a"])))
        else:
            plan = scheduler.schedule()
            check(plan)
            fake_step(scheduler, plan, tokens)
        manager.check_invariants()
        if redis and rnd.random() < 0.1:  # the local tiers forget: only Redis still holds them
            lower.demote_host(drop=True)
            lower.forget_disk()
    drain(scheduler, manager, tokens, check)
    assert not lower.pins and not lower.host.pinned
    return loaded
