"""The SDPA attention path against the plain reference, and the dense caches against no cache."""

import pytest
import torch

from kvserve.config import ModelSpec
from kvserve.model.attention import AttentionMetadata
from kvserve.model.attention.dense import ContiguousAttention, NoCacheAttention
from kvserve.model.attention.ops import attention_reference, attention_sdpa, causal_mask


def test_causal_mask_puts_queries_at_the_end():
    assert causal_mask(2, 4, torch.device("cpu")).tolist() == [
        [True, True, True, False],
        [True, True, True, True],
    ]


@pytest.mark.parametrize("n,length", [(1, 1), (1, 9), (5, 5), (3, 11)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (3, 1)])
def test_sdpa_matches_reference(n, length, heads, kv_heads):
    g = torch.Generator().manual_seed(n * 100 + length)
    q = torch.randn(n, heads, 8, generator=g)
    k = torch.randn(length, kv_heads, 8, generator=g)
    v = torch.randn(length, kv_heads, 8, generator=g)
    ref = attention_reference(q, k, v)
    fast = attention_sdpa(q, k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous())
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_sliding_window_mask_keeps_the_last_window_keys():
    assert causal_mask(3, 6, torch.device("cpu"), window=2).tolist() == [
        [False, False, True, True, False, False],
        [False, False, False, True, True, False],
        [False, False, False, False, True, True],
    ]


def _dense_window_reference(q, k, v, window):
    """Softmax over an explicit [n, L] window mask, one query at a time: the definition."""
    n, length = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape)
    for r in range(n):
        p = length - n + r
        keys = [j for j in range(length) if p - window < j <= p]
        kk = k[keys].repeat_interleave(group, dim=1)
        vv = v[keys].repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[r], kk) / q.shape[2] ** 0.5
        out[r] = torch.einsum("hl,lhd->hd", scores.softmax(-1), vv)
    return out


@pytest.mark.parametrize("n,length,window", [(1, 9, 4), (1, 3, 4), (5, 5, 2), (3, 11, 5),
                                             (7, 7, 7), (12, 30, 1), (300, 300, 37),
                                             (290, 600, 100)])
def test_sliding_window_sdpa_and_reference_equal_the_dense_definition(n, length, window):
    """The last case crosses a query chunk after a cached prefix."""
    g = torch.Generator().manual_seed(n * 7 + length + window)
    q = torch.randn(n, 6, 8, generator=g)
    k = torch.randn(length, 2, 8, generator=g)
    v = torch.randn(length, 2, 8, generator=g)
    want = _dense_window_reference(q, k, v, window)
    torch.testing.assert_close(attention_reference(q, k, v, window), want, rtol=1e-5,
                               atol=1e-5)
    fast = attention_sdpa(q, k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous(),
                          window)
    torch.testing.assert_close(fast, want, rtol=1e-4, atol=1e-5)
    if length > window:  # the window changes the answer
        assert not torch.allclose(attention_reference(q, k, v), want, atol=1e-3)


def _spec():
    return ModelSpec(name="t", num_layers=2, hidden_size=16, intermediate_size=32, num_heads=4,
                     num_kv_heads=2, head_dim=4, vocab_size=10, max_position_embeddings=64)


def test_contiguous_cache_equals_recomputing_everything():
    """Feeding a sequence in pieces through the contiguous cache gives the same attention
    outputs as the no-cache backend fed the whole sequence at once."""
    spec = _spec()
    g = torch.Generator().manual_seed(0)
    total = 70  # crosses the 64-token initial capacity, so the store must grow
    q = torch.randn(total, 4, 4, generator=g)
    k = torch.randn(total, 2, 4, generator=g)
    v = torch.randn(total, 2, 4, generator=g)
    none = NoCacheAttention(spec)
    meta = AttentionMetadata.single("a", total)
    none.prepare(meta)
    expected = none.forward(1, q, k, v, meta)
    cache = ContiguousAttention(spec, torch.float32, torch.device("cpu"))
    start = 0
    for chunk in (10, 1, 1, 50, 8):
        rows = slice(start, start + chunk)
        meta = AttentionMetadata.single("a", chunk, start)
        cache.prepare(meta)
        for layer in range(spec.num_layers):
            out = cache.forward(layer, q[rows], k[rows], v[rows], meta)
        torch.testing.assert_close(out, expected[rows], rtol=1e-5, atol=1e-5)
        start += chunk
    assert cache.lengths["a"] == total
    cache.release("a")
    assert cache.num_bytes_allocated() == 0


def test_contiguous_cache_rejects_a_step_that_skips_tokens():
    cache = ContiguousAttention(_spec(), torch.float32, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="cached tokens"):
        cache.prepare(AttentionMetadata.single("a", 1, 5))


def test_chunked_prefill_matches_reference_across_chunks():
    """More queries than one prefill chunk, after a cached prefix (chunk edges and offsets)."""
    g = torch.Generator().manual_seed(7)
    n, length = 600, 700
    q = torch.randn(n, 6, 8, generator=g)
    k = torch.randn(length, 2, 8, generator=g)
    v = torch.randn(length, 2, 8, generator=g)
    fast = attention_sdpa(q, k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous())
    torch.testing.assert_close(fast, attention_reference(q, k, v), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c_decode_attention_matches_pytorch_path(dtype):
    """Decode steps through the C kernel (write + attend) against the PyTorch path, on stores of
    both dtypes, after a prefill that the two share."""
    spec = _spec()
    g = torch.Generator().manual_seed(3)
    total, prompt = 40, 30
    q = torch.randn(total, 4, 4, generator=g)
    k = torch.randn(total, 2, 4, generator=g)
    v = torch.randn(total, 2, 4, generator=g)
    fast = ContiguousAttention(spec, dtype, torch.device("cpu"))
    slow = ContiguousAttention(spec, dtype, torch.device("cpu"))
    slow.use_fast_decode = False
    for cache in (fast, slow):
        meta = AttentionMetadata.single("a", prompt)
        cache.prepare(meta)
        for layer in range(spec.num_layers):
            cache.forward(layer, q[:prompt], k[:prompt], v[:prompt], meta)
    for t in range(prompt, total):
        outs = []
        for cache in (fast, slow):
            meta = AttentionMetadata.single("a", 1, t)
            cache.prepare(meta)
            for layer in range(spec.num_layers):
                out = cache.forward(layer, q[t:t + 1], k[t:t + 1], v[t:t + 1], meta)
            outs.append(out)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    written = (slice(None),) * 3 + (slice(0, total),)  # beyond that: unwritten capacity
    torch.testing.assert_close(fast.store["a"][written], slow.store["a"][written], rtol=0, atol=0)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (6, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c_paged_decode_matches_reference_over_scattered_blocks(heads, kv_heads, dtype):
    """A decode batch of sequences of different lengths whose blocks lie shuffled in the store,
    through the C kernel, against the plain reference over each sequence's gathered K/V."""
    from kvserve.kernels import cpu as cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("no C compiler: reference path only")
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    block_size, d, lens = 4, 8, [1, 5, 16, 23, 9]
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    keys = torch.randn(num_blocks, block_size, kv_heads, d, generator=g).to(dtype)
    values = torch.randn(num_blocks, block_size, kv_heads, d, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = []
    for n in lens:
        tables.append([order.pop() for _ in range(-(-n // block_size))])
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(len(lens), heads, d, generator=g)
    scores = torch.empty(len(lens) * heads * max(lens))
    out = cpu_kernels.paged_decode_attention(q, keys, values, block_tables,
                                             torch.tensor(lens, dtype=torch.int32), max(lens),
                                             scores)
    for b, (n, table) in enumerate(zip(lens, tables)):
        k = keys[table].flatten(0, 1)[:n].float()  # [n, kv_heads, d]
        v = values[table].flatten(0, 1)[:n].float()
        ref = attention_reference(q[b:b + 1], k, v)[0]
        torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "int4", "fp8_e4m3",
                                   "fp8_e5m2"])
def test_mixed_step_decodes_through_c_and_prefills_through_pytorch_match_pytorch(dtype):
    """A step mixing decodes, a prefill and a chunk after cached blocks, in interleaved order:
    the decode rows take the C kernel and the rest the PyTorch path; the result equals the
    all-PyTorch path, and both write the same K/V."""
    from kvserve.kernels import cpu as cpu_kernels
    from kvserve.kvcache.layout import KVLayout
    from kvserve.kvstore.paged import PagedKVStore, SeqWrite
    from kvserve.model.attention.paged import PagedAttention
    from kvserve.runner.input_builder import InputBuilder
    from kvserve.scheduler.plan import ScheduledSeq, StepPlan

    if not cpu_kernels.available():
        pytest.skip("no C compiler: reference path only")
    spec, bs = _spec(), 4
    g = torch.Generator().manual_seed(11)
    step = InputBuilder(torch.device("cpu"), bs).build(StepPlan((
        ScheduledSeq("d1", (1,), 9, True, (0, 2, 5)),  # decode at position 9
        ScheduledSeq("p", (5, 6, 7, 8, 9, 10), 0, True, (3, 7)),  # prefill of 6
        ScheduledSeq("d2", (2,), 4, True, (8, 9)),  # decode at position 4
        ScheduledSeq("c", (12, 13, 14), 5, False, (4, 1, 6)),  # a chunk after 5 cached
    )))
    assert step.meta.paged.decode.rows.tolist() == [0, 7]
    n = step.meta.num_tokens
    q = torch.randn(n, 4, 4, generator=g)
    k = torch.randn(n, 2, 4, generator=g)
    v = torch.randn(n, 2, 4, generator=g)
    history = torch.randn(2, 10, bs, 2, 4, generator=g)  # what earlier steps wrote
    outs, stores = [], []
    for fast in (True, False):
        store = PagedKVStore(KVLayout(spec, bs, dtype), 10, torch.device("cpu"),
                             residual_slots=4)
        every_slot = torch.arange(10 * bs)
        for layer in range(spec.num_layers):
            if not store.has_residual:
                store.write(layer, every_slot, history[0].flatten(0, 1),
                            history[1].flatten(0, 1))
                continue
            # block formats: each sequence's earlier tokens, written as the engine would
            for seq_id, n, table in (("d1", 9, (0, 2, 5)), ("d2", 4, (8, 9)), ("c", 5, (4, 1, 6))):
                plan = store.plan_residual([SeqWrite(seq_id, 0, n, 0)],
                                           torch.tensor([table]))
                rows = torch.tensor([table[p // bs] * bs + p % bs for p in range(n)])
                store.write(layer, rows, history[0].flatten(0, 1)[rows],
                            history[1].flatten(0, 1)[rows], plan)
        attn = PagedAttention(store)
        attn.use_fast_decode = fast
        attn.prepare(step.meta)
        outs.append([attn.forward(layer, q, k, v, step.meta) for layer in range(2)])
        stores.append(store)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name, part in stores[0].parts.items():
        assert torch.equal(part.view(torch.uint8), stores[1].parts[name].view(torch.uint8))


@pytest.mark.parametrize("n,length,window", [(1, 9, None), (1, 30, 4), (7, 7, None),
                                             (12, 30, 5), (290, 600, 100)])
def test_scaled_soft_capped_attention_equals_its_reference(n, length, window):
    """Gemma 2's attention: scores times query_pre_attn_scalar ** -0.5, then cap * tanh(s / cap)
    (a cap of 1.5 on scores of std ~3 bites); the reference applies both by definition."""
    g = torch.Generator().manual_seed(n + length)
    q = torch.randn(n, 6, 8, generator=g) * 3
    k = torch.randn(length, 2, 8, generator=g)
    v = torch.randn(length, 2, 8, generator=g)
    want = attention_reference(q, k, v, window, scale=0.3, softcap=1.5)
    got = attention_sdpa(q, k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous(),
                         window, scale=0.3, softcap=1.5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(want, attention_reference(q, k, v, window, scale=0.3), atol=1e-3)
