"""Offloaded KV on CUDA, unchanged: the host tier copies blocks off the GPU (page-locked) and
back, the disk tier writes and reads them through it, and the outputs equal a run without
offload, for float32 and int8 K/V. Marked gpu: skipped where torch sees no CUDA device."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

# The CPU tests' helpers (make, turns, disk_llm), run here on the GPU.
_spec = importlib.util.spec_from_file_location(
    "offload_helpers", Path(__file__).parents[1] / "model" / "test_offload.py")
cpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cpu)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("kv", ["float32", "int8"])
def test_host_tier_on_cuda_gives_the_outputs_of_no_offload(tiny_hf_dir, kv):
    expected, cached = cpu.turns(cpu.make(tiny_hf_dir, kv, device="cuda"), cpu.GREEDY)
    assert cached == 0
    tiered = cpu.make(tiny_hf_dir, kv, device="cuda", cpu_offload_memory="1MiB")
    got, cached = cpu.turns(tiered, cpu.GREEDY)
    assert got == expected and cached == 40
    host = tiered.engine.cache_snapshot().tiers[0]
    assert host.counters.num_fetched_blocks == 10 and host.bytes_per_s > 0
    assert tiered.engine.runner.host_blocks.pin_memory


def test_disk_tier_on_cuda_gives_the_outputs_of_no_offload(tiny_hf_dir, tmp_path):
    expected, _ = cpu.turns(cpu.make(tiny_hf_dir, device="cuda"), cpu.GREEDY)
    with cpu.disk_llm(tiny_hf_dir, tmp_path, device="cuda") as llm:
        got, cached = cpu.turns(llm, cpu.GREEDY)
        assert got == expected and cached == 40
    again = cpu.disk_llm(tiny_hf_dir, tmp_path, device="cuda")
    out = again.generate(cpu.prompt(cpu.PREFIX + [3, 4, 5]), cpu.GREEDY, use_tqdm=False)[0]
    assert out.token_ids == expected and out.num_cached_tokens == 40
