"""Weights in GGUF's block formats: the parse against gguf-py's own dequantize, and the C products
over the blocks (decode-sized and prefill-sized batches) against QuantWeight.dequantize."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from kvserve.kernels import cpu
from kvserve.kernels.qweight import (
    QuantWeight,
    cat,
    from_gguf_blocks,
    round_activations,
    rounded_activation_linear,
)


def random_weight(fmt: str, n: int, k: int, seed: int, outliers: bool = False) -> QuantWeight:
    g = torch.Generator().manual_seed(seed)
    scale = (torch.rand(n, k // 32, generator=g) * 0.05 + 1e-3).half()
    if outliers:  # a few blocks with scales 100x the rest, as real checkpoints have
        scale.view(-1)[::7] *= 100
    if fmt == "q8":
        codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        return QuantWeight("q8", codes, scale, None)
    codes = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    mins = (-torch.rand(n, k // 32, generator=g) * 0.3).half()
    return QuantWeight("q4", codes, scale, mins)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q8_0])
def test_gguf_blocks_parse_to_what_gguf_py_dequantizes(qtype):
    x = np.random.default_rng(0).standard_normal((6, 96)).astype(np.float32)
    blocks = quantize(x, qtype)
    w = from_gguf_blocks(qtype.name, blocks, 6, 96)
    want = torch.from_numpy(np.asarray(dequantize(blocks, qtype), dtype=np.float32).reshape(6, 96))
    assert torch.equal(w.dequantize(), want)


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
@pytest.mark.parametrize("fmt", ["q4", "q8"])
@pytest.mark.parametrize("m", [1, 2, 5, 64, 65, 300])  # decode kernel up to MAX_M, then dequantize
# k = 224: 7 blocks, an odd count (the kernel pairs blocks); 1536: 48 blocks, 8 at a time
@pytest.mark.parametrize("n,k", [(1, 32), (7, 96), (5, 224), (130, 576), (9, 1536)])
def test_products_over_blocks_equal_the_dequantized_reference(fmt, m, n, k):
    w = random_weight(fmt, n, k, seed=m + n + k, outliers=True)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    x[:, 5] *= 50  # an outlier channel: its blocks get a coarse int16 step
    want = x.double() @ w.dequantize().double().t()
    got = cpu.linear(x, w)
    decode = m <= cpu.MAX_M
    assert_within_int16_rounding(got, want, x, w, decode=decode)
    assert_within_int16_rounding(cpu.reference_linear(x, w), want, x, w, decode=False)
    if decode:  # the kernel is its reference's arithmetic: X rounded, then exact products
        assert_close_to_float32_rounding(got, rounded_activation_linear(x, w), x, w)


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
    if w.format == "q4":
        ref = ref - w.min.double().repeat_interleave(32, dim=1)
    step = x.double().abs().view(x.shape[0], k // 32, 32).amax(-1) / 32767  # [m, blocks]
    per_block = ref.abs().view(n, k // 32, 32).sum(-1)  # [n, blocks]
    bound = (step / 2 if decode else 0 * step) @ per_block.t()
    slop = 1e-5 * (x.double().abs() @ w.dequantize().double().abs().t()) + 1e-6
    err = (got.double() - want).abs()
    assert bool((err <= bound + slop).all()), float((err - bound - slop).max())


@needs_c
@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_products_accumulate_into_y_and_dequantize_in_c_equals_the_reference(fmt):
    w = random_weight(fmt, 33, 160, seed=3)
    x, y = torch.randn(4, 160), torch.randn(4, 33)
    y0 = y.clone()
    cpu.linear_add_(y, x, w)
    assert_within_int16_rounding(y - y0, x.double() @ w.dequantize().double().t(), x, w, True)
    assert_close_to_float32_rounding(y - y0, rounded_activation_linear(x, w), x, w)
    assert torch.equal(cpu.dequantize(w), w.dequantize())


def test_rows_and_cat_keep_blocks_whole():
    a, b = random_weight("q4", 5, 64, 1), random_weight("q4", 3, 64, 2)
    fused = cat([a, b])
    assert fused.shape == (8, 64)
    assert torch.equal(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    perm = torch.tensor([4, 0, 3, 1, 2])
    assert torch.equal(a.rows(perm).dequantize(), a.dequantize()[perm])
    with pytest.raises(ValueError, match="different quantized formats"):
        cat([a, random_weight("q8", 2, 64, 3)])


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
