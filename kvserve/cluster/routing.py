"""What the routers of a process share with the ingress in that process (ROUTING: what each
replica reported, the cache-aware choices and how right they were), and what a generate call
carries for them (RouteInfo). The Ray Serve router classes are routers.py's: Ray pickles their
module by value, so they reach this state through this module, never a copy of it.

A handle's router lives in the process that holds the handle: here the ingress replica, whose
RemoteEngine reads ROUTING for /metrics and tells it what each request really hit.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica

from kvserve.cluster.prefix_view import Choice, Pending, ReplicaView, choose


@dataclass(frozen=True)
class RouteInfo:
    """The first argument of every generate call: what a router reads to place it."""

    route_id: str
    digests: tuple[bytes, ...]  # prefix_view.route_digests of the (first) prompt; () = none
    block_size: int
    num_seqs: int = 1  # sequences the call carries (its weight in the load)
    avoid: tuple[str, ...] = ()  # replicas that failed this request already


def replica_tag(replica_id: ReplicaID) -> str:
    return replica_id.unique_id


MAX_TRACKED = 100_000  # predictions / placements kept for requests never answered


class RoutingState:
    """One per process: the routers of this process write it, the ingress reads it.

    A cache-aware choice places the request at once (its keys count as held there, its
    sequences as in flight), before Ray's accept round trip: concurrent routing tasks see each
    other's choices. on_routed moves it if Ray sent it elsewhere (the chosen replica refused);
    on_completed ends it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.views: dict[str, ReplicaView] = {}
        self.stats: dict[str, dict] = {}  # replica -> its last routing stats (engine numbers)
        self.router = ""
        self.decisions: Counter[str] = Counter()  # by Choice.reason
        self.routed: Counter[str] = Counter()  # generate calls by replica
        self.predicted: dict[str, tuple[str, int]] = {}  # route id -> (replica, tokens)
        self.outcomes: Counter[str] = Counter()  # prediction vs real hit: exact / over / under
        self.predicted_tokens = 0
        self.hit_tokens = 0  # real hits of the requests a prediction was made for
        self._placed: dict[str, tuple[str, int]] = {}  # route id -> (replica, weight)
        self._by_internal: dict[str, str] = {}  # Ray's internal request id -> route id

    def refresh(self, replicas: list[RunningReplica]) -> None:
        """Take the replicas' latest reports (routing stats); forget replicas that are gone."""
        with self.lock:
            live = set()
            for r in replicas:
                tag = replica_tag(r.replica_id)
                live.add(tag)
                stats = r.routing_stats or {}
                view = self.views.setdefault(tag, ReplicaView())
                if "keys" in stats:
                    view.report(stats["keys"], stats.get("at", 0.0))
                    self.stats[tag] = {k: v for k, v in stats.items() if k != "keys"}
            for tag in set(self.views) - live:
                del self.views[tag]
                self.stats.pop(tag, None)

    def choose(self, candidates: list[str], route: RouteInfo, max_imbalance: int) -> Choice:
        with self.lock:
            now = time.monotonic()
            for tag in candidates:
                self.views.setdefault(tag, ReplicaView()).expire(now)
            c = choose(self.views, candidates, route.digests, max_imbalance, avoid=route.avoid)
            self.decisions[c.reason] += 1
            self.predicted[route.route_id] = (c.replica, c.matched_blocks * route.block_size)
            _trim(self.predicted)
            self._place(route, c.replica, track_keys=True)
            return c

    def _place(self, route: RouteInfo, tag: str, track_keys: bool) -> None:
        self._unplace(route.route_id)
        view = self.views.setdefault(tag, ReplicaView())
        view.in_flight += route.num_seqs
        self._placed[route.route_id] = (tag, route.num_seqs)
        _trim(self._placed)
        if track_keys and route.digests:
            view.add_pending(route.route_id, Pending(list(route.digests), time.monotonic(),
                                                     weight=route.num_seqs))

    def _unplace(self, route_id: str) -> Pending | None:
        placed = self._placed.pop(route_id, None)
        if placed is None:
            return None
        tag, weight = placed
        view = self.views.get(tag)
        if view is None:
            return None
        view.in_flight = max(0, view.in_flight - weight)
        return view.drop_pending(route_id)

    def on_routed(self, tag: str, internal_id: str, route: RouteInfo | None) -> None:
        if route is None:  # describe / validate: not load that routing weighs
            return
        with self.lock:
            self.routed[tag] += 1
            self._by_internal[internal_id] = route.route_id
            _trim(self._by_internal)
            placed = self._placed.get(route.route_id)
            if placed is None or placed[0] != tag:  # not chosen here, or Ray sent it elsewhere
                pending = self._unplace(route.route_id)
                self._place(route, tag, track_keys=pending is not None)
                self.predicted.pop(route.route_id, None)  # it was for another replica

    def on_completed(self, internal_id: str) -> None:
        with self.lock:
            route_id = self._by_internal.pop(internal_id, None)
            placed = self._placed.pop(route_id, None) if route_id is not None else None
            if placed is not None and placed[0] in self.views:
                view = self.views[placed[0]]
                view.in_flight = max(0, view.in_flight - placed[1])  # its keys stay pending

    def prefilled(self, route_id: str, replica: str, num_cached_tokens: int) -> None:
        """The request's first output: its blocks are stored now, and its real hit is known."""
        with self.lock:
            view = self.views.get(replica)
            if view is not None and route_id in view.pending:
                view.pending[route_id].prefilled_at = time.monotonic()
            guess = self.predicted.pop(route_id, None)
            if guess is None:
                return
            chosen, tokens = guess
            if chosen != replica:  # retried elsewhere: the prediction was for another replica
                return
            self.predicted_tokens += tokens
            self.hit_tokens += num_cached_tokens
            self.outcomes["exact" if tokens == num_cached_tokens else
                          "over" if tokens > num_cached_tokens else "under"] += 1

    def forget(self, route_id: str, keys_too: bool) -> None:
        """A request ended: its prediction goes; its keys too if it never prefilled."""
        with self.lock:
            self.predicted.pop(route_id, None)
            if keys_too:
                for view in self.views.values():
                    view.drop_pending(route_id)


def _trim(d: dict) -> None:
    while len(d) > MAX_TRACKED:
        d.pop(next(iter(d)))


ROUTING = RoutingState()


def route_of(pending: PendingRequest | None) -> RouteInfo | None:
    if pending is None or not pending.args:
        return None
    first = pending.args[0]
    return first if isinstance(first, RouteInfo) else None
