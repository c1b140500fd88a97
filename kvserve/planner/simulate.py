"""`kvserve plan --simulate`: synthetic traffic through the engine's real scheduler, block pool and
prefix cache, with no model compute, to see whether a workload fits before buying hardware.

Requests arrive as a Poisson process; prompt and output lengths follow the given distributions;
a fraction of prompts start with one shared prefix (a system prompt). The loop is the engine's own
(schedule -> "execute" -> update): the only thing missing is the model, so every step samples a
placeholder token and generation runs to max_tokens (ignore_eos). Time advances by a linear step
cost model (a base per step plus a cost per token fed), stated in the report. No torch.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

from kvserve.config import SINKS_CONTEXT_FACTOR, SchedulerConfig
from kvserve.errors import ConfigError
from kvserve.kvcache.block_manager import BlockManager
from kvserve.kvcache.block_pool import BlockPool
from kvserve.kvcache.layout import KVLayout
from kvserve.kvcache.policy import RetentionPolicy
from kvserve.kvcache.prefix_index import PrefixIndex
from kvserve.planner.capacity import CapacityPlan
from kvserve.request import Request, SamplingParams
from kvserve.scheduler.plan import SampledToken, StepPlan, StepResult
from kvserve.scheduler.scheduler import Scheduler


@dataclass(frozen=True)
class LengthDistribution:
    """Token lengths: 'N' (fixed), 'A-B' (uniform), 'exp:MEAN' (exponential, at least 1)."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str, what: str) -> LengthDistribution:
        t = str(text).strip().lower().replace(" ", "")
        try:
            if t.startswith("exp:"):
                dist = cls("exp", float(t[4:]))
            elif "-" in t:
                lo, hi = t.split("-", 1)
                dist = cls("uniform", int(lo), int(hi))
            else:
                dist = cls("fixed", int(t))
        except ValueError:
            dist = None
        if dist is None or not math.isfinite(dist.a) or dist.a < 1 or (
                dist.kind == "uniform" and dist.b < dist.a):
            raise ConfigError(f"{what} must be N, A-B (uniform, 1 <= A <= B) or exp:MEAN "
                              f"(MEAN >= 1), got {text!r}")
        return dist

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.expovariate(1 / self.a)))

    def describe(self) -> str:
        return {"fixed": f"{self.a:g}", "uniform": f"uniform {self.a:g}-{self.b:g}",
                "exp": f"exponential, mean {self.a:g}"}[self.kind]


@dataclass(frozen=True)
class Workload:
    num_requests: int = 200
    arrival_rate: float = 2.0  # requests per second (Poisson); math.inf: all at t=0
    prompt_tokens: LengthDistribution = LengthDistribution("uniform", 1000, 3000)
    output_tokens: LengthDistribution = LengthDistribution("uniform", 100, 1000)
    shared_prefix_fraction: float = 0.0  # of requests whose prompt starts with the shared prefix
    shared_prefix_tokens: int = 0
    vocab_size: int = 32000
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.num_requests, int) or self.num_requests <= 0:
            raise ConfigError(f"num_requests must be a positive integer, got {self.num_requests!r}")
        if not self.arrival_rate > 0:
            raise ConfigError(f"arrival rate must be > 0 requests/s, got {self.arrival_rate!r}")
        if not 0 <= self.shared_prefix_fraction <= 1:
            raise ConfigError(f"shared prefix fraction must be in [0, 1], "
                              f"got {self.shared_prefix_fraction!r}")
        if self.shared_prefix_tokens < 0 or (self.shared_prefix_fraction > 0
                                             and self.shared_prefix_tokens == 0):
            raise ConfigError("a shared prefix fraction needs shared prefix tokens >= 1, "
                              f"got {self.shared_prefix_tokens!r}")

    def requests(self) -> list[tuple[float, list[int], int]]:
        """(arrival time in s, prompt token ids, output tokens) per request, in arrival order."""
        rng = random.Random(self.seed)
        prefix = [rng.randrange(self.vocab_size) for _ in range(self.shared_prefix_tokens)]
        out, clock = [], 0.0
        for _ in range(self.num_requests):
            if math.isfinite(self.arrival_rate):
                clock += rng.expovariate(self.arrival_rate)
            num_prompt = self.prompt_tokens.sample(rng)
            head = prefix if rng.random() < self.shared_prefix_fraction else []
            tail = [rng.randrange(self.vocab_size) for _ in range(max(1, num_prompt - len(head)))]
            out.append((clock, head + tail, self.output_tokens.sample(rng)))
        return out


@dataclass(frozen=True)
class StepCost:
    """Seconds one step takes: base + per_token x tokens fed (prefill and decode alike)."""

    base_ms: float = 20.0
    per_token_ms: float = 0.1

    def __post_init__(self) -> None:
        if not (self.base_ms >= 0 and self.per_token_ms >= 0
                and self.base_ms + self.per_token_ms > 0):
            raise ConfigError("step cost: --step-ms and --ms-per-token must be >= 0 and not "
                              f"both 0, got {self.base_ms!r} and {self.per_token_ms!r}")

    def seconds(self, plan: StepPlan) -> float:
        return (self.base_ms + self.per_token_ms * plan.num_tokens) / 1000


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


@dataclass
class SimulationResult:
    num_requests: int
    num_rejected: int  # could never fit (longer than max_model_len or the whole pool)
    num_blocks_total: int
    block_size: int
    bytes_per_block: int
    peak_blocks_used: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    duration_s: float = 0.0
    num_output_tokens: int = 0
    max_waiting: int = 0
    max_running: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    queue_wait_s: list[float] = field(default_factory=list, repr=False)
    ttft_s: list[float] = field(default_factory=list, repr=False)
    arrival_steps: list[int] = field(default_factory=list, repr=False)  # per accepted request
    # (time s, blocks used, running, waiting) after each step that ran: for the plot
    timeline: list[tuple[float, int, int, int]] = field(default_factory=list, repr=False)

    @property
    def peak_kv_bytes(self) -> int:
        return self.peak_blocks_used * self.bytes_per_block

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens \
            else 0.0

    def to_dict(self) -> dict:
        return {
            "num_requests": self.num_requests, "num_rejected": self.num_rejected,
            "num_blocks_total": self.num_blocks_total, "block_size": self.block_size,
            "peak_blocks_used": self.peak_blocks_used, "peak_kv_bytes": self.peak_kv_bytes,
            "peak_kv_usage": self.peak_blocks_used / self.num_blocks_total,
            "num_preemptions": self.num_preemptions, "num_steps": self.num_steps,
            "duration_s": self.duration_s,
            "output_tokens_per_s": self.num_output_tokens / self.duration_s
            if self.duration_s else 0.0,
            "max_waiting": self.max_waiting, "max_running": self.max_running,
            "queue_wait_s_p50": _percentile(self.queue_wait_s, 50),
            "queue_wait_s_p95": _percentile(self.queue_wait_s, 95),
            "queue_wait_s_max": max(self.queue_wait_s, default=0.0),
            "ttft_s_p50": _percentile(self.ttft_s, 50), "ttft_s_p95": _percentile(self.ttft_s, 95),
            "prefix_hit_tokens": self.prefix_hit_tokens,
            "prefix_queried_tokens": self.prefix_queried_tokens,
            "prefix_hit_rate": self.prefix_hit_rate,
        }


class _Clocked:
    """Per-request simulated times: arrival, first scheduled, first token."""

    def __init__(self) -> None:
        self.arrival: dict[str, float] = {}
        self.admitted: dict[str, float] = {}
        self.first_token: dict[str, float] = {}


def simulate(workload: Workload, num_blocks: int, block_size: int, bytes_per_block: int,
             scheduler_config: SchedulerConfig, max_model_len: int,
             enable_prefix_caching: bool = True, cost: StepCost = StepCost(),
             policy: RetentionPolicy | None = None) -> SimulationResult:
    """Replay `workload` through a real Scheduler / BlockManager / PrefixIndex of num_blocks,
    under the engine's retention policy (sinks release blocks as the engine does)."""
    pool = BlockPool(num_blocks)
    manager = BlockManager(pool, block_size, PrefixIndex() if enable_prefix_caching else None,
                           model_key="simulated", policy=policy)
    sched = Scheduler(scheduler_config, max_model_len, True, (), manager)
    res = SimulationResult(workload.num_requests, 0, num_blocks, block_size, bytes_per_block)
    times = _Clocked()
    pending = deque(enumerate(workload.requests()))
    clock = 0.0
    while pending or sched.has_unfinished():
        while pending and pending[0][1][0] <= clock:
            i, (arrival, prompt, num_out) = pending.popleft()
            if not _fits(prompt, num_out, manager, max_model_len,
                         scheduler_config.max_num_batched_tokens):
                res.num_rejected += 1
                continue
            params = SamplingParams(max_tokens=num_out, ignore_eos=True, temperature=0.0)
            sched.add(Request(f"r{i}", prompt, params, arrival_time=arrival))
            times.arrival[f"r{i}"] = arrival
            res.arrival_steps.append(res.num_steps)
        if not sched.has_unfinished():
            if pending:
                clock = max(clock, pending[0][1][0])  # idle until the next arrival
            continue
        clock += _step(sched, manager, res, times, clock, cost)
    res.duration_s = clock
    if manager.prefix_index is not None:
        res.prefix_queried_tokens = manager.prefix_index.num_queried_tokens
        res.prefix_hit_tokens = manager.prefix_index.num_hit_tokens
    res.num_preemptions = sched.num_preemptions
    res.queue_wait_s = [times.admitted[r] - times.arrival[r] for r in times.admitted]
    res.ttft_s = [times.first_token[r] - times.arrival[r] for r in times.first_token]
    return res


def _fits(prompt: list[int], num_out: int, manager: BlockManager, max_model_len: int,
          step_tokens: int) -> bool:
    """What the engine's check_fits refuses up front: past the context, bigger than the pool."""
    total = len(prompt) + num_out
    held = manager.most_blocks_held(total, step_tokens)
    return total <= max_model_len and held <= manager.pool.num_blocks


def _step(sched: Scheduler, manager: BlockManager, res: SimulationResult, times: _Clocked,
          clock: float, cost: StepCost) -> float:
    """One engine step at `clock`; returns its simulated duration in seconds."""
    plan = sched.schedule()
    res.num_steps += 1
    res.max_waiting = max(res.max_waiting, len(sched.waiting))
    res.max_running = max(res.max_running, len(sched.running))
    if not plan.seqs:  # only a preemption that left nothing to run: the next step runs
        return 0.0
    res.peak_blocks_used = max(res.peak_blocks_used, manager.pool.num_used_blocks)
    res.timeline.append((clock, manager.pool.num_used_blocks, len(sched.running),
                         len(sched.waiting)))
    end = clock + cost.seconds(plan)
    for s in plan.seqs:
        times.admitted.setdefault(s.request_id, clock)
    sampled = tuple(SampledToken(s.request_id, 0) for s in plan.seqs if s.sample)
    for t in sampled:
        times.first_token.setdefault(t.request_id, end)
    res.num_output_tokens += len(sampled)
    sched.update(plan, StepResult(sampled))
    return end - clock


def simulate_plan(p: CapacityPlan, workload: Workload, max_num_seqs: int = 256,
                  max_num_batched_tokens: int = 8192, enable_prefix_caching: bool = True,
                  cost: StepCost = StepCost()) -> SimulationResult:
    """Replay `workload` in the KV pool the plan's budget holds (its KV dtype, block size and
    residual windows, one per sequence the scheduler may run)."""
    layout = KVLayout(p.model.to_spec(), p.block_size, p.kv.kv_cache_dtype,
                      residual_seqs=max_num_seqs, window_tokens=p.kv_residual_tokens)
    num_blocks = layout.num_blocks_for_bytes(p.kv_budget_bytes)
    if num_blocks < 1:
        raise ConfigError(f"the KV budget ({p.kv_budget_bytes:,} B) holds no block of "
                          f"{layout.bytes_per_block:,} B")
    config = SchedulerConfig(max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens)
    max_len = p.model.max_context * (1 if p.retention is None else SINKS_CONTEXT_FACTOR)
    return simulate(workload, num_blocks, p.block_size, layout.bytes_per_block, config,
                    max_len, enable_prefix_caching, cost, p.retention)
