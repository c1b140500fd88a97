"""The cache-aware router's view of the replicas and its choice (kvserve/cluster/prefix_view.py):
route digests are the engine's own block keys, replicas' key sets follow their KV events, and
the choice trades the longest cached run against load. No Ray, no torch."""

import random

import pytest

from kvserve.cluster.prefix_view import (
    DIGEST_BYTES,
    MAX_PENDING,
    PENDING_TTL_S,
    REPORT_GRACE_S,
    Pending,
    ReplicaKeys,
    ReplicaView,
    choose,
    route_digests,
    unpack,
)
from kvserve.kvcache.block_manager import BlockManager
from kvserve.kvcache.block_pool import BlockPool
from kvserve.kvcache.events import BlockEvent, BlockEventKind
from kvserve.kvcache.prefix_index import PrefixIndex
from kvserve.request import Request, SamplingParams


def engine_keys(tokens: list[int], salt: str | None, block_size: int = 4) -> list[bytes]:
    """The keys the block manager itself chains for a request's prompt."""
    m = BlockManager(BlockPool(64), block_size, PrefixIndex(), model_key="m|float32|float32")
    r = Request("r", list(tokens), SamplingParams(max_tokens=1), cache_salt=salt)
    m.match_prefix(r)
    return r.block_keys


def test_route_digests_are_the_engines_block_keys_short_of_the_last_token():
    tokens = list(range(100, 118))  # 18 tokens: 4 full blocks usable (the last token computes)
    for salt in (None, "tenant:a"):
        keys = engine_keys(tokens, salt)
        digests = route_digests("m|float32|float32", salt, tokens, 4)
        assert digests == [k[:DIGEST_BYTES] for k in keys[:4]] and len(digests) == 4
    assert route_digests("m|float32|float32", "tenant:a", tokens, 4) != \
        route_digests("m|float32|float32", "tenant:b", tokens, 4)  # tenants never match
    assert route_digests("m", None, list(range(16)), 4) == \
        route_digests("m", None, list(range(17)), 4)[:3]  # 16 tokens: the last block computes


def test_replica_keys_follow_stored_and_evicted_events_of_group_zero_only():
    keys = ReplicaKeys()
    a, b = bytes(range(32)), bytes(range(1, 33))
    keys.apply([BlockEvent(BlockEventKind.STORED, 1, a), BlockEvent(BlockEventKind.STORED, 2, b),
                BlockEvent(BlockEventKind.STORED, 3, a + b"\x01"),  # another KV group's key
                BlockEvent(BlockEventKind.FREED, 2, None)])
    assert unpack(keys.packed()) == {a[:8], b[:8]}
    keys.apply([BlockEvent(BlockEventKind.STORED, 4, a)])  # the same key in two blocks
    keys.apply([BlockEvent(BlockEventKind.EVICTED, 1, a)])
    assert unpack(keys.packed()) == {a[:8], b[:8]}
    keys.apply([BlockEvent(BlockEventKind.EVICTED, 4, a), BlockEvent(BlockEventKind.EVICTED, 2, b)])
    assert keys.packed() == b""


def view(held: list[bytes], in_flight: int = 0) -> ReplicaView:
    v = ReplicaView()
    v.report(b"".join(held), at=1.0)
    v.in_flight = in_flight
    return v


D = [bytes([i]) * 8 for i in range(6)]


def test_the_longest_run_wins_and_a_run_stops_at_the_first_miss():
    views = {"x": view(D[:2]), "y": view(D[:4]), "z": view([D[0], D[2], D[3]])}
    c = choose(views, ["x", "y", "z"], D[:5], max_imbalance=4)
    assert (c.replica, c.matched_blocks, c.reason) == ("y", 4, "prefix")
    assert views["z"].run_of(D[:5]) == 1


def test_a_match_too_busy_gives_way_to_the_least_busy_and_no_match_goes_there_too():
    views = {"x": view(D[:4], in_flight=6), "y": view([], in_flight=1)}
    c = choose(views, ["x", "y"], D[:4], max_imbalance=4)
    assert (c.replica, c.matched_blocks, c.best_blocks, c.reason) == ("y", 0, 4, "load")
    views["x"].in_flight = 5  # 4 more than y: still within the bound
    assert choose(views, ["x", "y"], D[:4], max_imbalance=4).replica == "x"
    c = choose(views, ["x", "y"], [bytes([9]) * 8], max_imbalance=4)
    assert (c.replica, c.reason) == ("y", "no-match")


def test_equal_runs_go_to_the_least_busy_and_ties_spread():
    views = {"x": view(D[:3], in_flight=2), "y": view(D[:3], in_flight=1)}
    assert choose(views, ["x", "y"], D[:3], max_imbalance=4).replica == "y"
    views = {"x": view([]), "y": view([])}
    rng = random.Random(0)
    picks = {choose(views, ["x", "y"], D[:1], 4, rng).replica for _ in range(20)}
    assert picks == {"x", "y"}


def test_keys_sent_count_until_reports_surely_show_them():
    v = view([])
    v.add_pending("r1", Pending(D[:3], routed_at=100.0))
    assert v.run_of(D[:3]) == 3
    v.expire(150.0)  # not prefilled yet, within the TTL: still counts
    assert v.run_of(D[:3]) == 3
    v.pending["r1"].prefilled_at = 151.0
    v.expire(151.0 + REPORT_GRACE_S / 2)  # prefilled, a report may not show it yet
    assert v.run_of(D[:3]) == 3
    v.expire(151.0 + REPORT_GRACE_S + 0.1)  # reports say it now, alone
    assert v.run_of(D[:3]) == 0 and not v.pending
    v.add_pending("r2", Pending(D[:2], routed_at=0.0))
    v.add_pending("r3", Pending(D[:1], routed_at=0.0))
    v.drop_pending("r2")
    assert v.run_of(D[:2]) == 1  # r3 still holds D[0]
    v.expire(PENDING_TTL_S + 1)  # never answered: forgotten
    assert not v.pending and v.run_of(D[:1]) == 0
    for i in range(MAX_PENDING + 5):  # bounded: the oldest go
        v.add_pending(f"q{i}", Pending(D[:1], routed_at=0.0))
    assert len(v.pending) == MAX_PENDING and "q0" not in v.pending


def test_a_burst_is_placed_as_it_is_chosen_and_the_imbalance_bound_holds():
    """Concurrent routing tasks see each other's choices: keys and load count from the choice,
    before Ray's accept round trip; Ray sending it elsewhere moves them; completion ends them."""
    pytest.importorskip("ray.serve")
    from kvserve.cluster.routing import RouteInfo, RoutingState

    s = RoutingState()
    routes = [RouteInfo(f"r{i}", tuple(D[:3]), 16) for i in range(4)]
    picks = [s.choose(["x", "y"], r, max_imbalance=1) for r in routes]
    first = picks[0].replica
    other = "y" if first == "x" else "x"
    assert [p.replica for p in picks] == [first, first, other, other]
    assert [p.reason for p in picks] == ["no-match", "prefix", "load", "prefix"]
    assert s.views[first].in_flight == 2 and s.views[other].in_flight == 2
    s.on_routed(other, "internal-1", routes[1])  # Ray had to send r1 elsewhere
    assert s.views[first].in_flight == 1 and s.views[other].in_flight == 3
    assert "r1" in s.views[other].pending and "r1" not in s.views[first].pending
    s.on_completed("internal-1")
    assert s.views[other].in_flight == 2
    s.forget("r2", keys_too=True)  # ended before any output: its keys were never computed
    assert "r2" not in s.views[other].pending
    avoid = RouteInfo("r9", tuple(D[:3]), 16, avoid=(first,))
    assert s.choose(["x", "y"], avoid, max_imbalance=8).replica == other
