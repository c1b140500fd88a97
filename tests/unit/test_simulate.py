"""The workload simulator: the real scheduler and allocator under synthetic traffic, no model."""

import json
import math

import pytest

from kvserve.cli import main
from kvserve.config import SchedulerConfig
from kvserve.errors import ConfigError
from kvserve.planner.capacity import plan
from kvserve.planner.simulate import (
    LengthDistribution,
    StepCost,
    Workload,
    simulate,
    simulate_plan,
)

SCHED = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048)


def _workload(**kw) -> Workload:
    base = dict(num_requests=60, arrival_rate=20.0,
                prompt_tokens=LengthDistribution.parse("100-300", "p"),
                output_tokens=LengthDistribution.parse("20-80", "o"), vocab_size=1000, seed=1)
    return Workload(**{**base, **kw})


def test_length_distributions():
    import random

    rng = random.Random(0)
    assert LengthDistribution.parse("64", "x").sample(rng) == 64
    assert all(10 <= LengthDistribution.parse("10-20", "x").sample(rng) <= 20 for _ in range(50))
    exp = [LengthDistribution.parse("exp:100", "x").sample(rng) for _ in range(4000)]
    assert min(exp) >= 1 and sum(exp) / len(exp) == pytest.approx(100, rel=0.1)
    for bad in ("0", "20-10", "abc", "exp:0", "exp:nan", "-5"):
        with pytest.raises(ConfigError, match="must be N, A-B"):
            LengthDistribution.parse(bad, "--prompt-tokens")


def test_workload_is_reproducible_and_shares_its_prefix():
    w = _workload(shared_prefix_fraction=1.0, shared_prefix_tokens=64)
    a, b = w.requests(), w.requests()
    assert a == b
    assert all(p[:64] == a[0][1][:64] for _, p, _ in a)
    assert [t for t, _, _ in a] == sorted(t for t, _, _ in a)
    burst = _workload(arrival_rate=math.inf).requests()
    assert {t for t, _, _ in burst} == {0.0}


def test_ample_pool_no_preemptions_tight_pool_preempts():
    w = _workload()
    ample = simulate(w, 5000, 16, 1, SCHED, 4096)
    assert ample.num_preemptions == 0 and ample.peak_blocks_used < 5000
    assert ample.num_output_tokens == sum(n for _, _, n in w.requests())
    tight = simulate(w, 60, 16, 1, SCHED, 4096)
    assert tight.num_preemptions > 0 and tight.peak_blocks_used == 60
    assert tight.duration_s > ample.duration_s  # preempted work is done again
    assert max(tight.queue_wait_s) > max(ample.queue_wait_s)


def test_shared_prefix_hit_rate():
    w = _workload(shared_prefix_fraction=1.0, shared_prefix_tokens=96,
                  prompt_tokens=LengthDistribution.parse("200", "p"), arrival_rate=2.0)
    sim = simulate(w, 5000, 16, 1, SCHED, 4096)
    # every request after the first reuses the 96-token (6-block) prefix of its 200-token prompt
    assert sim.prefix_hit_tokens == 59 * 96
    assert sim.prefix_hit_rate == pytest.approx(59 * 96 / (60 * 200))
    off = simulate(w, 5000, 16, 1, SCHED, 4096, enable_prefix_caching=False)
    assert off.prefix_hit_tokens == 0 and off.peak_blocks_used >= sim.peak_blocks_used


def test_requests_that_can_never_fit_are_rejected_not_stuck():
    w = _workload(prompt_tokens=LengthDistribution.parse("100-3000", "p"))
    sim = simulate(w, 100, 16, 1, SCHED, 1024)
    assert sim.num_rejected > 0
    assert len(sim.arrival_steps) == 60 - sim.num_rejected


def test_step_cost_moves_time_not_blocks():
    w = _workload()
    slow = simulate(w, 5000, 16, 1, SCHED, 4096, cost=StepCost(200.0, 1.0))
    fast = simulate(w, 5000, 16, 1, SCHED, 4096, cost=StepCost(2.0, 0.01))
    assert slow.duration_s > 10 * fast.duration_s
    assert slow.peak_blocks_used > fast.peak_blocks_used  # slower steps: more in flight at once


def test_simulate_plan_uses_the_plan_budget():
    p = plan("llama-3-8b", memory="40GiB", context=2000)
    sim = simulate_plan(p, _workload(vocab_size=128256))
    assert sim.num_blocks_total == (p.kv_budget_bytes // p.kv.bytes_per_block)
    assert sim.bytes_per_block == p.kv.bytes_per_block == 16 * 131_072


def test_cli_simulate_json(capsys):
    argv = ["plan", "--model", "llama-3-8b", "--memory", "40GiB", "--simulate", "--json",
            "--num-requests", "30", "--shared-prefix-fraction", "0.5"]
    assert main(argv) == 0
    sim = json.loads(capsys.readouterr().out)["simulation"]
    for key in ("peak_blocks_used", "peak_kv_bytes", "num_preemptions", "queue_wait_s_p95",
                "ttft_s_p50", "prefix_hit_rate", "max_waiting", "num_blocks_total"):
        assert key in sim
    assert 0 < sim["peak_blocks_used"] <= sim["num_blocks_total"]


def test_cli_simulate_text_and_plots(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "kv.png"
    assert main(["plan", "--model", "smollm2-135m", "--memory", "1GiB", "--simulate",
                 "--num-requests", "20", "--arrival-rate", "50", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Simulated traffic through the real scheduler" in out and "Verdict:" in out
    for path in (png, tmp_path / "kv.simulation.png"):
        assert path.read_bytes()[:4] == b"\x89PNG" and f"plot: {path}" in out


@pytest.mark.parametrize("argv, message", [
    (["--arrival-rate", "0"], "arrival rate must be > 0"),
    (["--num-requests", "0"], "num_requests must be a positive integer"),
    (["--shared-prefix-fraction", "1.5"], "shared prefix fraction must be in [0, 1]"),
    (["--prompt-tokens", "10-5"], "--prompt-tokens must be N, A-B"),
    (["--max-num-seqs", "0"], "max_num_seqs must be a positive integer"),
    (["--step-ms", "-1"], "--step-ms and --ms-per-token must be >= 0"),
])
def test_bad_simulation_input_is_one_line(capsys, argv, message):
    rc = main(["plan", "--model", "smollm2-135m", "--simulate", *argv])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and message in err, err


def test_sinks_let_long_requests_through_a_small_pool():
    """Under sinks a 3,000-token request holds its sinks, its window and a step: a 100-block
    pool that refuses it with the full cache runs every one, releasing blocks as it goes."""
    from kvserve.kvcache.policy import Sinks

    w = _workload(prompt_tokens=LengthDistribution.parse("2000-3000", "p"))
    full = simulate(w, 100, 16, 1, SCHED, 8192)
    assert full.num_rejected == 60
    sched = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256)
    sinks = simulate(w, 100, 16, 1, sched, 8192, policy=Sinks(4, 512, 16))
    assert sinks.num_rejected == 0 and len(sinks.ttft_s) == 60
    # each sequence: a sink block + the window's 32 blocks + a 256-token step (16) + one
    assert sinks.peak_blocks_used <= 100


def test_the_plan_and_its_simulation_know_sinks():
    p = plan("llama-3-8b", memory="24GiB", context=100_000, concurrency=8,
             cache_policy="sinks", window_tokens=4096)
    assert p.fits and p.retention.sink_tokens == 16  # 4 rounded up to a block
    held = 16 + 4096 + 16  # sinks, window, the block being written
    assert p.kv.bytes_per_request == held * 131_072 and p.kv.blocks_per_request == held // 16
    d = p.to_dict()
    assert (d["cache_policy"], d["sink_tokens"], d["window_tokens"]) == ("sinks", 16, 4096)
    assert p.kv.max_context_at_concurrency == 16 * 8192
    full = plan("llama-3-8b", memory="24GiB", context=100_000, concurrency=8)
    assert not full.fits and any("--cache-policy sinks" in s for s in full.suggestions)
    sim = simulate_plan(p, _workload(vocab_size=128256, num_requests=8,
                                     prompt_tokens=LengthDistribution.parse("9000-9500", "p")),
                        max_num_seqs=8, max_num_batched_tokens=512)
    assert sim.num_rejected == 0 and sim.peak_blocks_used <= 8 * (held + 512 + 16) // 16
    with pytest.raises(ConfigError, match="window_tokens applies to cache_policy 'sinks'"):
        plan("llama-3-8b", window_tokens=4096)
