"""Quantized GGUF files on CUDA, unchanged: every format the CPU keeps as stored (Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1, the k-quants and a Q4_K_M-style mix) loads on the GPU dequantized to the
activation dtype (stored blocks run on cpu/float32 only) and gives the CPU's stored-block run's
greedy tokens; asking for stored blocks or load-time int8/int4 on CUDA is one clear ConfigError.
Marked gpu: skipped where torch sees no CUDA device."""

from __future__ import annotations

import fixtures
import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.errors import ConfigError

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

FORMATS = ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q4_K_M"]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [(5 * i + 7 * j) % 200 + 10 for j in range(n)]}
           for i, n in enumerate([9, 1, 17, 40])]


@pytest.fixture(scope="module")
def wide_hf_dir(tmp_path_factory):
    return fixtures.write_tiny_llama(tmp_path_factory.mktemp("wide") / "tiny-wide", wide=True)


@pytest.mark.parametrize("qtype", FORMATS)
def test_gguf_formats_on_cuda_give_the_cpu_stored_block_tokens(qtype, tiny_hf_dir, wide_hf_dir,
                                                               tmp_path):
    hf_dir = wide_hf_dir if qtype.startswith(fixtures.K_QUANTS + ("Q4_K_M",)) else tiny_hf_dir
    path = str(fixtures.write_tiny_gguf(tmp_path / f"tiny-{qtype}.gguf", hf_dir, qtype=qtype))
    cpu = LLM(model=path)
    assert cpu.engine.model.weights_as_stored
    gpu = LLM(model=path, device="cuda")
    assert not gpu.engine.model.weights_as_stored  # auto: dequantized on CUDA
    assert gpu.engine.model.device.type == "cuda"
    tokens = [[list(o.token_ids) for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
              for llm in (cpu, gpu)]
    assert tokens[0] == tokens[1]


@pytest.mark.parametrize("quantization", ["gguf", "int8", "int4"])
def test_stored_or_load_time_quantized_weights_on_cuda_are_refused(quantization,
                                                                    tiny_gguf_path):
    with pytest.raises(ConfigError, match="runs on cpu with dtype float32"):
        LLM(model=str(tiny_gguf_path), device="cuda", quantization=quantization)
