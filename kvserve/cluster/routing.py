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
    digests: tuple[bytes, ...]  # prefix_view.route_digests of the (first) prompt
    block_size: int


def replica_tag(replica_id: ReplicaID) -> str:
    return replica_id.unique_id


class RoutingState:
    """One per process: the routers of this process write it, the ingress reads it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.views: dict[str, ReplicaView] = {}
        self.stats: dict[str, dict] = {}  # replica -> its last routing stats (engine numbers)
        self.router = ""
        self.decisions: Counter[str] = Counter()  # by Choice.reason
        self.routed: Counter[str] = Counter()  # requests by replica
        self.predicted: dict[str, tuple[str, int]] = {}  # route id -> (replica, tokens)
        self.outcomes: Counter[str] = Counter()  # prediction vs real hit: exact / over / under
        self.predicted_tokens = 0
        self.hit_tokens = 0  # real hits of the requests a prediction was made for
        self._by_internal: dict[str, str] = {}  # Ray's internal request id -> replica

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
            c = choose(self.views, candidates, route.digests, max_imbalance)
            self.decisions[c.reason] += 1
            self.predicted[route.route_id] = (c.replica, c.matched_blocks * route.block_size)
            while len(self.predicted) > 100_000:  # never answered (a lost stream)
                self.predicted.pop(next(iter(self.predicted)))
            return c

    def on_routed(self, tag: str, internal_id: str, route: RouteInfo | None,
                  track_keys: bool) -> None:
        with self.lock:
            view = self.views.setdefault(tag, ReplicaView())
            view.in_flight += 1
            self._by_internal[internal_id] = tag
            if route is not None:  # a generate call (not describe / validate)
                self.routed[tag] += 1
            if track_keys and route is not None and route.digests:
                view.pending[route.route_id] = Pending(list(route.digests), time.time())

    def on_completed(self, internal_id: str) -> None:
        with self.lock:
            tag = self._by_internal.pop(internal_id, None)
            if tag is not None and tag in self.views:
                self.views[tag].in_flight = max(0, self.views[tag].in_flight - 1)

    def prefilled(self, route_id: str, replica: str, num_cached_tokens: int) -> None:
        """The request's first output: its blocks are stored now, and its real hit is known."""
        with self.lock:
            view = self.views.get(replica)
            if view is not None and route_id in view.pending:
                view.pending[route_id].prefilled_at = time.time()
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

    def forget(self, route_id: str) -> None:
        with self.lock:
            self.predicted.pop(route_id, None)
            for view in self.views.values():
                view.pending.pop(route_id, None)


ROUTING = RoutingState()


def route_of(pending: PendingRequest | None) -> RouteInfo | None:
    if pending is None or not pending.args:
        return None
    first = pending.args[0]
    return first if isinstance(first, RouteInfo) else None
