"""Sliding windows and attention sinks on CUDA, unchanged: a tiny Mistral (every layer windowed,
blocks released) and the tiny Llama under --cache-policy sinks past its 256-position context
give the CPU's tokens; the architectures with biases, Q/K norms and soft-caps run there too.
Marked gpu: skipped where torch sees no CUDA device."""

from __future__ import annotations

import json

import pytest
import torch

from kvserve import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

PROMPTS = [{"prompt_token_ids": [(13 * i + 3 * j) % 200 + 10 for j in range(n)]}
           for i, n in enumerate([21, 6, 11])]


def _tokens(llm, params):
    return [list(o.token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def _mistral(tiny_hf_dir, tmp_path):
    folder = tmp_path / "mistral"
    folder.mkdir()
    for f in tiny_hf_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((tiny_hf_dir / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=8)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("mode", ["none", "contiguous", "paged"])
def test_sliding_window_on_cuda_gives_the_cpu_tokens(tiny_hf_dir, tmp_path, mode):
    folder = _mistral(tiny_hf_dir, tmp_path)
    params = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)
    cpu = _tokens(LLM(model=str(folder), cache_mode=mode, block_size=4, max_model_len=128),
                  params)
    gpu = LLM(model=str(folder), device="cuda", cache_mode=mode, block_size=4,
              max_model_len=128)
    assert _tokens(gpu, params) == cpu
    if mode == "paged":
        assert gpu.engine.peak_blocks_used <= 3 * 6


@pytest.mark.parametrize("prefix", [False, True])
def test_hybrid_groups_on_cuda_give_the_cpu_tokens(tmp_path, prefix):
    """Three windowed and two full layers: a block table per KV group, windowed blocks
    released, prefix hits that need only the window's blocks."""
    import fixtures

    folder = fixtures.write_tiny_hybrid(tmp_path / "hybrid")
    params = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)
    kw = dict(model=str(folder), block_size=4, max_model_len=128, max_num_batched_tokens=8,
              enable_prefix_caching=prefix)
    cpu = _tokens(LLM(**kw), params)
    gpu = LLM(device="cuda", **kw)
    assert len(gpu.engine.block_manager.groups) == 3
    assert _tokens(gpu, params) == cpu
    if prefix:
        assert _tokens(gpu, params) == cpu


def test_sinks_on_cuda_past_the_context_give_the_cpu_tokens(tiny_hf_dir):
    params = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
    kw = dict(model=str(tiny_hf_dir), block_size=4, cache_policy="sinks", window_tokens=8,
              max_num_batched_tokens=16)
    cpu = _tokens(LLM(**kw), params)
    gpu = LLM(device="cuda", **kw)
    assert _tokens(gpu, params) == cpu
    assert gpu.engine.peak_blocks_used <= 3 * 10


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"])
def test_architectures_on_cuda_give_the_cpu_tokens(name, tmp_path):
    import importlib.util
    from pathlib import Path

    transformers = pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location(
        "arch_helpers", Path(__file__).parents[1] / "integration" / "test_architectures.py")
    arch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(arch)
    import fixtures

    cls, extra, _ = arch.ARCHS[name]
    model = transformers.AutoModelForCausalLM.from_config(
        getattr(transformers, cls)(**arch.BASE, **extra), attn_implementation="eager")
    arch._randomize(model, seed=len(name))
    model.save_pretrained(tmp_path / name)
    fixtures.write_tiny_tokenizer(tmp_path / name)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    kw = dict(model=str(tmp_path / name), block_size=4, max_model_len=128)
    assert _tokens(LLM(device="cuda", **kw), params) == _tokens(LLM(**kw), params)
