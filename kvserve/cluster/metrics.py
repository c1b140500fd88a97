"""What /metrics adds on a cluster's ingress: each replica's engine (its last report) and the
router's state, decisions and how right its hit predictions were. Read at scrape time."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvserve.cluster.routing import RoutingState

_REPLICA_GAUGES = (
    ("num_requests_running", "num_running", "Sequences in the replica's running batch."),
    ("num_requests_waiting", "num_waiting", "Sequences waiting in the replica's scheduler."),
    ("kv_cache_usage_ratio", "kv_usage", "Fraction of the replica's KV blocks held by live "
     "requests."),
    ("kv_cache_blocks_used", "blocks_used", "KV blocks held by live requests."),
    ("kv_cache_blocks_total", "blocks_total", "KV blocks in the replica's pool."),
    ("prefix_cache_blocks", "cached_blocks", "Blocks the replica's prefix cache can hand out."),
)
_REPLICA_COUNTERS = (
    ("prefix_cache_queried_tokens", "queried_tokens", "Prompt tokens looked up in the "
     "replica's prefix cache."),
    ("prefix_cache_hit_tokens", "hit_tokens", "Prompt tokens found in the replica's prefix "
     "cache."),
    ("num_preemptions", "preemptions", "Requests the replica preempted."),
    ("engine_steps", "num_steps", "Engine steps the replica ran."),
)


class ClusterCollector:
    def __init__(self, state: RoutingState, remote) -> None:
        self.state, self.remote = state, remote

    def describe(self):
        return []

    def collect(self):
        s = self.state
        with s.lock:
            stats = {tag: dict(v) for tag, v in s.stats.items()}
            views = {tag: (len(v.reported), len(v.pending), v.in_flight)
                     for tag, v in s.views.items()}
            decisions, routed, outcomes = dict(s.decisions), dict(s.routed), dict(s.outcomes)
            predicted, hit = s.predicted_tokens, s.hit_tokens
            router = s.router
        g = GaugeMetricFamily("kvserve_cluster_replicas", "Engine replicas the router sees.",
                              labels=["router"])
        g.add_metric([router or "none"], len(views))
        yield g
        for suffix, key, doc in _REPLICA_GAUGES:
            g = GaugeMetricFamily(f"kvserve_replica_{suffix}", doc, labels=["replica"])
            for tag, r in sorted(stats.items()):
                g.add_metric([tag], r.get(key, 0))
            yield g
        g = GaugeMetricFamily("kvserve_replica_pid", "The replica's process id, on its node.",
                              labels=["replica"])
        for tag, r in sorted(stats.items()):
            g.add_metric([tag], r.get("pid", 0))
        yield g
        for suffix, index, doc in (("hit_blocks", 0, "Blocks found in this tier past the "
                                    "replica's pool hits."),
                                   ("fetched_blocks", 1, "Blocks brought up from this tier."),
                                   ("stored_blocks", 2, "Blocks copied into this tier.")):
            c = CounterMetricFamily(f"kvserve_replica_kv_tier_{suffix}", doc,
                                    labels=["replica", "tier"])
            for tag, r in sorted(stats.items()):
                for tier, values in sorted(r.get("tiers", {}).items()):
                    c.add_metric([tag, tier], values[index])
            yield c
        for suffix, key, doc in _REPLICA_COUNTERS:
            c = CounterMetricFamily(f"kvserve_replica_{suffix}", doc, labels=["replica"])
            for tag, r in sorted(stats.items()):
                c.add_metric([tag], r.get(key, 0))
            yield c
        for suffix, index, doc in (
                ("reported_blocks", 0, "Cached blocks the replica last reported holding."),
                ("pending_requests", 1, "Requests routed there whose blocks it has not "
                 "reported yet (counted as held)."),
                ("in_flight_requests", 2, "Requests routed there and not completed.")):
            g = GaugeMetricFamily(f"kvserve_router_{suffix}", doc, labels=["replica"])
            for tag, v in sorted(views.items()):
                g.add_metric([tag], v[index])
            yield g
        c = CounterMetricFamily("kvserve_router_requests", "Generate calls routed, by replica.",
                                labels=["replica"])
        for tag, n in sorted(routed.items()):
            c.add_metric([tag], n)
        yield c
        c = CounterMetricFamily("kvserve_router_decisions", "Cache-aware choices: prefix (the "
                                "longest match), load (the match was too busy), no-match.",
                                labels=["reason"])
        for reason in ("prefix", "load", "no-match"):
            c.add_metric([reason], decisions.get(reason, 0))
        yield c
        c = CounterMetricFamily("kvserve_router_predictions", "Predicted prefix hits against "
                                "the replica's real hit: exact, over, under.",
                                labels=["outcome"])
        for outcome in ("exact", "over", "under"):
            c.add_metric([outcome], outcomes.get(outcome, 0))
        yield c
        yield CounterMetricFamily("kvserve_router_predicted_hit_tokens", "Prompt tokens the "
                                  "router predicted the chosen replica holds.", value=predicted)
        yield CounterMetricFamily("kvserve_router_real_hit_tokens", "Prompt tokens those "
                                  "replicas really found in their prefix cache.", value=hit)
        yield CounterMetricFamily("kvserve_cluster_retries", "Requests sent to another replica "
                                  "after theirs failed before a first output.",
                                  value=self.remote.num_retries)
        yield CounterMetricFamily("kvserve_cluster_failed_midstream", "Requests ended with an "
                                  "error because their replica failed after a first output.",
                                  value=self.remote.num_failed_midstream)
