"""Block events and the cache snapshot: exact events for a small story of two tenants, the salt
never in clear, a bounded log, the retention seam, immutable snapshots."""

import dataclasses

import pytest

from kvserve.kvcache.block_manager import BlockManager
from kvserve.kvcache.block_pool import BlockPool
from kvserve.kvcache.events import BlockEventKind, EventLog
from kvserve.kvcache.policy import FullHistory
from kvserve.kvcache.prefix_index import PrefixIndex
from kvserve.kvcache.snapshot import CacheSnapshot, PoolSnapshot
from kvserve.request import Request, SamplingParams

BS = 4


def request(rid: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4), cache_salt=salt)


def compute(manager: BlockManager, r: Request) -> None:
    """What the scheduler does for a whole prompt: blocks, computed count, index full blocks."""
    r.num_computed_tokens = manager.match_prefix(r)
    assert manager.allocate_slots(r.request_id, r.num_tokens)
    r.num_computed_tokens = r.num_tokens
    manager.cache_full_blocks(r)


def recording_manager(num_blocks: int, log: EventLog | None = None) -> BlockManager:
    return BlockManager(BlockPool(num_blocks), BS,
                        PrefixIndex(log if log is not None else EventLog(recording=True)), "m")


def test_stored_freed_and_evicted_events_name_block_key_and_tenant_hash():
    manager = recording_manager(3)
    tenant_hash = manager.events.tenant_hash
    a = request("a", list(range(9)), salt="secret-tenant-a")  # 2 full blocks + 1 token
    compute(manager, a)
    events = manager.events.drain()
    assert [(e.kind, e.block_id) for e in events] == [
        (BlockEventKind.STORED, 0), (BlockEventKind.STORED, 1)]
    assert [e.block_key for e in events] == a.block_keys[:2]
    assert {e.tenant for e in events} == {tenant_hash("secret-tenant-a")}
    assert all("secret" not in repr(e) for e in events)  # the salt is never in an event

    manager.free("a")  # tail first: 2, 1, 0
    freed = manager.events.drain()
    assert [(e.kind, e.block_id) for e in freed] == [(BlockEventKind.FREED, b) for b in (2, 1, 0)]
    assert [e.block_key for e in freed] == [None, a.block_keys[1], a.block_keys[0]]

    b = request("b", [50] * 8)  # no salt; needs 2 blocks: the free queue hands out 2, then 1
    compute(manager, b)
    events = manager.events.drain()
    evicted = [e for e in events if e.kind is BlockEventKind.EVICTED]
    assert [(e.block_id, e.block_key, e.tenant) for e in evicted] == [
        (1, a.block_keys[1], tenant_hash("secret-tenant-a"))]
    stored = [e for e in events if e.kind is BlockEventKind.STORED]
    assert [e.tenant for e in stored] == [None, None]
    counts = manager.event_counts()
    assert (counts.num_stored, counts.num_evicted, counts.num_freed) == (4, 1, 3)
    manager.check_invariants()


def test_reset_reports_every_forgotten_block_as_evicted():
    manager = recording_manager(4)
    compute(manager, request("a", list(range(8))))
    manager.events.drain()
    assert manager.reset_prefix_index()
    assert [e.kind for e in manager.events.drain()] == [BlockEventKind.EVICTED] * 2
    assert manager.prefix_snapshot().num_evictions == manager.event_counts().num_evicted == 2


def test_event_log_is_bounded_and_counts_what_it_dropped():
    log = EventLog(max_pending=2, recording=True)
    manager = recording_manager(4, log)
    compute(manager, request("a", list(range(13))))  # 3 stored
    assert log.num_dropped == 1 and log.counts[BlockEventKind.STORED] == 3
    assert [e.block_id for e in log.drain()] == [1, 2]
    assert log.drain() == ()


def test_an_unrecorded_log_keeps_counts_only():
    manager = BlockManager(BlockPool(4), BS, PrefixIndex(), "m")  # nobody records
    compute(manager, request("a", list(range(13))))
    assert manager.events.drain() == () and manager.event_counts().num_stored == 3
    assert manager.events.num_dropped == 0


def test_tenant_hash_is_keyed_stable_short_and_distinct():
    log, other = EventLog(), EventLog()
    assert log.tenant_hash(None) is None
    assert log.tenant_hash("a") == log.tenant_hash("a") != log.tenant_hash("b")
    assert len(log.tenant_hash("a")) == 16
    # keyed per log: a guessable salt cannot be checked against a plain hash of the guess
    assert log.tenant_hash("a") != other.tenant_hash("a")
    shared = bytes(16)
    assert EventLog(tenant_key=shared).tenant_hash("a") == \
        EventLog(tenant_key=shared).tenant_hash("a")


def test_full_history_keeps_every_block():
    policy = FullHistory()
    assert not policy.released_blocks(0, BS) and not policy.released_blocks(900, BS)
    assert policy.exact_blocks(BS) is None and policy.most_tokens_held(900, 8, BS) == 900
    assert BlockManager(BlockPool(2), BS).policy.name == "full"


def test_snapshot_is_immutable_and_derives_waste():
    pool = PoolSnapshot(block_size=4, num_blocks=10, num_used_blocks=3, peak_used_blocks=5)
    snap = CacheSnapshot(cache_mode="paged", kv_cache_dtype="float32", retention="full",
                         bytes_per_token=8, num_bytes_allocated=320, peak_bytes_allocated=320,
                         num_tokens_stored=10, num_preemptions=0, pool=pool)
    assert snap.num_bytes_used == 3 * 4 * 8 and snap.num_waste_bytes == 2 * 8
    assert snap.waste_fraction == pytest.approx(2 / 12) and pool.usage == 0.3
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.num_preemptions = 1
