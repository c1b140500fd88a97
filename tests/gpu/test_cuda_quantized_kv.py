"""Quantized K/V on CUDA, unchanged: the codecs and the store write the same codes on the GPU as
on the CPU, and every quantized format on the tiny model, with a residual window of whole blocks,
gives the same tokens with swap preemption as an unpreempted run in that format (each query
reads its own window: chunking does not matter), and with prefix hits as an uncached run when
the window is the partial block; the start-up guardrail is measured on the GPU. Marked gpu:
skipped where torch sees no CUDA device."""

from __future__ import annotations

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.config import ModelSpec
from kvserve.kvcache.layout import KVLayout
from kvserve.kvstore.paged import PagedKVStore, SeqWrite

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

FORMATS = ["fp8_e4m3", "int8", "int4", "int8/int4"]
BLOCK = 4
WINDOW = 8  # two whole blocks and the partial one in float32: codes are read too
PROMPTS = [{"prompt_token_ids": [(7 * i + 3 * j) % 200 + 10 for j in range(n)]}
           for i, n in enumerate([10, 1, 14, 5, 8])]
GREEDY = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)


def spec() -> ModelSpec:
    return ModelSpec(name="t", num_layers=2, hidden_size=32, intermediate_size=64, num_heads=6,
                     num_kv_heads=2, head_dim=16, vocab_size=50, max_position_embeddings=64)


def kv_like(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 16, generator=g) * 2.0
    x[..., 3] *= 50.0  # an outlier channel, as real K caches have
    return x


def written(name: str, device: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """A 23-token sequence written in uneven steps on `device`: the store's parts and the
    sequence's K and V read back (codes decoded, the partial block from its window), on the
    CPU."""
    layout = KVLayout(spec(), BLOCK, name, residual_seqs=2)
    store = PagedKVStore(layout, 9, torch.device(device), residual_slots=2)
    table = [7, 2, 5, 0, 8, 3]
    k, v = kv_like(23, 1), kv_like(23, 2)
    start = 0
    for n in [5, 1, 1, 9, 7]:
        tables = torch.tensor([table], device=device)
        plan = store.plan_residual([SeqWrite("a", 0, n, start)], tables) \
            if store.has_residual else None
        slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK
                              for p in range(start, start + n)], device=device)
        store.write(1, slots, k[start:start + n].to(device), v[start:start + n].to(device), plan)
        start += n
    slot = store.residual_slot("a") if store.has_residual else None
    got_k, got_v = store.gather(1, torch.tensor(table, device=device), 23, torch.float32, slot)
    return ({n: t.cpu() for n, t in store.parts.items()}, got_k.cpu(), got_v.cpu())


@pytest.mark.parametrize("name", FORMATS)
def test_the_gpu_writes_the_cpus_codes(name):
    """Codes equal byte for byte but for the odd value on a rounding boundary (the GPU may
    fuse a multiply-add), scales equal to rounding, and what is read back as accurate as the
    CPU's; the partial block (int8/int4's window) exact."""
    cpu_parts, cpu_k, cpu_v = written(name, "cpu")
    gpu_parts, gpu_k, gpu_v = written(name, "cuda")
    assert cpu_parts.keys() == gpu_parts.keys()
    for part, t in cpu_parts.items():
        g = gpu_parts[part]
        assert t.shape == g.shape and t.dtype == g.dtype, part
        if part.endswith("codes"):
            same = (t.view(torch.uint8) == g.view(torch.uint8)).float().mean()
            assert same >= 0.99, (part, float(same))
        else:
            assert torch.allclose(t.float(), g.float(), rtol=1e-3, atol=1e-6), part
    for got_cpu, got_gpu, x in ((cpu_k, gpu_k, kv_like(23, 1)), (cpu_v, gpu_v, kv_like(23, 2))):
        x = x.transpose(0, 1)
        worst = (got_cpu - x).abs().amax(dim=(1, 2), keepdim=True)  # per head
        assert ((got_gpu - x).abs() <= 1.01 * worst + 1e-6).all()
        if "fp8" not in name:
            assert torch.equal(got_gpu[:, 20:], x[:, 20:])


def make(tiny_hf_dir, name: str, **kwargs) -> LLM:
    k, _, v = name.partition("/")
    return LLM(model=str(tiny_hf_dir), device="cuda", block_size=BLOCK, max_model_len=48,
               k_cache_dtype=k, v_cache_dtype=v or k,
               **{"max_num_seqs": 8, "kv_residual_tokens": WINDOW, **kwargs})


def run(llm: LLM) -> list[tuple[int, ...]]:
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("name", FORMATS)
def test_quantized_formats_on_cuda_keep_their_tokens_through_swap_and_prefix_hits(tiny_hf_dir,
                                                                                  name):
    plain = make(tiny_hf_dir, name, enable_prefix_caching=False)
    store = plain.engine.runner.kv_store
    assert plain.engine.device.type == "cuda"
    assert all(t.is_cuda for t in store.parts.values())
    check = plain.engine.cache_snapshot().quant_check  # the guardrail, measured on the GPU
    assert check is not None and check.mean_kl < 0.1 and check.top1_agreement >= 0.8
    expected = run(plain)
    block_bytes = KVLayout(plain.engine.spec, BLOCK, name).bytes_per_block
    fixed = KVLayout(plain.engine.spec, BLOCK, name, residual_seqs=8,
                     window_tokens=WINDOW).fixed_bytes
    tight = make(tiny_hf_dir, name, kv_cache_memory=13 * block_bytes + fixed,
                 preemption_mode="swap", max_num_batched_tokens=16, enable_prefix_caching=False)
    assert run(tight) == expected
    snap = tight.engine.cache_snapshot()
    assert snap.num_preemptions > 0 and snap.pool.num_used_blocks == 0
    assert not tight.engine.runner.host_blocks and not tight.engine.runner.parked_windows
    # prefix hits: exact with the partial block alone in the window
    exact = run(make(tiny_hf_dir, name, enable_prefix_caching=False, kv_residual_tokens=0))
    cached = make(tiny_hf_dir, name, kv_residual_tokens=0)
    assert run(cached) == exact
    again = cached.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in again] == exact
    assert sum(o.num_cached_tokens for o in again) > 0
    # with whole blocks in the window, hits read the blocks before them through their codes
    windowed = make(tiny_hf_dir, name)
    first = run(windowed)
    assert first == expected  # the prompts share no block: nothing hit yet
    assert run(windowed) == run(windowed)
