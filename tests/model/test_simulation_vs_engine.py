"""`kvserve plan --simulate` replays traffic through the real scheduler and allocator without a
model; here the same small workload also runs through the real engine on the default model, step
for step, and the two must agree on peak blocks (within 5%), preemptions and prefix hits."""

from collections import deque

import pytest

from kvserve.config import EngineConfig, SchedulerConfig
from kvserve.engine.engine import LLMEngine
from kvserve.kvcache.layout import KVLayout
from kvserve.planner.capacity import resolve_model
from kvserve.planner.simulate import LengthDistribution, Workload, simulate
from kvserve.request import SamplingParams

BLOCK_SIZE = 16
MAX_MODEL_LEN = 512


def make_engine(num_blocks: int, max_num_seqs: int, enable_prefix_caching: bool) -> LLMEngine:
    per_block = KVLayout(resolve_model(None).to_spec(), BLOCK_SIZE, "float32").bytes_per_block
    return LLMEngine(EngineConfig.create(  # exactly num_blocks blocks, as the simulated pool
        kv_cache_memory=num_blocks * per_block, block_size=BLOCK_SIZE,
        max_model_len=MAX_MODEL_LEN, max_num_seqs=max_num_seqs, max_num_batched_tokens=256,
        enable_prefix_caching=enable_prefix_caching))


def _run_engine(engine: LLMEngine, workload: Workload, arrival_steps: list[int]) -> None:
    pending = deque(zip(arrival_steps, workload.requests()))
    step, i = 0, 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, (_, prompt, num_out) = pending.popleft()
            params = SamplingParams(max_tokens=num_out, ignore_eos=True, temperature=0.0)
            engine.add_request(f"r{i}", prompt, params)
            i += 1
        engine.step()
        step += 1


@pytest.mark.parametrize("num_blocks, max_num_seqs, prefix", [
    (40, 8, True),  # a tight pool: preemptions
    (40, 6, False),
    (400, 8, True),  # room to spare: the peak is the workload's own
])
def test_simulation_and_real_engine_agree_on_peak_blocks(num_blocks, max_num_seqs, prefix):
    engine = make_engine(num_blocks, max_num_seqs, prefix)
    assert engine.block_manager.pool.num_blocks == num_blocks
    workload = Workload(num_requests=14, arrival_rate=40.0,
                        prompt_tokens=LengthDistribution.parse("30-140", "prompt"),
                        output_tokens=LengthDistribution.parse("16-48", "output"),
                        shared_prefix_fraction=0.6, shared_prefix_tokens=48,
                        vocab_size=engine.spec.vocab_size, seed=3)
    sim = simulate(workload, num_blocks, BLOCK_SIZE, 1,
                   SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=256),
                   MAX_MODEL_LEN, enable_prefix_caching=prefix)
    assert sim.num_rejected == 0
    assert (sim.num_preemptions > 0) == (num_blocks == 40)  # the tight pool is under pressure
    assert (sim.peak_blocks_used < num_blocks) == (num_blocks == 400)
    _run_engine(engine, workload, sim.arrival_steps)
    stats = engine.cache_snapshot()
    real_peak = stats.pool.peak_used_blocks
    assert abs(real_peak - sim.peak_blocks_used) <= 0.05 * real_peak, (real_peak, sim)
    assert stats.num_preemptions == sim.num_preemptions
    if prefix:
        assert sim.prefix_hit_tokens > 0
        assert stats.prefix.num_hit_tokens == sim.prefix_hit_tokens
