"""Built-in shapes of well-known models, from their published config.json files.

Each entry is what the model's own Hugging Face config says (layers, heads, KV heads, head_dim,
sliding window, sizes); tests check the parameter counts the planner derives from them against the
published ones. Names are matched case-insensitively; close misses get suggestions.
"""

from __future__ import annotations

import difflib

from kvserve.errors import ConfigError
from kvserve.planner.shapes import ModelShape


def _llama(name: str, layers: int, hidden: int, inter: int, heads: int, kv: int, vocab: int,
           context: int, **kw) -> ModelShape:
    return ModelShape(name=name, architecture=kw.pop("architecture", "llama"), num_layers=layers,
                      source="the built-in preset table",
                      hidden_size=hidden, num_heads=heads, num_kv_heads=kv,
                      head_dim=kw.pop("head_dim", hidden // heads), intermediate_size=inter,
                      vocab_size=vocab, max_context=context, **kw)


_PRESETS = [
    # key, shape                                   (published parameter count in the comment)
    ("llama-3-8b", _llama("Llama 3 8B", 32, 4096, 14336, 32, 8, 128256, 8192)),  # 8.03B
    ("llama-3-70b", _llama("Llama 3 70B", 80, 8192, 28672, 64, 8, 128256, 8192)),  # 70.6B
    ("llama-3.1-8b", _llama("Llama 3.1 8B", 32, 4096, 14336, 32, 8, 128256, 131072)),  # 8.03B
    ("llama-3.1-70b", _llama("Llama 3.1 70B", 80, 8192, 28672, 64, 8, 128256, 131072)),
    ("llama-3.1-405b", _llama("Llama 3.1 405B", 126, 16384, 53248, 128, 8, 128256,
                              131072)),  # 405.9B
    ("llama-2-7b", _llama("Llama 2 7B", 32, 4096, 11008, 32, 32, 32000, 4096)),  # 6.74B, MHA
    ("mistral-7b", _llama("Mistral 7B v0.1", 32, 4096, 14336, 32, 8, 32000, 32768,
                          architecture="mistral", sliding_window=4096,
                          num_sliding_layers=32)),  # 7.24B
    ("mistral-7b-v0.3", _llama("Mistral 7B v0.3", 32, 4096, 14336, 32, 8, 32768, 32768,
                               architecture="mistral")),  # 7.25B
    ("mixtral-8x7b", _llama("Mixtral 8x7B", 32, 4096, 14336, 32, 8, 32000, 32768,
                            architecture="mixtral", num_experts=8)),  # 46.7B
    ("qwen2.5-7b", _llama("Qwen2.5 7B", 28, 3584, 18944, 28, 4, 152064, 131072,
                          architecture="qwen2", qkv_bias=True)),  # 7.62B
    ("qwen2.5-72b", _llama("Qwen2.5 72B", 80, 8192, 29568, 64, 8, 152064, 131072,
                           architecture="qwen2", qkv_bias=True)),  # 72.7B
    ("gemma-2-9b", _llama("Gemma 2 9B", 42, 3584, 14336, 16, 8, 256000, 8192,
                          architecture="gemma2", head_dim=256, sliding_window=4096,
                          num_sliding_layers=21, tie_word_embeddings=True,
                          norms_per_layer=4)),  # 9.24B
    ("gemma-2b", _llama("Gemma 2B", 18, 2048, 16384, 8, 1, 256000, 8192, architecture="gemma",
                        head_dim=256, tie_word_embeddings=True)),  # 2.51B, MQA
    ("smollm2-135m", _llama("SmolLM2 135M", 30, 576, 1536, 9, 3, 49152, 8192,
                            tie_word_embeddings=True)),  # 134.5M
    ("smollm2-360m", _llama("SmolLM2 360M", 32, 960, 2560, 15, 5, 49152, 8192,
                            tie_word_embeddings=True)),  # 361.8M
    ("smollm2-1.7b", _llama("SmolLM2 1.7B", 24, 2048, 8192, 32, 32, 49152, 8192,
                            tie_word_embeddings=True)),  # 1.71B, MHA
    ("gpt2", _llama("GPT-2", 12, 768, 3072, 12, 12, 50257, 1024, architecture="gpt2",
                    tie_word_embeddings=True, gated_mlp=False, qkv_bias=True, dense_bias=True,
                    norm_bias=True, learned_positions=True)),  # 124.4M, MHA
]
PRESETS: dict[str, ModelShape] = dict(_PRESETS)
_ALIASES = {"llama3-8b": "llama-3-8b", "llama3-70b": "llama-3-70b",
            "llama3.1-405b": "llama-3.1-405b", "mixtral": "mixtral-8x7b",
            "gpt-2": "gpt2", "smollm2": "smollm2-135m"}


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def find_preset(name: str) -> ModelShape | None:
    key = _normalize(name)
    key = _ALIASES.get(key, key)
    return PRESETS.get(key)


def suggest(name: str, n: int = 3) -> list[str]:
    """The preset names closest to a mistyped one."""
    key = _normalize(name)
    close = difflib.get_close_matches(key, list(PRESETS), n=n, cutoff=0.5)
    if not close:  # a family name alone ('qwen', 'llama'): the presets that contain it
        close = [p for p in PRESETS if key and key.split("-")[0] in p][:n]
    return close


def unknown_preset_error(name: str) -> ConfigError:
    close = suggest(name)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return ConfigError(f"unknown model preset {name!r}: {hint}(presets: {', '.join(PRESETS)}; "
                       "or pass a config.json, a Hugging Face folder or a GGUF file)")
