"""Quantized weights: GGUF's block formats parsed against gguf-py's own dequantize, weights
quantized at load (int8/int4), and the C products over every layout (decode-sized and
prefill-sized batches) against QuantWeight.dequantize and the int16-activation reference."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from kvserve.kernels import cpu
from kvserve.kernels.qweight import (
    QuantWeight,
    cat,
    round_activations,
    rounded_activation_linear,
)
from kvserve.kernels.qweight import quantize as quantize_weight
from kvserve.model.gguf_blocks import BLOCK_SIZES, from_gguf_blocks

# every layout the kernels take: q4 and q5 (min always), q8 with or without mins, scales per 32
# or 16; scales float16, (_f32) float32, or (_int) the k-quants' integers x a float32 factor per
# 256 values (only for rows of a multiple of 256)
LAYOUTS = ["q4", "q5", "q8", "q8_min", "q8_g16", "q4_f32", "q5_f32", "q8_min_f32", "q8_g16_f32",
           "q4_int", "q5_int", "q8_g16_int"]


def random_weight(fmt: str, n: int, k: int, seed: int, outliers: bool = False) -> QuantWeight:
    g = torch.Generator().manual_seed(seed)
    if fmt.endswith("_f32"):
        w = random_weight(fmt.removesuffix("_f32"), n, k, seed, outliers)
        return w._map(lambda t: t.float() if t.is_floating_point() else t)
    if fmt.endswith("_int"):  # as Q4_K / Q5_K (uint8 sc, m) and Q6_K (int8 sc per 16) hold them
        if k % 256:
            pytest.skip("integer scales need rows of a multiple of 256")
        w = random_weight(fmt.removesuffix("_int"), n, k, seed, outliers)
        # float16 values, as a file's d and dmin are: every product then exact in float32
        sb = (torch.rand(n, k // 256, generator=g) * 1e-3 + 1e-4).half().float()
        if w.group == 16:
            sc = torch.randint(-128, 128, (n, k // 16), generator=g, dtype=torch.int8)
            return QuantWeight("q8", w.codes, sc, None, 16, scale_sb=sb)
        sc = torch.randint(0, 64, (n, k // 32), generator=g, dtype=torch.uint8)
        m = torch.randint(0, 64, (n, k // 32), generator=g, dtype=torch.uint8)
        return QuantWeight(w.format, w.codes, sc, m, 32, w.high, sb, -sb * 3)
    group = 16 if fmt == "q8_g16" else 32
    scale = (torch.rand(n, k // group, generator=g) * 0.05 + 1e-3).half()
    if outliers:  # a few blocks with scales 100x the rest, as real checkpoints have
        scale.view(-1)[::7] *= 100
    mins = (-torch.rand(n, k // 32, generator=g) * 0.3).half()
    if fmt.startswith("q8"):
        codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        return QuantWeight("q8", codes, scale, mins if fmt == "q8_min" else None, group)
    codes = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    if fmt == "q5":
        high = torch.randint(0, 256, (n, k // 8), generator=g, dtype=torch.uint8)
        return QuantWeight("q5", codes, scale, mins, 32, high)
    return QuantWeight("q4", codes, scale, mins)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0])
def test_gguf_blocks_parse_to_what_gguf_py_dequantizes(qtype):
    """The formats the layouts hold exactly: bit for bit."""
    x = np.random.default_rng(0).standard_normal((6, 96)).astype(np.float32)
    blocks = quantize(x, qtype)
    w = from_gguf_blocks(qtype.name, blocks, 6, 96)
    want = torch.from_numpy(np.asarray(dequantize(blocks, qtype), dtype=np.float32).reshape(6, 96))
    assert torch.equal(w.dequantize(), want)


def random_blocks(name: str, n: int, k: int, seed: int, d_scale: float = 0.01) -> np.ndarray:
    """Random bytes as blocks of `name`, with sane float16 d (and dmin / min) fields."""
    rng = np.random.default_rng(seed)
    per, size = BLOCK_SIZES[name]
    raw = rng.integers(0, 256, (n, k // per, size), dtype=np.uint8)
    offsets = [208] if name == "Q6_K" else [0, 2] if name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") \
        else [0]
    for off in offsets:
        d = np.clip(rng.standard_normal((n, k // per)) * d_scale, -6e4, 6e4).astype(np.float16)
        raw[..., off:off + 2] = d.view(np.uint8).reshape(n, k // per, 2)
    return raw.reshape(n, -1)


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_blocks_parse_to_what_gguf_py_dequantizes(name):
    """k-quants: sc and m kept as stored with d and -dmin per super-block, multiplied in float32
    as gguf-py does, so bit for bit too (d * sc rounded to float16 was off by up to 2^-11,
    enough to move a tiny model's logits by ~0.6%)."""
    n, k = 5, 512
    raw = random_blocks(name, n, k, seed=1)
    want = torch.from_numpy(np.asarray(dequantize(raw, Q[name]), dtype=np.float32).reshape(n, k))
    w = from_gguf_blocks(name, raw, n, k)
    assert (w.format, w.group) == {"Q4_K": ("q4", 32), "Q5_K": ("q5", 32), "Q6_K": ("q8", 16)}[name]
    assert w.scale.dtype == (torch.int8 if name == "Q6_K" else torch.uint8)  # as stored
    assert torch.equal(w.dequantize(), want)
    if cpu.load() is not None:
        assert torch.equal(cpu.dequantize(w), want)


def test_q4_0_blocks_whose_min_overflows_float16_keep_float32_scales():
    """Q4_0's min = -8 * d leaves float16 when |d| > 8188: scales and mins go float32 instead."""
    raw = random_blocks("Q4_0", 2, 256, seed=2, d_scale=30000.0)
    w = from_gguf_blocks("Q4_0", raw, 2, 256)
    assert w.scale.dtype == torch.float32
    want = np.asarray(dequantize(raw, Q.Q4_0), dtype=np.float32).reshape(2, 256)
    assert torch.equal(w.dequantize(), torch.from_numpy(want))


def test_q4_1_blocks_of_the_default_model_parse_exactly():
    from kvserve.model_files import default_model_path, open_gguf

    reader = open_gguf(default_model_path())
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert t.tensor_type == Q.Q4_1
    n, k = int(t.shape[1]), int(t.shape[0])
    w = from_gguf_blocks("Q4_1", t.data, n, k)
    want = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(n, k)
    assert torch.equal(w.dequantize(), torch.from_numpy(want))
    assert w.nbytes() == t.n_bytes  # kept at its stored size


needs_c = pytest.mark.skipif(cpu.load() is None, reason="no C compiler: reference path only")


@needs_c
# per-row kernels below 8 rows, the int16 panel GEMM from 8 to kv_gemm_rows() (256; past
# MAX_M without AVX2), then torch's float32 GEMM over the dequantized weight
@pytest.mark.parametrize("m", [1, 2, 5, 8, 13, 64, 65, 200, 300])
# k = 224: 7 blocks, an odd count (the kernel pairs blocks); 1536: 48 blocks, 8 at a time
@pytest.mark.parametrize("fmt,n,k", [(f, n, k) for f in LAYOUTS for n, k in (
    (1, 32), (7, 96), (5, 224), (130, 576), (9, 1536), (6, 256)) if k % 256 == 0
    or not f.endswith("_int")])
def test_products_over_blocks_equal_the_dequantized_reference(fmt, m, n, k):
    w = random_weight(fmt, n, k, seed=m + n + k, outliers=True)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    x[:, 5] *= 50  # an outlier channel: its blocks get a coarse int16 step
    want = x.double() @ w.dequantize().double().t()
    got = cpu.linear(x, w)
    decode = m <= max(cpu.MAX_M, cpu.load().kv_gemm_rows())  # X rounded to int16 per block
    assert_within_int16_rounding(got, want, x, w, decode=decode)
    assert_within_int16_rounding(cpu.reference_linear(x, w), want, x, w, decode=False)
    if decode:  # the kernel is its reference's arithmetic: X rounded, then exact products
        assert_close_to_float32_rounding(got, rounded_activation_linear(x, w), x, w)


@needs_c
@pytest.mark.parametrize("fmt", ["q4", "q8_g16_int"])
def test_the_panel_gemm_takes_any_number_of_rows(fmt):
    """kv_gemv_q (called directly: linear() takes it only to kv_gemm_rows()) runs the panel GEMM
    at any m where built with AVX2: 2,085 rows equal the reference too."""
    if not cpu.load().kv_gemm_rows():
        pytest.skip("built without AVX2")
    w = random_weight(fmt, 40, 256, seed=5)
    x = torch.randn(2048 + 37, 256, generator=torch.Generator().manual_seed(5))
    y = torch.empty(x.shape[0], 40)
    cpu._quant_product(w, x.data_ptr(), y.data_ptr(), x.shape[0], 40, 256, 0)
    assert_close_to_float32_rounding(y, rounded_activation_linear(x, w), x, w)


def test_activations_round_per_block_to_int16_half_to_even():
    x = torch.zeros(2, 64)
    x[0, :32] = torch.linspace(-32767, 32767, 32)  # max|x| = 32767: a step of exactly 1
    x[0, 3], x[0, 4] = 2.5, 3.5  # halfway: to the even neighbours 2 and 4
    x[1, 32:] = 5.0  # a constant block, and a zero block (step 0, codes 0)
    codes, dx = round_activations(x)
    assert codes[0, 0, 3] == 2 and codes[0, 0, 4] == 4 and dx[0, 0] == 1
    assert codes[0, 0, 0] == -32767 and codes[0, 0, 31] == 32767
    assert torch.equal(codes[1, 0], torch.zeros(32)) and dx[1, 0] == 0
    assert torch.equal(codes[1, 1], torch.full((32,), 32767.0))


@needs_c
@pytest.mark.parametrize("m", [3, 200])  # the per-row kernels, the panel GEMM
def test_the_kernels_round_activations_exactly_as_the_reference(m):
    if m > cpu.MAX_M and not cpu.load().kv_gemm_rows():
        pytest.skip("built without AVX2: no panel GEMM, torch's float32 GEMM past MAX_M")
    # an identity weight (q8 codes 1 on the diagonal, scale 1) hands back each code times its step
    w = QuantWeight("q8", torch.eye(32, dtype=torch.int8), torch.ones(32, 1).half(), None, 32)
    x = torch.randn(m * 8, 32, generator=torch.Generator().manual_seed(m)) * 3
    codes, dx = round_activations(x)
    got = torch.cat([cpu.linear(x[i:i + m], w) for i in range(0, x.shape[0], m)])
    kernel_codes = got.double() / dx.double()  # code * step, rounded once to float32
    assert float((kernel_codes - kernel_codes.round()).abs().max()) < 0.01
    assert torch.equal(kernel_codes.round(), codes[:, 0].double())


def assert_close_to_float32_rounding(got, want, x, w):
    """Within float32 accumulation (relative to sum |x| |w|): 1e-7 at one row of X, up to 5e-6
    at 64 (the min term summed apart); int16 rounding itself moves products by up to ~1e-4."""
    scale = x.double().abs() @ w.dequantize().double().abs().t() + 1e-6
    assert float(((got.double() - want).abs() / scale).max()) < 1e-5


def assert_within_int16_rounding(got, want, x, w, decode):
    """The decode kernel rounds each block of 32 activations to int16 (step max|x| / 32767, so
    at most half a step per element): its error is bounded by sum_j |code_j * scale| * step / 2
    over each block (q4's min term uses the exact float sums), plus float32 rounding."""
    n, k = w.shape
    ref = w.dequantize().double()
    if w.min is not None:
        ref = ref - w.min.double().repeat_interleave(32, dim=1)
    step = x.double().abs().view(x.shape[0], k // 32, 32).amax(-1) / 32767  # [m, blocks]
    per_block = ref.abs().view(n, k // 32, 32).sum(-1)  # [n, blocks]
    bound = (step / 2 if decode else 0 * step) @ per_block.t()
    slop = 1e-5 * (x.double().abs() @ w.dequantize().double().abs().t()) + 1e-6
    err = (got.double() - want).abs()
    assert bool((err <= bound + slop).all()), float((err - bound - slop).max())


@needs_c
@pytest.mark.parametrize("fmt", LAYOUTS)
def test_products_accumulate_into_y_and_dequantize_in_c_equals_the_reference(fmt):
    k = 512 if fmt.endswith("_int") else 160
    w = random_weight(fmt, 33, k, seed=3)
    for m in (4, 20):  # the per-row kernels, the panel GEMM
        x, y = torch.randn(m, k), torch.randn(m, 33)
        y0 = y.clone()
        cpu.linear_add_(y, x, w)
        want = x.double() @ w.dequantize().double().t()
        assert_within_int16_rounding(y - y0, want, x, w, True)
        assert_close_to_float32_rounding(y - y0, rounded_activation_linear(x, w), x, w)
    assert torch.equal(cpu.dequantize(w), w.dequantize())
    ids = torch.tensor([32, 0, 7, 7, 31, 2], dtype=torch.long)  # repeats, any order
    for pick in (ids, ids[:1], ids[:0]):  # one row (decode), none
        assert torch.equal(cpu.dequantize_rows(w, pick), w.rows(pick).dequantize())


def test_rows_and_cat_keep_blocks_whole():
    a, b = random_weight("q4", 5, 64, 1), random_weight("q4", 3, 64, 2)
    fused = cat([a, b])
    assert fused.shape == (8, 64)
    assert torch.equal(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    perm = torch.tensor([4, 0, 3, 1, 2])
    assert torch.equal(a.rows(perm).dequantize(), a.dequantize()[perm])


@pytest.mark.parametrize("others", [["q8"], ["q8_g16"], ["q8_min", "q8"], ["q8_g16", "q4"],
                                    ["q8_g16_f32"], ["q4_f32"], ["q5"], ["q5_f32", "q8"],
                                    ["q4_int"], ["q8_g16_int"]])
def test_cat_of_different_layouts_widens_them_exactly(others):
    """A Q4_K_M file's Q4_K Q and K beside a Q6_K V: one fused q8 matrix, the same values;
    q4 beside q5 becomes q5; float16 scales beside float32 ones widen to float32."""
    parts = [random_weight("q4", 5, 256, 1)] + [random_weight(f, 3, 256, i + 2)
                                                 for i, f in enumerate(others)]
    fused = cat(parts)
    assert fused.format == ("q4" if others in (["q4_f32"], ["q4_int"]) else
                            "q5" if others == ["q5"] else "q8")
    assert fused.group == (16 if any("g16" in f for f in others) else 32)
    assert fused.scale_kind == (1 if any(f.endswith(("f32", "int")) for f in others) else 0)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_rounds_each_weight_to_its_nearest_level(bits):
    """--quantization int8|int4: every weight within half a step of its value (plus float16's
    rounding of the block min for int4), codes in range, and outliers kept in their own blocks."""
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(bits))
    x[2, 40] = 100.0  # one block with an outlier: its step only
    x[4, 64:96] = 0.0  # an all-zero block: scale 0, exact zeros
    w = quantize_weight(x, bits)
    assert w.format == ("q8" if bits == 8 else "q4") and w.shape == (6, 128)
    step = w.scale.float().repeat_interleave(32, dim=1)
    slack = 0 if bits == 8 else w.min.float().abs().repeat_interleave(32, dim=1) * 2.0 ** -11
    assert bool(((w.dequantize() - x).abs() <= step / 2 + slack + 1e-6).all())
    assert torch.equal(w.dequantize()[4, 64:96], torch.zeros(32))
    fine = w.scale.float()[2, 0], w.scale.float()[2, 1]
    assert fine[1] > 10 * fine[0]  # the outlier's block alone got the coarse step
    with pytest.raises(ValueError, match="8 or 4"):
        quantize_weight(x, 2)


def test_the_dequantized_checkpoint_equals_gguf_py_bit_for_bit():
    """--quantization none dequantizes the blocks in C: the same floats gguf-py makes."""
    from kvserve.model.gguf import unpermute_rows
    from kvserve.model.loader import load_checkpoint
    from kvserve.model_files import default_model_path, open_gguf

    ckpt = load_checkpoint(None, "none")
    raw = {t.name: t for t in open_gguf(default_model_path()).tensors}
    for gguf_name, hf_name, heads in [
            ("blk.7.ffn_up.weight", "model.layers.7.mlp.up_proj.weight", 0),
            ("blk.2.attn_q.weight", "model.layers.2.self_attn.q_proj.weight",
             ckpt.spec.num_heads),
            ("token_embd.weight", "model.embed_tokens.weight", 0)]:
        t = raw[gguf_name]
        shape = tuple(int(d) for d in reversed(t.shape))
        want = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type),
                                         dtype=np.float32).reshape(shape))
        if heads:
            want = unpermute_rows(want, heads)
        assert torch.equal(ckpt.tensors[hf_name], want), gguf_name
