"""--quantization gguf: a GGUF's quantized matrices multiplied without dequantizing them (Q8_0,
Q4_0, Q4_1, Q5_0, Q5_1, the k-quants Q4_K, Q5_K, Q6_K, and a Q4_K_M-style mix of them), on tiny
models written in each format, against the same file dequantized to float32 (--quantization none)
and against the model's own reference layer (PyTorch over QuantWeight.dequantize)."""

import fixtures
import pytest
import torch
from test_engine_tiny import PROMPTS, SHORT_GREEDY, decode_logits, greedy_tokens

from kvserve import LLM
from kvserve.errors import ModelLoadError
from kvserve.kernels import cpu as cpu_kernels
from kvserve.kernels.qweight import QuantWeight, rounded_activation_linear

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="C kernels not built")


# format -> the layout its FFN's gate|up matrix is kept in
LAYOUT = {"Q4_0": "q4", "Q4_1": "q4", "Q8_0": "q8", "Q5_0": "q5", "Q5_1": "q5", "Q4_K": "q4",
          "Q5_K": "q5", "Q6_K": "q8", "Q4_K_M": "q4"}


@pytest.fixture(scope="module")
def wide_hf_dir(tmp_path_factory):
    """The tiny Llama with rows of 256 and 512 inputs (k-quant super-blocks hold 256)."""
    return fixtures.write_tiny_llama(tmp_path_factory.mktemp("wide") / "tiny-wide", wide=True)


@pytest.fixture(scope="module", params=list(LAYOUT))
def gguf_file(request, tiny_hf_dir, wide_hf_dir, tmp_path_factory):
    qtype = request.param
    hf_dir = wide_hf_dir if qtype.startswith(fixtures.K_QUANTS + ("Q4_K_M",)) else tiny_hf_dir
    path = tmp_path_factory.mktemp("native") / f"tiny-{qtype}.gguf"
    return fixtures.write_tiny_gguf(path, hf_dir, qtype=qtype), qtype


def test_blocks_stay_quantized_and_agree_with_the_dequantized_model(gguf_file):
    path, qtype = gguf_file
    native = LLM(model=str(path), quantization="gguf", cache_mode="contiguous")
    dense = LLM(model=str(path), cache_mode="contiguous", quantization="none")
    model = native.engine.model
    assert model.weights_as_stored and not dense.engine.model.weights_as_stored
    assert isinstance(model.layers[0].gate_up, QuantWeight)
    assert model.layers[0].gate_up.format == LAYOUT[qtype]
    if qtype == "Q4_K_M":  # Q4_K Q and K beside a Q6_K V: fused, widened to q8 with 16-value scales
        assert (model.layers[0].qkv.format, model.layers[0].qkv.group) == ("q8", 16)
    # bytes per 32 values: 20 (q4), 34-40 (q8, with mins or 16-value scales), vs 128 in float32
    assert model.num_weight_bytes_per_token() < dense.engine.model.num_weight_bytes_per_token() / 3
    ids = native.tokenizer.encode("The KV cache")
    tokens_native, logits_native = decode_logits(native, ids, 24)
    tokens_dense, logits_dense = decode_logits(dense, ids, 24)
    assert tokens_native == tokens_dense
    scale = logits_dense.abs().max().item()
    assert (logits_native - logits_dense).abs().max().item() < 1e-3 * scale
    assert greedy_tokens(native, PROMPTS[:3], SHORT_GREEDY) == \
        greedy_tokens(dense, PROMPTS[:3], SHORT_GREEDY)


def fast_and_reference(llm: LLM, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decode through the fused C layer and through the reference layer: the same tokens,
    logits within 1e-3 of their scale. Returns the fused run's tokens and logits."""
    model = llm.engine.model
    runs = {}
    try:
        for fast in (True, False):
            model.use_fast_decode = fast
            runs[fast] = decode_logits(llm, ids, n)
    finally:
        model.use_fast_decode = True
    assert runs[True][0] == runs[False][0]
    scale = runs[False][1].abs().max().item()
    assert (runs[True][1] - runs[False][1]).abs().max().item() < 1e-3 * scale
    return runs[True]


def test_fused_c_layer_equals_the_reference_layer_on_stored_blocks(gguf_file):
    path, _ = gguf_file
    llm = LLM(model=str(path), quantization="gguf", cache_mode="contiguous")
    fast_and_reference(llm, llm.tokenizer.encode("The KV cache"), 24)


def test_a_hugging_face_folder_cannot_be_kept_as_stored(tiny_hf_dir):
    with pytest.raises(ModelLoadError, match="keeps a GGUF file's blocks"):
        LLM(model=str(tiny_hf_dir), quantization="gguf")
    assert not LLM(model=str(tiny_hf_dir)).engine.model.weights_as_stored  # auto: dequantized


def test_auto_keeps_blocks_on_cpu_float32_only(gguf_file):
    path, _ = gguf_file
    assert LLM(model=str(path)).engine.model.weights_as_stored  # the default
    assert not LLM(model=str(path), dtype="bfloat16").engine.model.weights_as_stored


def test_prefill_sized_batches_take_the_panel_gemm_then_dequantized_weights(gguf_file):
    """Past MAX_M rows, up to kv_gemm_rows(), the product is the int16 panel GEMM (X rounded per
    block as at decode: rounded_activation_linear); past that, torch's GEMM over the
    C-dequantized weight: the same numbers as the float32 model's."""
    path, _ = gguf_file
    native = LLM(model=str(path), quantization="gguf")
    w = native.engine.model.layers[0].gate_up
    x = torch.randn(cpu_kernels.MAX_M + 7, w.shape[1])
    want = (rounded_activation_linear(x, w).float() if cpu_kernels.load().kv_gemm_rows()
            else x @ w.dequantize().t())
    torch.testing.assert_close(cpu_kernels.linear(x, w), want, rtol=1e-5, atol=1e-5)
    x = torch.randn(max(cpu_kernels.MAX_M, cpu_kernels.load().kv_gemm_rows()) + 7, w.shape[1])
    torch.testing.assert_close(cpu_kernels.linear(x, w), x @ w.dequantize().t(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_int8_and_int4_quantize_every_matrix_of_a_hugging_face_folder(tiny_hf_dir, quantization):
    """--quantization int8|int4: each matrix quantized at load (qweight.quantize), multiplied by
    the same kernels; the fused C layer equals the reference layer over those weights, and the
    model stays near the float32 one (int8 closely, int4 loosely: 16 levels per block)."""
    llm = LLM(model=str(tiny_hf_dir), quantization=quantization, cache_mode="contiguous")
    dense = LLM(model=str(tiny_hf_dir), cache_mode="contiguous")
    model = llm.engine.model
    mats = [x for lw in model.layers for x in (lw.qkv, lw.o, lw.gate_up, lw.down)]
    want = "q8" if quantization == "int8" else "q4"
    assert all(isinstance(x, QuantWeight) and x.format == want for x in mats)
    assert model.lm_head.format == "q8"  # the embedding / LM head stay at 8 bits
    described = model.weights_description()
    assert described.startswith(f"weights quantized ({len(mats) + 1} q8 matrices)" if want == "q8"
                                else f"weights quantized ({len(mats)} q4, 1 q8 matrices)")
    assert model.num_weight_bytes_per_token() < dense.engine.model.num_weight_bytes_per_token() / 3
    ids = llm.tokenizer.encode("The KV cache")
    tokens, logits = fast_and_reference(llm, ids, 16)
    # against float32, teacher-forced on the quantized model's own tokens
    _, logits_dense = decode_logits(dense, ids, 16, forced=tokens)
    err = (logits - logits_dense).abs().max().item() / logits_dense.abs().max().item()
    # measured 2.7% and 31% of the largest logit on this random 2-layer model (quantization
    # error alone: the fused layer equals its reference above); a wrong layout gives 100%+
    assert err < (0.05 if quantization == "int8" else 0.5), err


def test_int8_and_int4_run_on_cpu_float32_only(tiny_hf_dir):
    from kvserve.errors import ConfigError

    with pytest.raises(ConfigError, match="quantization 'int4' runs on cpu with dtype float32"):
        LLM(model=str(tiny_hf_dir), quantization="int4", dtype="bfloat16")
