"""Mistral, Qwen2, Qwen3, Phi-3, Gemma 2 and 3 against transformers, token for token: tiny
models that transformers itself builds from a config and writes (save_pretrained), read by
kvserve's loader, and run in every cache mode. Prompts are longer than the sliding windows, so
the windowed layers really drop keys (checked: a window longer than the prompt answers
differently)."""

from __future__ import annotations

import json

import fixtures
import pytest
import torch

from kvserve import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=fixtures.tiny_tokenizer().get_vocab_size(), hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=fixtures.BOS_ID,
            eos_token_id=fixtures.EOS_ID)
# name -> (config class, its extra settings, what kvserve should read from it)
ARCHS = {
    # every layer windowed (Mistral v0.1 style)
    "mistral": ("MistralConfig", dict(head_dim=16, sliding_window=6), (6, 6)),
    # Q/K/V biases; the window on layers from max_window_layers on
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
              (0, 5)),
    # per-head Q/K norms, head_dim apart from hidden / heads, no window
    "qwen3": ("Qwen3Config", dict(head_dim=24), ()),
    # Q|K|V and gate|up fused in the checkpoint, every layer windowed
    "phi3": ("Phi3Config", dict(sliding_window=7, pad_token_id=0), (7, 7)),
    # local (windowed) and global layers alternating, GeGLU, four norms of (1 + w), the
    # embedding times sqrt(hidden), scores scaled by query_pre_attn_scalar ** -0.5 and
    # soft-capped, final logits soft-capped (caps small enough here to bite)
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=6, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=3.0, final_logit_softcapping=5.0,
                                    pad_token_id=0), (6, 0)),
    # Gemma 2's layer plus per-head Q/K norms, and a RoPE per layer type: the local layer's own
    # base, the global layer's with linear scaling (as Gemma 3 4B+)
    "gemma3_text": ("Gemma3TextConfig", dict(
        head_dim=16, sliding_window=6, query_pre_attn_scalar=24, pad_token_id=0,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}}),
        (6, 0)),
}
PROMPTS = [[(11 * i + 5 * j) % 200 + 10 for j in range(n)] for i, n in enumerate([23, 9, 31])]
NEW_TOKENS = 20


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights of std 0.1 and norms around 1 (transformers' 0.02 init gives near-flat logits,
    where greedy ties would decide nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if p.dim() == 1 and "norm" in name else 0.1 * noise)


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_model(request, tmp_path_factory):
    name = request.param
    cls, extra, windows = ARCHS[name]
    config = getattr(transformers, cls)(**BASE, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    _randomize(model, seed=len(name))
    model.eval()
    folder = tmp_path_factory.mktemp(name) / name
    model.save_pretrained(folder)
    fixtures.write_tiny_tokenizer(folder)
    return name, folder, model, windows


def _hf_greedy(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens by full forward passes, and log-softmax at every prompt position."""
    seq = list(prompt)
    with torch.no_grad():
        first = model(torch.tensor([seq])).logits[0].float().log_softmax(-1)  # [n, vocab]
        for _ in range(NEW_TOKENS):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):], first


# int8 K/V whose float32 residual window (KIVI's, kvstore/paged.py) holds every token here: the
# windowed attention path, exact
MODES = {"none": {}, "contiguous": {}, "paged": {},
         "paged-int8": dict(kv_cache_dtype="int8", kv_residual_tokens=128)}


@pytest.mark.parametrize("mode", list(MODES))
def test_architecture_equals_transformers_token_for_token(arch_model, mode):
    name, folder, model, windows = arch_model
    # paged: steps of 16 tokens (chunked prompts), so a windowed group releases blocks
    steps = dict(max_num_batched_tokens=16) if mode.startswith("paged") else {}
    llm = LLM(model=str(folder), cache_mode=mode.split("-")[0], block_size=4, max_model_len=128,
              **MODES[mode], **steps)
    spec = llm.engine.spec
    assert spec.architecture == name and spec.layer_windows == windows
    if mode == "paged":  # windowed and full layers: a block table for each (kvcache/groups.py)
        hybrid = 0 in windows and any(windows)
        assert len(llm.engine.block_manager.groups) == (2 if hybrid else 1)
    assert (spec.attention_bias, spec.qk_norm) == (name == "qwen2",
                                                   name in ("qwen3", "gemma3_text"))
    if name == "gemma3_text":
        assert (spec.rope_theta, spec.local_rope_theta, spec.rope_linear_factor) == \
            (100000.0, 500.0, 4.0)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True,
                            prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        tokens, logprobs = _hf_greedy(model, prompt)
        assert list(out.token_ids) == tokens
        ours = torch.tensor([lp for lp, _ in out.prompt_logprobs[1:]])
        theirs = logprobs[:-1].gather(-1, torch.tensor(prompt[1:]).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_the_windows_matter(arch_model, tmp_path):
    """The same weights read with a window longer than the prompt (full attention for it; the
    layer types, which also pick Gemma 3's RoPE, unchanged) give other log-probs past the
    window."""
    name, folder, _, windows = arch_model
    if not windows:
        pytest.skip(f"{name}: no sliding window here")
    full = tmp_path / "full"
    full.mkdir()
    for f in folder.iterdir():
        (full / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.update(sliding_window=1000)
    (full / "config.json").write_text(json.dumps(config))
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    prompt = {"prompt_token_ids": PROMPTS[2]}
    runs = [LLM(model=str(f), cache_mode="paged", block_size=4).generate(
        prompt, params, use_tqdm=False)[0] for f in (folder, full)]
    assert runs[1].prompt_logprobs
    assert set(LLM(model=str(full)).engine.spec.layer_windows) <= {0, 1000}
    window = max(windows)
    before = [lp for lp, _ in runs[0].prompt_logprobs[1:window]]
    assert before == pytest.approx([lp for lp, _ in runs[1].prompt_logprobs[1:window]], abs=1e-5)
    after = torch.tensor([[lp for lp, _ in r.prompt_logprobs[window + 1:]] for r in runs])
    assert (after[0] - after[1]).abs().max() > 1e-3
