"""The default model's own Q4_1/Q8_0 GGUF multiplied as stored (--quantization gguf) against the
same file dequantized to float32: greedy decoding agrees token for token."""

import pytest

from kvserve import LLM, SamplingParams
from kvserve.kernels import cpu as cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="C kernels not built")

PROMPTS = ["The old lighthouse keeper climbed the spiral stairs at dusk, and",
           "def fibonacci(n):\n    ", "List three facts about the Moon:"]


def test_native_greedy_equals_the_dequantized_float32_model():
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    native, dense = LLM(quantization="gguf"), LLM(quantization="none")
    described = native.engine.model.weights_description()
    assert described.startswith("weights quantized (120 q4, 1 q8 matrices)"), described
    assert native.engine.model.num_weight_bytes_per_token() == 96_576_768  # the file's blocks
    got = [o.outputs[0].token_ids for o in native.generate(PROMPTS, params, use_tqdm=False)]
    want = [o.outputs[0].token_ids for o in dense.generate(PROMPTS, params, use_tqdm=False)]
    assert got == want
