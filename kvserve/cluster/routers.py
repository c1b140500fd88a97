"""Ray Serve request routers for the engine replicas (Ray's request-router API):

- CacheAwareRouter: the replica holding the longest run of the prompt's block keys (exact keys,
  salted per tenant, from the replicas' KV events), unless it is busier than the least busy by
  more than max_imbalance requests; nothing matching: the least busy.
- RoundRobinRouter: each replica in turn (a baseline for `kvserve bench route`).
- PowerOfTwoRouter: Ray Serve's default (two random replicas, the shorter queue), unchanged but
  for reporting to routing.ROUTING like the others.

Ray pickles this module by value into the process that routes (the ingress): shared state is
reached as routing.ROUTING (a module pickled by reference), never bound here.
"""

from __future__ import annotations

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from kvserve.cluster import routing

DEFAULT_MAX_IMBALANCE = 4


class _Reporting:
    """What every router here adds to its Ray base: routing.ROUTING follows the replicas, the
    requests routed and completed."""

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        routing.ROUTING.router = self.name
        routing.ROUTING.refresh(replicas)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result) -> None:
        routing.ROUTING.on_routed(routing.replica_tag(replica_id),
                                  pending_request.metadata.internal_request_id,
                                  routing.route_of(pending_request))

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        routing.ROUTING.on_completed(internal_request_id)


class CacheAwareRouter(_Reporting, RequestRouter):
    name = "cache-aware"

    def initialize_state(self, max_imbalance: int = DEFAULT_MAX_IMBALANCE, **kwargs) -> None:
        self.max_imbalance = max_imbalance

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        route = routing.route_of(pending_request)
        if route is None or not candidate_replicas:  # describe / check calls: anyone
            return [list(candidate_replicas)]
        by_tag = {routing.replica_tag(r.replica_id): r for r in candidate_replicas}
        c = routing.ROUTING.choose(list(by_tag), route, getattr(self, "max_imbalance",
                                                          DEFAULT_MAX_IMBALANCE))
        first = by_tag[c.replica]
        return [[first], [r for r in candidate_replicas if r is not first]]


class RoundRobinRouter(_Reporting, RequestRouter):
    name = "round-robin"

    def initialize_state(self, **kwargs) -> None:
        self._next = 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if routing.route_of(pending_request) is None or not candidate_replicas:
            return [list(candidate_replicas)]  # describe / validate calls: anyone
        ordered = sorted(candidate_replicas, key=lambda r: routing.replica_tag(r.replica_id))
        i = getattr(self, "_next", 0) % len(ordered)
        self._next = i + 1
        return [[r] for r in ordered[i:] + ordered[:i]]  # one a rank: Ray takes the first free


class PowerOfTwoRouter(_Reporting, PowerOfTwoChoicesRequestRouter):
    name = "pow2"


ROUTER_CLASSES = {"cache-aware": CacheAwareRouter, "pow2": PowerOfTwoRouter,
                  "round-robin": RoundRobinRouter}

