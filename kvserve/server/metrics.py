"""Prometheus metrics for GET /metrics, in a registry of the server's own.

Gauges and cumulative engine counters (running / waiting, and from the KV cache snapshot: usage,
prefix-cache queries and hits, preemptions, block events) are read from the engine's latest stats
at scrape time; latencies and
token counts are observed by the handlers as each sequence's outputs arrive, from the engine's own
timestamps (arrival, and the end of the step that made each token). Latencies are per sequence:
a request with n = 4 adds four TTFT observations, as it holds four sequences' worth of work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvserve.engine.stream import EngineStats, StreamOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class _EngineCollector:
    """Reads the engine snapshot at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str):
        self.stats = stats
        self.labels = {"model_name": model_name}

    def describe(self):
        return []

    def collect(self):
        s = self.stats()
        names, values = list(self.labels), list(self.labels.values())

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(values, value)
            return c

        yield gauge("kvserve_num_requests_running", "Sequences in the running batch.",
                    s.num_running)
        yield gauge("kvserve_num_requests_waiting", "Sequences waiting to be admitted.",
                    s.num_waiting)
        yield counter("kvserve_engine_step_errors", "Engine steps that raised an error.",
                      s.num_step_errors)
        kv = s.kv
        if kv is None:
            return
        pool, prefix, events = kv.pool, kv.prefix, kv.events
        yield gauge("kvserve_kv_cache_usage_ratio",
                    "Fraction of KV blocks held by live requests (1 = full).",
                    pool.usage if pool else 0.0)
        yield gauge("kvserve_kv_cache_blocks_used", "KV blocks held by live requests.",
                    pool.num_used_blocks if pool else 0)
        yield gauge("kvserve_kv_cache_blocks_total", "KV blocks in the pool.",
                    pool.num_blocks if pool else 0)
        yield gauge("kvserve_kv_cache_bytes_per_token",
                    f"Bytes of K and V per token ({kv.kv_cache_dtype}).", kv.bytes_per_token)
        yield counter("kvserve_prefix_cache_queried_tokens",
                      "Prompt tokens looked up in the prefix cache.",
                      prefix.num_queried_tokens if prefix else 0)
        yield counter("kvserve_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.",
                      prefix.num_hit_tokens if prefix else 0)
        yield gauge("kvserve_prefix_cache_blocks", "Blocks the prefix cache can hand out again.",
                    prefix.num_cached_blocks if prefix else 0)
        yield counter("kvserve_num_preemptions", "Requests preempted to free KV blocks.",
                      kv.num_preemptions)
        if kv.quant_check is not None:  # a quantized KV format: the start-up guardrail's figures
            q = kv.quant_check
            yield gauge("kvserve_kv_quant_check_mean_kl",
                        f"Mean KL divergence (nats) of next-token distributions, "
                        f"{q.kv_cache_dtype} vs {q.reference} K/V, calibration text.", q.mean_kl)
            yield gauge("kvserve_kv_quant_check_top1_agreement",
                        f"Fraction of calibration positions whose top token is the same with "
                        f"{q.kv_cache_dtype} as with {q.reference} K/V.", q.top1_agreement)
            yield gauge("kvserve_kv_quant_check_perplexity",
                        f"Calibration text perplexity with {q.kv_cache_dtype} K/V.", q.perplexity)
            yield gauge("kvserve_kv_quant_check_perplexity_reference",
                        f"Calibration text perplexity with {q.reference} K/V.",
                        q.perplexity_reference)
        yield from _tier_metrics(kv.tiers, names, values)
        c = CounterMetricFamily("kvserve_kv_block_events",
                                "KV block events: stored in the prefix index, evicted from it, "
                                "freed by every holder.", labels=[*names, "event"])
        for kind, value in (("stored", events.num_stored), ("evicted", events.num_evicted),
                            ("freed", events.num_freed)):
            c.add_metric([*values, kind], value)
        yield c
        yield counter("kvserve_kv_block_events_dropped",
                      "Recorded block events pushed out of the bounded log before anyone read "
                      "them.", events.num_dropped)


_TIER_COUNTERS = (
    ("hit_blocks", "num_hit_blocks", "Blocks found in this tier past the device pool's hits."),
    ("fetched_blocks", "num_fetched_blocks", "Blocks brought up from this tier (fetch chosen)."),
    ("recomputed_blocks", "num_recomputed_blocks",
     "Blocks found in this tier but recomputed (the cost model chose recompute)."),
    ("fetch_decisions", "num_fetch_decisions", "Runs of hits the cost model chose to fetch."),
    ("recompute_decisions", "num_recompute_decisions",
     "Runs of hits the cost model chose to recompute."),
    ("stored_blocks", "num_stored_blocks", "Blocks copied into this tier."),
    ("evicted_blocks", "num_evicted_blocks", "Blocks this tier's LRU pushed out."),
    ("bytes_in", "num_bytes_in", "Bytes copied into this tier."),
    ("bytes_out", "num_bytes_out", "Bytes brought up from this tier."),
    ("expected_saved_seconds", "expected_saved_s",
     "Expected prefill seconds saved by fetches (recompute estimate minus fetch estimate)."),
)


def _tier_metrics(tiers, names: list[str], values: list[str]):
    """The prefix cache's tiers below the pool (offload), one label value per tier."""
    if not tiers:
        return
    labels = [*names, "tier"]
    for suffix, attr, doc in _TIER_COUNTERS:
        c = CounterMetricFamily(f"kvserve_kv_tier_{suffix}", doc, labels=labels)
        for t in tiers:
            c.add_metric([*values, t.name], getattr(t.counters, attr))
        yield c
    for suffix, doc, read in (
            ("blocks", "Cached blocks this tier holds.", lambda t: t.num_blocks),
            ("capacity_blocks", "Blocks this tier can hold.", lambda t: t.capacity_blocks),
            ("parked_blocks", "Swapped-out blocks of preempted requests held in this tier.",
             lambda t: t.num_parked_blocks),
            ("bandwidth_bytes_per_second", "The cost model's current bandwidth of this tier "
             "(measured at start-up, then from real copies).", lambda t: t.bytes_per_s)):
        g = GaugeMetricFamily(f"kvserve_kv_tier_{suffix}", doc, labels=labels)
        for t in tiers:
            g.add_metric([*values, t.name], read(t))
        yield g


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats], model_name: str,
                 collectors: Sequence[object] = ()):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, model_name))
        for collector in collectors:  # a cluster's replicas and router
            self.registry.register(collector)
        labels = ["model_name"]
        reg = self.registry
        self.ttft = Histogram("kvserve_time_to_first_token_seconds",
                              "Arrival to the first generated token.", labels,
                              buckets=TTFT_BUCKETS, registry=reg).labels(model_name)
        self.itl = Histogram("kvserve_inter_token_latency_seconds",
                             "Time between consecutive tokens of one sequence.", labels,
                             buckets=ITL_BUCKETS, registry=reg).labels(model_name)
        self.e2e = Histogram("kvserve_e2e_request_latency_seconds",
                             "Arrival to the last token of a finished sequence.", labels,
                             buckets=E2E_BUCKETS, registry=reg).labels(model_name)
        self.prompt_tokens = Counter("kvserve_prompt_tokens", "Prompt tokens of requests.",
                                     labels, registry=reg).labels(model_name)
        self.generation_tokens = Counter("kvserve_generation_tokens", "Tokens generated.",
                                         labels, registry=reg).labels(model_name)
        self._success = Counter("kvserve_request_success", "Sequences finished, by reason.",
                                ["model_name", "finished_reason"], registry=reg)
        self._http = Counter("kvserve_http_requests", "API responses by endpoint and status.",
                             ["endpoint", "status"], registry=reg)
        self.model_name = model_name

    def observe(self, out: StreamOutput, previous: StreamOutput | None,
                count_prompt: bool) -> None:
        """One output of one sequence; `previous` is that sequence's last output with tokens."""
        if out.token_ids:
            if previous is None:
                self.ttft.observe(max(0.0, out.time - out.arrival_time))
                if count_prompt:
                    self.prompt_tokens.inc(out.num_prompt_tokens)
            else:
                self.itl.observe(max(0.0, out.time - previous.time))
            # an output of several tokens (a multi-step plan's): they reached the client
            # together, one gap of zero each after the first, so the histogram holds one sample
            # per token after the first and its mean stays the time per output token
            for _ in range(len(out.token_ids) - 1):
                self.itl.observe(0.0)
            self.generation_tokens.inc(len(out.token_ids))
        if out.finished and out.error is None:
            self.e2e.observe(max(0.0, out.time - out.arrival_time))
            self._success.labels(self.model_name, out.finish_reason or "stop").inc()

    def count_response(self, endpoint: str, status: int) -> None:
        self._http.labels(endpoint, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
