"""A model's shape as the planner needs it, read from a Hugging Face config.json or a GGUF's
metadata (no weights are read, no torch). Presets of well-known models live in presets.py.

Parameter counts come from the shape (embeddings, attention, MLP or experts, norms, biases); a
GGUF's are exact (the sum of its tensors' elements). KV heads default to the attention heads (MHA)
when a config names none, as Hugging Face does.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any

from kvserve.config import ModelSpec
from kvserve.errors import ConfigError, ModelLoadError


@dataclass(frozen=True)
class ModelShape:
    name: str
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # per expert for mixtures of experts
    vocab_size: int
    max_context: int
    sliding_window: int | None = None  # tokens a sliding-window layer attends to
    num_sliding_layers: int = 0  # layers that use the window (the rest attend to everything)
    num_experts: int = 1
    tie_word_embeddings: bool = False
    gated_mlp: bool = True  # SwiGLU/GeGLU: gate, up and down projections (else up and down)
    qkv_bias: bool = False
    dense_bias: bool = False  # biases on the attention output and the MLP (GPT-2)
    norm_bias: bool = False  # LayerNorm (weight + bias) rather than RMSNorm (weight)
    norms_per_layer: int = 2
    learned_positions: bool = False  # a position embedding table (GPT-2) rather than RoPE
    exact_num_params: int | None = None  # the sum of a checkpoint's tensors, when read from one
    stored_weights_bytes: int | None = None  # bytes of the weights as stored in the file
    source: str = "preset"

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "vocab_size", "max_context", "num_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{self.source}: {name} must be a positive integer, "
                                  f"got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{self.source}: num_attention_heads ({self.num_heads}) is not a "
                              f"multiple of num_key_value_heads ({self.num_kv_heads})")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"{self.source}: sliding_window must be positive, "
                              f"got {self.sliding_window!r}")
        if not 0 <= self.num_sliding_layers <= self.num_layers:
            raise ConfigError(f"{self.source}: {self.num_sliding_layers} sliding-window layers "
                              f"of {self.num_layers}")

    @property
    def attention_kind(self) -> str:
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"

    @property
    def num_params(self) -> int:
        return self.exact_num_params or self.computed_num_params

    @property
    def computed_num_params(self) -> int:
        h = self.hidden_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        attn += (q + 2 * kv) * self.qkv_bias + h * self.dense_bias
        inter = self.intermediate_size
        mlp = (3 if self.gated_mlp else 2) * h * inter + (inter + h) * self.dense_bias
        mlp = self.num_experts * mlp + (h * self.num_experts if self.num_experts > 1 else 0)
        norm = h * (2 if self.norm_bias else 1)
        per_layer = attn + mlp + self.norms_per_layer * norm
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        embed += self.max_context * h * self.learned_positions
        return self.num_layers * per_layer + embed + norm

    @classmethod
    def from_spec(cls, spec: ModelSpec, source: str) -> ModelShape:
        """The shape of a model already loaded (its KV figures need no second read of the
        file): every sliding-window layer priced at the largest window."""
        windows = [w for w in spec.layer_windows if w]
        return cls(name=spec.name, architecture=spec.architecture, num_layers=spec.num_layers,
                   hidden_size=spec.hidden_size, num_heads=spec.num_heads,
                   num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                   intermediate_size=spec.intermediate_size, vocab_size=spec.vocab_size,
                   max_context=spec.max_position_embeddings,
                   sliding_window=max(windows) if windows else None,
                   num_sliding_layers=len(windows),
                   tie_word_embeddings=spec.tie_word_embeddings, qkv_bias=spec.attention_bias,
                   source=source)

    def to_spec(self) -> ModelSpec:
        """The engine's ModelSpec for the same shape: KVLayout (the one memory formula) reads it."""
        return ModelSpec(name=self.name, num_layers=self.num_layers, hidden_size=self.hidden_size,
                         intermediate_size=self.intermediate_size, num_heads=self.num_heads,
                         num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                         vocab_size=self.vocab_size, max_position_embeddings=self.max_context,
                         architecture=self.architecture)


# Families whose MLP has no gate, whose embeddings are tied, or that add biases, when a config
# does not say (Hugging Face's per-model defaults).
_PLAIN_MLP = {"gpt2", "gpt_bigcode", "gpt_neox", "gptj", "falcon", "opt", "bloom", "phi", "mpt"}
_TIED_BY_DEFAULT = {"gpt2", "gpt_bigcode", "gemma", "gemma2", "gemma3_text", "falcon", "bloom",
                    "opt"}
_GPT2_LIKE = {"gpt2", "gpt_bigcode"}
_QKV_BIAS = {"qwen2", "qwen2_moe"}
_EXTRA_NORMS = {"gemma2": 4, "gemma3_text": 4}


def _first(cfg: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return None


def _int(cfg: dict[str, Any], source: str, *keys: str, default: int | None = None) -> int:
    value = _first(cfg, *keys)
    if value is None:
        if default is not None:
            return default
        raise ConfigError(f"{source} has no {' / '.join(keys)}")
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{source}: {keys[0]} must be an integer, got {value!r}")
    return value


def _sliding_layers(cfg: dict[str, Any], model_type: str, num_layers: int) -> int:
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list):
        return sum(t == "sliding_attention" for t in layer_types)
    if cfg.get("use_sliding_window") is False:
        return 0
    if model_type == "gemma2":
        return (num_layers + 1) // 2  # even layers are local
    if model_type in ("gemma3_text", "gemma3"):
        pattern = int(cfg.get("sliding_window_pattern") or 6)
        return sum((i + 1) % pattern != 0 for i in range(num_layers))
    if model_type in ("qwen2", "qwen2_moe") and cfg.get("max_window_layers") is not None:
        return max(0, num_layers - int(cfg["max_window_layers"]))
    return num_layers


def shape_from_hf_config(cfg: dict[str, Any], name: str, source: str) -> ModelShape:
    """A ModelShape from a parsed Hugging Face config.json (text_config of multimodal ones)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source} is not a JSON object")
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    if cfg.get("kv_lora_rank"):
        raise ConfigError(f"{source}: multi-head latent attention (kv_lora_rank, DeepSeek) "
                          "stores a compressed KV the planner does not model yet")
    model_type = str(cfg.get("model_type", "")).lower()
    layers = _int(cfg, source, "num_hidden_layers", "n_layer", "num_layers")
    hidden = _int(cfg, source, "hidden_size", "n_embd", "d_model")
    heads = _int(cfg, source, "num_attention_heads", "n_head")
    multi_query = cfg.get("multi_query") is True and cfg.get("new_decoder_architecture") is not True
    kv_heads = _int(cfg, source, "num_key_value_heads", "num_kv_heads",
                    default=1 if multi_query else heads)
    if hidden % heads and _first(cfg, "head_dim") is None:
        raise ConfigError(f"{source}: hidden size {hidden} is not a multiple of "
                          f"{heads} heads and no head_dim is given")
    window = _first(cfg, "sliding_window")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool)):
        raise ConfigError(f"{source}: sliding_window must be an integer, got {window!r}")
    gpt2_like = model_type in _GPT2_LIKE
    return ModelShape(
        name=name, architecture=model_type or "unknown", num_layers=layers, hidden_size=hidden,
        num_heads=heads, num_kv_heads=kv_heads,
        head_dim=_int(cfg, source, "head_dim", default=hidden // heads),
        intermediate_size=_int(cfg, source, "intermediate_size", "n_inner", "ffn_dim",
                               default=4 * hidden),
        vocab_size=_int(cfg, source, "vocab_size"),
        max_context=_int(cfg, source, "max_position_embeddings", "n_positions",
                         "max_sequence_length", "seq_length"),
        sliding_window=window,
        num_sliding_layers=_sliding_layers(cfg, model_type, layers) if window else 0,
        num_experts=_int(cfg, source, "num_local_experts", "num_experts", default=1),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", model_type in _TIED_BY_DEFAULT)),
        gated_mlp=model_type not in _PLAIN_MLP,
        qkv_bias=bool(cfg.get("attention_bias", model_type in _QKV_BIAS)) or gpt2_like,
        dense_bias=gpt2_like or bool(cfg.get("mlp_bias", False)), norm_bias=gpt2_like,
        norms_per_layer=_EXTRA_NORMS.get(model_type, 2), learned_positions=gpt2_like,
        source=source)


def read_hf_config(path: str) -> ModelShape:
    """A config.json file, or a Hugging Face folder holding one."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"'{file}' not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"'{file}' is not valid JSON ({err})") from None
    folder = os.path.dirname(os.path.abspath(file))
    return shape_from_hf_config(cfg, os.path.basename(folder), f"'{file}'")


def read_gguf(path: str) -> ModelShape:
    """A GGUF's metadata and tensor table (memory-mapped: no tensor data is read). Parsing the
    tokenizer arrays takes seconds, so a file read once is remembered while it is unchanged."""
    stat = os.stat(path) if os.path.isfile(path) else None
    return _read_gguf(path, (stat.st_size, stat.st_mtime_ns) if stat else None)


@functools.lru_cache(maxsize=8)
def _read_gguf(path: str, _version: tuple[int, int] | None) -> ModelShape:
    from kvserve.model_files import gguf_metadata, open_gguf

    reader = open_gguf(path)
    meta = gguf_metadata(reader)
    arch = meta.get("general.architecture")
    source = f"'{path}'"
    if not arch:
        raise ModelLoadError(f"{source} has no general.architecture in its metadata")

    def key(name: str, default: int | None = None) -> int:
        value = meta.get(f"{arch}.{name}")
        if isinstance(value, list):  # per-layer values (e.g. head counts): the largest one
            value = max(value) if value else None
        if value is None:
            if default is None:
                raise ModelLoadError(f"{source}: GGUF metadata has no '{arch}.{name}'")
            return default
        return int(value)

    hidden, heads = key("embedding_length"), key("attention.head_count")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size", len(tokens) if tokens is not None else 0)
    names = {t.name for t in reader.tensors}
    window = meta.get(f"{arch}.attention.sliding_window")
    layers = key("block_count")
    return ModelShape(
        name=str(meta.get("general.name") or os.path.basename(path)), architecture=str(arch),
        num_layers=layers, hidden_size=hidden, num_heads=heads,
        num_kv_heads=key("attention.head_count_kv", heads),
        head_dim=key("attention.key_length", hidden // heads),
        intermediate_size=key("feed_forward_length"), vocab_size=vocab,
        max_context=key("context_length"), sliding_window=int(window) if window else None,
        num_sliding_layers=_sliding_layers({}, str(arch), layers) if window else 0,
        num_experts=key("expert_count", 1), tie_word_embeddings="output.weight" not in names,
        exact_num_params=sum(int(t.n_elements) for t in reader.tensors),
        stored_weights_bytes=sum(int(t.n_bytes) for t in reader.tensors), source=source)
