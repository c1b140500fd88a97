"""Quantized K/V formats: the codecs' round-trip error within their bounds on random and
outlier-heavy K/V, the pool's bytes equal to the layout formula for every format, and the C decode
kernel over codes equal to decoding the gathered blocks and attending in PyTorch."""

import pytest
import torch

from kvserve.config import ModelSpec
from kvserve.kv_dtypes import BUILT_KV_CACHE_DTYPES
from kvserve.kvcache.layout import KVLayout
from kvserve.kvstore.codecs import codec_for
from kvserve.kvstore.paged import PagedKVStore, SeqWrite
from kvserve.model.attention.ops import (
    attention_reference,
    attention_windowed,
    attention_windowed_reference,
    window_starts,
)

QUANTIZED = ["fp8_e4m3", "fp8_e5m2"]  # per-token codecs (int8/int4: block codecs, below)


def kv_like(n: int, heads: int, d: int, outliers: bool, seed: int = 0) -> torch.Tensor:
    """K/V-like vectors; with outliers, a few channels 50x larger (as real K caches have)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, heads, d, generator=g) * 2.0
    if outliers:
        x[..., [3, d - 5]] *= 50.0
        x[n // 2, 0, 11] = -900.0  # one extreme value
    return x


@pytest.mark.parametrize("name, mantissa_bits", [("fp8_e4m3", 3), ("fp8_e5m2", 2)])
@pytest.mark.parametrize("outliers", [False, True], ids=["gaussian", "outliers"])
def test_fp8_relative_error_is_within_its_mantissa_and_large_values_saturate(name, mantissa_bits,
                                                                            outliers):
    x = kv_like(64, 3, 32, outliers)
    codec = codec_for(name)
    back = codec.decode(codec.encode(x), torch.float32)
    normal = x.abs() > 2 ** -6  # above the subnormal range of both formats
    rel = ((back - x).abs() / x.abs())[normal]
    assert rel.max() <= 2.0 ** -(mantissa_bits + 1) + 1e-6
    huge = codec.decode(codec.encode(torch.tensor([[[1e6, -1e6]]])), torch.float32)
    assert torch.equal(huge, torch.tensor([[[codec.max, -codec.max]]]))  # saturated, never inf


def spec() -> ModelSpec:
    return ModelSpec(name="t", num_layers=3, hidden_size=32, intermediate_size=64, num_heads=6,
                     num_kv_heads=2, head_dim=16, vocab_size=50, max_position_embeddings=64)


@pytest.mark.parametrize("name", [*BUILT_KV_CACHE_DTYPES[1:], "int8/int4", "bfloat16/fp8_e4m3"])
def test_the_store_allocates_exactly_the_layout_formula(name):
    layout = KVLayout(spec(), 4, name, residual_seqs=3)
    store = PagedKVStore(layout, num_blocks=7, device=torch.device("cpu"), residual_slots=3)
    assert store.num_bytes_allocated() == 7 * layout.bytes_per_block + layout.fixed_bytes
    one_block = sum(t[:, 0].numel() * t.element_size() for t in store.parts.values())
    assert one_block == layout.bytes_per_block
    assert layout.bytes_per_token == -(-one_block // 4)
    assert layout.num_blocks_for_bytes(store.num_bytes_allocated()) == 7
    if "int" in name:  # the residual windows: float32 blocks of each int side, 3 sequences
        sides = name.count("int") if "/" in name else 2
        assert layout.fixed_bytes == 3 * sides * 3 * 4 * 2 * 16 * 4


@pytest.mark.parametrize("name", QUANTIZED)
def test_write_then_gather_decodes_what_the_codec_decodes(name):
    """Slots written out of order land where the slot mapping says, in every part."""
    layout = KVLayout(spec(), 4, name)
    store = PagedKVStore(layout, num_blocks=6, device=torch.device("cpu"))
    k, v = kv_like(10, 2, 16, True, seed=1), kv_like(10, 2, 16, False, seed=2)
    blocks = [4, 1, 5]  # a sequence of 10 tokens in these blocks
    slots = torch.tensor([blocks[t // 4] * 4 + t % 4 for t in range(10)])
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    store.write(1, slots[order], k[order], v[order])
    got_k, got_v = store.gather(1, torch.tensor(blocks), 10, torch.float32)
    codec = store.codec
    torch.testing.assert_close(got_k, codec.decode(codec.encode(k), torch.float32).transpose(0, 1))
    torch.testing.assert_close(got_v, codec.decode(codec.encode(v), torch.float32).transpose(0, 1))


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("outliers", [False, True], ids=["gaussian", "outliers"])
def test_c_decode_over_codes_equals_decoding_then_attending(name, outliers):
    """A decode batch over shuffled blocks, read as codes by the C kernel, against the gathered,
    decoded K/V through the plain reference attention."""
    from kvserve.kernels import cpu as cpu_kernels
    from kvserve.model.attention.metadata import DecodeRows
    from kvserve.model.attention.paged import PagedAttention

    if not cpu_kernels.available():
        pytest.skip("no C compiler: reference path only")
    bs, lens = 4, [1, 5, 16, 23, 9]
    layout = KVLayout(spec(), bs, name)
    num_blocks = sum(-(-n // bs) for n in lens) + 3
    store = PagedKVStore(layout, num_blocks, torch.device("cpu"))
    if store.tensor_scales is not None:  # a calibrated per-tensor scale, not the default 1
        store.tensor_scales.copy_(torch.tensor([[0.5, 2.0]] * 3))
    g = torch.Generator().manual_seed(5)
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[order.pop() for _ in range(-(-n // bs))] for n in lens]
    for table, n in zip(tables, lens):
        slots = torch.tensor([table[t // bs] * bs + t % bs for t in range(n)])
        store.write(2, slots, kv_like(n, 2, 16, outliers, seed=n),
                    kv_like(n, 2, 16, outliers, seed=100 + n))
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(len(lens), 6, 16, generator=g)
    attn = PagedAttention(store)
    decode = DecodeRows(None, block_tables, torch.tensor(lens, dtype=torch.int32), max(lens))
    attn._scores = torch.empty(len(lens) * 6 * max(lens))
    out = attn._decode(q, 2, decode)
    for b, (n, table) in enumerate(zip(lens, tables)):
        k, v = store.gather(2, torch.tensor(table), n, torch.float32)  # [kv, n, d]
        ref = attention_reference(q[b:b + 1], k.transpose(0, 1), v.transpose(0, 1))[0]
        torch.testing.assert_close(out[b], ref, rtol=1e-4, atol=1e-4)


# -- int8, int4: block codecs with a residual window ------------------------------------------

@pytest.mark.parametrize("name, levels", [("int8", 255), ("int4", 15)])
@pytest.mark.parametrize("outliers", [False, True], ids=["gaussian", "outliers"])
def test_block_codec_error_is_at_most_half_a_step_of_its_group(name, levels, outliers):
    """K: per channel over a block's tokens; V: per token per 32 channels. Each value is within
    half a code step (range / levels) of its group, plus the fp16 rounding of scale and zero."""
    x = kv_like(64, 3, 64, outliers).view(4, 16, 3, 64)  # 4 blocks of 16 tokens
    k_codec, v_codec = codec_for(name, 0), codec_for(name, 1)
    kp = k_codec.encode_blocks(x)
    assert kp["codes"].shape == (4, 16, 3, 64 * len(bin(levels)[2:]) // 8)
    assert kp["scale"].shape == (4, 3, 64)
    back = k_codec.decode_blocks(kp, torch.float32)
    step = (x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)) / levels
    slack = 1e-3 * x.abs().amax(dim=1, keepdim=True) + 1e-5  # fp16 scale and zero
    assert ((back - x).abs() <= step / 2 + slack).all()
    vp = v_codec.encode_blocks(x)
    assert vp["scale"].shape == (4, 16, 3, 2)
    back = v_codec.decode_blocks(vp, torch.float32)
    xg = x.unflatten(-1, (2, 32))
    step = ((xg.amax(-1, keepdim=True) - xg.amin(-1, keepdim=True)) / levels).expand_as(xg)
    slack = 1e-3 * xg.abs().amax(-1, keepdim=True) + 1e-5
    assert ((back.unflatten(-1, (2, 32)) - xg).abs() <= step / 2 + slack).all()
    # per-channel K: an outlier channel does not coarsen the others (per-token would)
    if outliers:
        calm = [c for c in range(64) if c not in (3, 59, 11)]
        err = (k_codec.decode_blocks(kp, torch.float32) - x)[..., calm].abs().max()
        assert err < 0.5


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_constant_and_zero_blocks_decode_exactly(name):
    for which in (0, 1):
        codec = codec_for(name, which)
        for value in (0.0, 3.5):
            x = torch.full((1, 4, 2, 32), value)
            assert torch.equal(codec.decode_blocks(codec.encode_blocks(x), torch.float32), x)


def write_in_steps(store, layer, seq_id, table, k, v, chunks):
    """Write a sequence's K/V in steps of these sizes, as the engine would (a residual plan per
    step); returns nothing, the store holds them."""
    bs = store.layout.block_size
    start = 0
    for n in chunks:
        plan = store.plan_residual([SeqWrite(seq_id, 0, n, start)], torch.tensor([table])) \
            if store.has_residual else None
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(start, start + n)])
        store.write(layer, slots, k[start:start + n], v[start:start + n], plan)
        start += n


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("chunks", [[23], [5, 1, 1, 9, 7], [1] * 23, [8, 8, 7]])
def test_blocks_are_quantized_when_full_and_the_partial_block_stays_exact(name, chunks):
    """However the tokens arrive (a prefill chunk that ends mid-block, decodes one at a time),
    full blocks hold what the codec makes of exactly their tokens, and the partial block is
    read back exact from the sequence's residual window."""
    layout = KVLayout(spec(), 4, name)
    store = PagedKVStore(layout, num_blocks=9, device=torch.device("cpu"), residual_slots=2)
    table = [7, 2, 5, 0, 8, 3]
    k, v = kv_like(23, 2, 16, True, seed=4), kv_like(23, 2, 16, False, seed=5)
    write_in_steps(store, 1, "a", table, k, v, chunks)
    got_k, got_v = store.gather(1, torch.tensor(table), 23, torch.float32,
                                store.residual_slot("a"))
    for got, x, which in ((got_k, k, 0), (got_v, v, 1)):
        codec = codec_for(name, which)
        full = codec.decode_blocks(codec.encode_blocks(x[:20].view(5, 4, 2, 16)), torch.float32)
        assert torch.equal(got.transpose(0, 1)[:20], full.flatten(0, 1))
        assert torch.equal(got.transpose(0, 1)[20:], x[20:])  # the residual window: exact


def test_a_residual_window_travels_with_a_swap_and_is_freed_with_its_sequence():
    layout = KVLayout(spec(), 4, "int4")
    store = PagedKVStore(layout, num_blocks=6, device=torch.device("cpu"), residual_slots=1)
    k, v = kv_like(6, 2, 16, False, seed=6), kv_like(6, 2, 16, False, seed=7)
    write_in_steps(store, 0, "a", [1, 4], k, v, [6])
    before = store.gather(0, torch.tensor([1, 4]), 6, torch.float32, store.residual_slot("a"))
    window = store.take_residual("a")
    write_in_steps(store, 0, "b", [0, 2], -k, -v, [6])  # another sequence takes the slot
    store.release_residual("b")
    store.put_residual("a", window)
    after = store.gather(0, torch.tensor([1, 4]), 6, torch.float32, store.residual_slot("a"))
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    store.release_residual("a")
    assert store._free_slots == [0] and store._slot_of == {}


@pytest.mark.parametrize("name, window", [
    ("int8", 0), ("int4", 0), ("int8/int4", 0), ("int4/int8", 0), ("int8", 8), ("int4", 8),
    ("int8/int4", 12), ("fp8_e4m3", 8), ("fp8_e5m2", 4)])
@pytest.mark.parametrize("outliers", [False, True], ids=["gaussian", "outliers"])
def test_c_decode_reads_codes_and_residual_windows_as_the_reference(name, window, outliers):
    """Sequences whose lengths end mid-block, at a block boundary and inside the first block,
    blocks shuffled, windows of whole blocks wrapping around their ring: the C kernel against
    the gathered K/V (codes decoded, the window's blocks in float32) through the reference."""
    check_c_decode(name, window, outliers, [1, 5, 16, 23, 9])


@pytest.mark.parametrize("name, window", [("int8", 8), ("int4", 0), ("int8/int4", 12),
                                          ("float32", 0), ("bfloat16", 0)])
@pytest.mark.parametrize("lens", [[333], [150, 1, 97]], ids=["one", "three"])
def test_c_decode_split_into_runs_merges_as_the_reference(name, window, lens):
    """Long sequences and few of them: the float and int8/int4 kernels cut each sequence into
    runs of blocks (threads would otherwise idle at batch 1) and merge their partial softmaxes;
    short sequences beside them leave runs empty."""
    check_c_decode(name, window, True, lens)


def check_c_decode(name, window, outliers, lens, bs=4):
    from kvserve.kernels import cpu as cpu_kernels
    from kvserve.model.attention.metadata import DecodeRows
    from kvserve.model.attention.paged import PagedAttention

    if not cpu_kernels.available():
        pytest.skip("no C compiler: reference path only")
    s = ModelSpec(name="t", num_layers=3, hidden_size=32, intermediate_size=64, num_heads=6,
                  num_kv_heads=2, head_dim=64, vocab_size=50, max_position_embeddings=64)
    layout = KVLayout(s, bs, name, window_tokens=window)
    num_blocks = sum(-(-n // bs) for n in lens) + 3
    store = PagedKVStore(layout, num_blocks, torch.device("cpu"), residual_slots=len(lens))
    g = torch.Generator().manual_seed(5)
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[order.pop() for _ in range(-(-n // bs))] for n in lens]
    for i, (table, n) in enumerate(zip(tables, lens)):
        write_in_steps(store, 2, f"s{i}", table, kv_like(n, 2, 64, outliers, seed=n),
                       kv_like(n, 2, 64, outliers, seed=100 + n), [max(1, n - 2), 1, 1][:n])
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(len(lens), 6, 64, generator=g)
    attn = PagedAttention(store)
    attn._decode_slots = torch.tensor([store.residual_slot(f"s{i}") for i in range(len(lens))])
    decode = DecodeRows(None, block_tables, torch.tensor(lens, dtype=torch.int32), max(lens))
    attn._scores = torch.empty(len(lens) * 6 * max(lens))
    out = attn._decode(q, 2, decode)
    for b, (n, table) in enumerate(zip(lens, tables)):
        k, v = store.gather(2, torch.tensor(table), n, torch.float32, store.residual_slot(f"s{b}"))
        ref = attention_reference(q[b:b + 1], k.transpose(0, 1), v.transpose(0, 1))[0]
        torch.testing.assert_close(out[b], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["float32", "bfloat16"])
def test_c_decode_of_blocks_longer_than_a_run(name):
    """Blocks of 128 tokens: a float kernel's run (64 tokens, whole blocks) is one block."""
    check_c_decode(name, 0, True, [333, 5, 128], bs=128)


def test_k_and_v_in_different_formats_decode_each_with_its_own_codec():
    layout = KVLayout(spec(), 4, "fp8_e4m3/int4")
    store = PagedKVStore(layout, num_blocks=4, device=torch.device("cpu"))
    assert sorted(store.parts) == ["k.codes", "v.codes", "v.scale", "v.zero"]
    k, v = kv_like(7, 2, 16, True, seed=8), kv_like(7, 2, 16, False, seed=9)
    write_in_steps(store, 0, "a", [3, 1], k, v, [6, 1])
    got_k, got_v = store.gather(0, torch.tensor([3, 1]), 7, torch.float32, store.residual_slot("a"))
    assert store.residual[0] is None  # fp8 without a window (window_tokens 0): K has none
    fp8 = codec_for("fp8_e4m3")
    torch.testing.assert_close(got_k, fp8.decode(fp8.encode(k), torch.float32).transpose(0, 1))
    i4 = codec_for("int4", 1)
    full = i4.decode_blocks(i4.encode_blocks(v[:4].view(1, 4, 2, 16)), torch.float32)[0]
    assert torch.equal(got_v.transpose(0, 1)[:4], full)
    assert torch.equal(got_v.transpose(0, 1)[4:], v[4:])


@pytest.mark.parametrize("name", ["int8", "int4", "fp8_e4m3", "bfloat16/int4"])
@pytest.mark.parametrize("chunks", [[30], [5, 1, 1, 9, 13, 1], [1] * 30, [16, 14]])
def test_a_window_holds_its_last_blocks_exact_and_the_rest_as_codes(name, chunks):
    """However the tokens arrive, a read at the sequence's length sees its last window_blocks
    blocks exactly (float32) and every older token as its codes decode; the codes of every full
    block are written (a prefix hit or a swap reads them)."""
    bs, window = 4, 8  # 3 blocks: two whole and the partial one
    layout = KVLayout(spec(), bs, name, window_tokens=window)
    store = PagedKVStore(layout, num_blocks=10, device=torch.device("cpu"), residual_slots=2)
    assert store.window_blocks == 3
    table = [7, 2, 5, 0, 8, 3, 9, 1]
    k, v = kv_like(30, 2, 16, True, seed=4), kv_like(30, 2, 16, False, seed=5)
    write_in_steps(store, 1, "a", table, k, v, chunks)
    got = store.gather(1, torch.tensor(table), 30, torch.float32, store.residual_slot("a"))
    w0 = 20  # blocks 5..7 (tokens 20..29) are the window
    for which, (x, g) in enumerate(zip((k, v), got)):
        g = g.transpose(0, 1)
        side = name.split("/")[-1] if which else name.split("/")[0]
        if side == "bfloat16":  # a float side has no window: as stored
            assert torch.equal(g, x.to(torch.bfloat16).float())
            continue
        assert torch.equal(g[w0:], x[w0:])
        codec = codec_for(side, which)
        if codec.per_token:
            coded = codec.decode(codec.encode(x), torch.float32)
        else:
            coded = codec.decode_blocks(codec.encode_blocks(x[:28].view(7, 4, 2, 16)),
                                        torch.float32).flatten(0, 1)
        assert torch.equal(g[:w0], coded[:w0])
        assert torch.equal(store._decode(1, which, torch.tensor(table), 28, torch.float32),
                           coded[:28])  # every full block's codes, the window's too


def test_a_sequence_starting_after_a_prefix_hit_seeds_its_window_from_codes():
    bs, window = 4, 8
    layout = KVLayout(spec(), bs, "int4", window_tokens=window)
    store = PagedKVStore(layout, num_blocks=8, device=torch.device("cpu"), residual_slots=2)
    table = [6, 1, 4, 3, 0]
    k, v = kv_like(20, 2, 16, True, seed=11), kv_like(20, 2, 16, False, seed=12)
    write_in_steps(store, 0, "first", table, k, v, [16])  # blocks 0-3 full and coded
    store.release_residual("first")
    # "second" hits blocks 0-3 and computes from token 16: the window's blocks 2 and 3
    # (tokens 8..15) are seeded from their codes, in every layer
    plan = store.plan_residual([SeqWrite("second", 0, 2, 16)], torch.tensor([table]))
    slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(16, 18)])
    store.write(0, slots, k[16:18], v[16:18], plan)
    got_k, got_v = store.gather(0, torch.tensor(table), 18, torch.float32,
                                store.residual_slot("second"))
    for which, (x, g) in enumerate(((k, got_k), (v, got_v))):
        codec = codec_for("int4", which)
        coded = codec.decode_blocks(codec.encode_blocks(x[:16].view(4, 4, 2, 16)),
                                    torch.float32).flatten(0, 1)
        assert torch.equal(g.transpose(0, 1)[:16], coded)  # window rows 8..15 from codes
        assert torch.equal(g.transpose(0, 1)[16:], x[16:18])


@pytest.mark.parametrize("start, n, window_blocks", [(0, 37, 3), (0, 300, 2), (13, 9, 3),
                                                     (40, 1, 3), (21, 270, 1), (5, 3, 9)])
@pytest.mark.parametrize("sliding", [None, 5, 19])
@pytest.mark.parametrize("scale, softcap", [(None, None), (0.2, 1.0)])
def test_windowed_attention_equals_its_reference(start, n, window_blocks, sliding, scale,
                                                 softcap):
    """Each query reads the keys of its own window from the window and the older ones from
    their codes, in query chunks (the 300-query case crosses a chunk); a sliding-window layer
    (sliding) sees only its last `sliding` keys of either kind."""
    g = torch.Generator().manual_seed(start + n)
    bs, length = 4, start + n
    q = torch.randn(n, 6, 16, generator=g)
    codes = [torch.randn(length, 2, 16, generator=g) for _ in range(2)]
    held = [c + 0.1 * torch.randn(length, 2, 16, generator=g) for c in codes]
    want = attention_windowed_reference(q, codes[0], codes[1], held[0], held[1], bs,
                                        window_blocks, sliding, scale, softcap)
    w0 = int(window_starts(torch.tensor(start), bs, window_blocks))
    wn = int(window_starts(torch.tensor(length - 1), bs, window_blocks))
    got = attention_windowed(q, codes[0][:wn].transpose(0, 1), codes[1][:wn].transpose(0, 1),
                             held[0][w0:].transpose(0, 1), held[1][w0:].transpose(0, 1), w0,
                             bs, window_blocks, sliding, scale, softcap)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if sliding is not None and scale is None:  # the reference against the definition
        r = n - 1
        i = length - 1
        w = int(window_starts(torch.tensor(i), bs, window_blocks))
        keys = [torch.cat((c[:w], h[w:i + 1]))[max(0, i - sliding + 1):]
                for c, h in zip(codes, held)]
        scores = torch.einsum("hd,lhd->hl", q[r], keys[0].repeat_interleave(3, dim=1)) / 4.0
        last = torch.einsum("hl,lhd->hd", scores.softmax(-1), keys[1].repeat_interleave(3, dim=1))
        torch.testing.assert_close(want[r], last, rtol=1e-5, atol=1e-5)
