"""Fidelity on the embedded SmolLM2-135M-Instruct against Hugging Face transformers (float32).

transformers loads the same GGUF file independently (its own dequantization, its own model code);
greedy tokens must match exactly for 48 tokens on six varied prompts (plain and chat-templated),
and last-position logits within 1e-3. Every cache mode must give the same tokens.
"""

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.model.attention import AttentionMetadata
from kvserve.model.attention.dense import NoCacheAttention
from kvserve.model.loader import default_model_path

transformers = pytest.importorskip("transformers")

NUM_TOKENS = 48
PLAIN = [
    "The KV cache is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Die Hauptstadt von Frankreich ist",
]
CHAT = [
    [{"role": "user", "content": "Explain in two sentences why the sky is blue."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "List three prime numbers greater than 100."}],
    [{"role": "user", "content": "What is 17 * 23? Show your working."}],
]


@pytest.fixture(scope="module")
def llm():
    return LLM(quantization="none")  # the exact path: weights dequantized as transformers does


@pytest.fixture(scope="module")
def prompts(llm):
    ids = [llm.tokenizer.encode(p) for p in PLAIN]
    ids += [llm.encode_chat(c) for c in CHAT]
    return ids


@pytest.fixture(scope="module")
def hf_model():
    import os

    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def hf_greedy(hf_model, prompts):
    outs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            y = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NUM_TOKENS,
                                  min_new_tokens=NUM_TOKENS, do_sample=False)
            outs.append(y[0, len(ids):].tolist())
    return outs


GREEDY = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)


def test_greedy_tokens_match_transformers_batched(llm, prompts, hf_greedy):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    for out, expected in zip(outs, hf_greedy):
        assert list(out.token_ids) == expected


@pytest.mark.parametrize("cache_mode", ["none", "contiguous", "paged"])
def test_each_cache_mode_matches_transformers_one_by_one(prompts, hf_greedy, cache_mode):
    llm = LLM(cache_mode=cache_mode, quantization="none")
    for ids, expected in zip(prompts[::2], hf_greedy[::2]):  # every other prompt keeps CI short
        out = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)[0]
        assert list(out.token_ids) == expected


def test_last_position_logits_match_transformers(llm, prompts, hf_model):
    model = llm.engine.model
    for ids in prompts:
        n = len(ids)
        ours = model.forward(torch.tensor(ids), torch.arange(n), NoCacheAttention(model.spec),
                             AttentionMetadata.single("x", n), torch.tensor([n - 1]))[0]
        with torch.no_grad():
            theirs = hf_model(torch.tensor([ids])).logits[0, -1].float()
        assert (ours - theirs).abs().max().item() < 1e-3
