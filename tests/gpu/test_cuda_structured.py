"""Structured outputs on CUDA, unchanged: the grammar masks (built on the host) applied to the
device's logits give the CPU's constrained text on the tiny model. Marked gpu: skipped where
torch sees no CUDA device."""

from __future__ import annotations

import json

import pytest
import torch

from kvserve import LLM, SamplingParams, StructuredOutputs

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

SCHEMA = {"type": "object", "properties": {"k": {"enum": ["x", "y"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["k", "n"], "additionalProperties": False}


@pytest.mark.parametrize("spec", [StructuredOutputs(regex=r"[0-9]{3}-[a-z]{2}"),
                                  StructuredOutputs(choice=["alpha", "beta gamma"]),
                                  StructuredOutputs(json=SCHEMA)])
def test_structured_outputs_on_cuda_give_the_cpu_text(tiny_hf_dir, spec):
    params = SamplingParams(n=2, max_tokens=40, temperature=0.0, structured_outputs=spec)
    prompts = ["the cache", "a block of"]

    def texts(**kw):
        llm = LLM(model=str(tiny_hf_dir), block_size=4, **kw)
        return [c.text for o in llm.generate(prompts, params, use_tqdm=False) for c in o.outputs]

    gpu = texts(device="cuda")
    assert gpu == texts()
    if spec.json is not None:
        assert all(json.loads(t)["k"] in ("x", "y") for t in gpu)
