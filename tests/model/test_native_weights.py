"""--quantization gguf: a GGUF's Q4_0/Q4_1/Q8_0 matrices multiplied as stored, on tiny models
written in each format, against the same file dequantized to float32 (--quantization none) and
against the model's own reference layer (PyTorch over QuantWeight.dequantize)."""

import fixtures
import pytest
import torch
from test_engine_tiny import PROMPTS, SHORT_GREEDY, decode_logits, greedy_tokens

from kvserve import LLM
from kvserve.errors import ModelLoadError
from kvserve.kernels import cpu as cpu_kernels
from kvserve.kernels.qweight import QuantWeight

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="C kernels not built")


@pytest.fixture(scope="module", params=["Q4_0", "Q4_1", "Q8_0"])
def gguf_file(request, tiny_hf_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("native") / f"tiny-{request.param}.gguf"
    return fixtures.write_tiny_gguf(path, tiny_hf_dir, qtype=request.param), request.param


def test_blocks_stay_quantized_and_agree_with_the_dequantized_model(gguf_file):
    path, qtype = gguf_file
    native = LLM(model=str(path), quantization="gguf", cache_mode="contiguous")
    dense = LLM(model=str(path), cache_mode="contiguous", quantization="none")
    model = native.engine.model
    assert model.weights_as_stored and not dense.engine.model.weights_as_stored
    assert isinstance(model.layers[0].gate_up, QuantWeight)
    assert model.layers[0].gate_up.format == ("q8" if qtype == "Q8_0" else "q4")
    # stored bytes: a 32-value block is 18 (Q4_0, kept as Q4_1's 20), 20 or 34 bytes
    assert model.num_weight_bytes_per_token() < dense.engine.model.num_weight_bytes_per_token() / 3
    ids = native.tokenizer.encode("The KV cache")
    tokens_native, logits_native = decode_logits(native, ids, 24)
    tokens_dense, logits_dense = decode_logits(dense, ids, 24)
    assert tokens_native == tokens_dense
    scale = logits_dense.abs().max().item()
    assert (logits_native - logits_dense).abs().max().item() < 1e-3 * scale
    assert greedy_tokens(native, PROMPTS[:3], SHORT_GREEDY) == \
        greedy_tokens(dense, PROMPTS[:3], SHORT_GREEDY)


def test_fused_c_layer_equals_the_reference_layer_on_stored_blocks(gguf_file):
    path, _ = gguf_file
    llm = LLM(model=str(path), quantization="gguf", cache_mode="contiguous")
    model = llm.engine.model
    ids = llm.tokenizer.encode("The KV cache")
    runs = {}
    try:
        for fast in (True, False):
            model.use_fast_decode = fast
            runs[fast] = decode_logits(llm, ids, 24)
    finally:
        model.use_fast_decode = True
    assert runs[True][0] == runs[False][0]
    scale = runs[False][1].abs().max().item()
    assert (runs[True][1] - runs[False][1]).abs().max().item() < 1e-3 * scale


def test_a_hugging_face_folder_cannot_be_kept_as_stored(tiny_hf_dir):
    with pytest.raises(ModelLoadError, match="keeps a GGUF file's blocks"):
        LLM(model=str(tiny_hf_dir), quantization="gguf")
    assert not LLM(model=str(tiny_hf_dir)).engine.model.weights_as_stored  # auto: dequantized


def test_auto_keeps_blocks_on_cpu_float32_only(gguf_file):
    path, _ = gguf_file
    assert LLM(model=str(path)).engine.model.weights_as_stored  # the default
    assert not LLM(model=str(path), dtype="bfloat16").engine.model.weights_as_stored


def test_prefill_sized_batches_multiply_dequantized_weights(gguf_file):
    """Past MAX_M rows the product is torch's GEMM over the C-dequantized weight: the same
    numbers as the float32 model's."""
    path, _ = gguf_file
    native = LLM(model=str(path), quantization="gguf")
    x = torch.randn(cpu_kernels.MAX_M + 7, 64)
    w = native.engine.model.layers[0].gate_up
    torch.testing.assert_close(cpu_kernels.linear(x, w), x @ w.dequantize().t(),
                               rtol=1e-5, atol=1e-5)
