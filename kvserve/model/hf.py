"""Loads a Hugging Face folder of the Llama family (Llama, Mistral, Qwen2/2.5, Qwen3, Phi-3:
config.json + *.safetensors + tokenizer.json) into a Checkpoint with float32 tensors under the
Llama names (Phi-3's fused projections split), plus each architecture's extras (Qwen2's Q/K/V
biases, Qwen3's Q/K norms) and the layers' sliding windows in the spec.

The tokenizer is tokenizer.py's; choosing between GGUF and a Hugging Face folder is loader.py's.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from kvserve.config import ModelSpec, RopeScaling
from kvserve.errors import ConfigError, ModelLoadError
from kvserve.model.checkpoint import Checkpoint
from kvserve.model.tokenizer import Tokenizer

# architecture name -> model_type
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                 "Phi3ForCausalLM": "phi3", "Gemma2ForCausalLM": "gemma2",
                 "Gemma3ForCausalLM": "gemma3_text"}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES.values())
# Phi-3 keeps Q|K|V and gate|up fused in its checkpoint: split under the Llama names at load.
_FUSED = {"self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                        "self_attn.v_proj.weight"),
          "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}


def _read_config(path: str) -> dict[str, Any]:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ModelLoadError(f"'{path}' has no config.json: not a Hugging Face model folder")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {config_path}: {err}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_path} is not a JSON object")
    return config


def _model_type(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    model_type = config.get("model_type")
    if not archs and model_type in SUPPORTED_MODEL_TYPES:
        return model_type
    name = archs[0] if archs else model_type
    raise ModelLoadError(f"unsupported architecture '{name}' (supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)})")


def _layer_windows(config: dict[str, Any], model_type: str, num_layers: int) -> tuple[int, ...]:
    """Each layer's sliding window (0: full attention), as transformers reads the config:
    Mistral and Phi-3 window every layer when sliding_window is set (Mistral's default 4096);
    Qwen2/Qwen3 only with use_sliding_window, on the layers from max_window_layers on; a
    config's own layer_types list ("sliding_attention" / "full_attention") wins."""
    if model_type in ("mistral", "gemma2", "gemma3_text"):
        window = config.get("sliding_window", 4096)
    elif model_type in ("qwen2", "qwen3"):
        window = config.get("sliding_window", 4096) if config.get("use_sliding_window") else None
    else:
        window = config.get("sliding_window")
    if not window:
        return ()
    if not isinstance(window, int) or window < 1:
        raise ModelLoadError(f"config.json sliding_window must be a positive integer, got "
                             f"{window!r}")
    types = config.get("layer_types")
    if types is None and model_type.startswith("gemma"):  # Gemma 2: 1 local : 1 global
        every = 2 if model_type == "gemma2" else int(config.get("sliding_window_pattern", 6))
        types = ["sliding_attention" if (i + 1) % every else "full_attention"
                 for i in range(num_layers)]
    elif types is None:
        # transformers' Qwen2/Qwen3 default: windows from layer 28 on
        first = int(config.get("max_window_layers", 28)) if model_type.startswith("qwen") else 0
        types = ["sliding_attention" if i >= first else "full_attention"
                 for i in range(num_layers)]
    if len(types) != num_layers or not set(types) <= {"sliding_attention", "full_attention"}:
        raise ModelLoadError(f"config.json layer_types must name 'sliding_attention' or "
                             f"'full_attention' for each of the {num_layers} layers")
    windows = tuple(window if t == "sliding_attention" else 0 for t in types)
    return windows if any(windows) else ()


def _rope_scaling(config: dict[str, Any]) -> RopeScaling | None:
    # transformers >= 5 writes rope_parameters; older configs write rope_scaling.
    params = config.get("rope_scaling") or config.get("rope_parameters")
    if not params:
        return None
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ModelLoadError(f"unsupported rope scaling type '{kind}' (supported: llama3)")
    try:
        return RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    except KeyError as err:
        raise ModelLoadError(f"llama3 rope scaling is missing {err}") from None


def _rope_theta(config: dict[str, Any]) -> float:
    params = config.get("rope_parameters") or {}
    return float(config.get("rope_theta", params.get("rope_theta", 10000.0)))


ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


def _gemma(config: dict[str, Any], hidden: int, model_type: str) -> dict[str, Any]:
    """Gemma 2's and 3's departures from Llama (transformers' defaults where the config is
    silent)."""
    def cap(name: str, default: float) -> float | None:
        value = config.get(name, default)
        return None if value is None else float(value)

    if model_type == "gemma2":
        return dict(hidden_act="gelu_tanh", sandwich_norms=True, embed_scale=hidden ** 0.5,
                    attn_scale=float(config.get("query_pre_attn_scalar", 256)) ** -0.5,
                    attn_softcap=cap("attn_logit_softcapping", 50.0),
                    final_softcap=cap("final_logit_softcapping", 30.0))
    # Gemma 3: per-head Q/K norms, no soft-caps by default, a RoPE per layer type (the local
    # one on the windowed layers: a config without a window would lose which layers are local)
    if config.get("sliding_window", 4096) is None:
        raise ModelLoadError("a Gemma 3 config without sliding_window is not supported")
    params = config.get("rope_parameters") or {}
    if "full_attention" in params:  # transformers 5: one set per layer type
        full, local = params["full_attention"] or {}, params.get("sliding_attention") or {}
    else:  # older configs: rope_theta, rope_local_base_freq, rope_scaling
        full, local = dict(config.get("rope_scaling") or {}), {}
    kind, factor = full.get("rope_type", full.get("type", "default")), None
    if kind == "linear":
        factor = float(full["factor"])
    elif kind != "default" or local.get("rope_type", "default") != "default":
        raise ModelLoadError(f"unsupported Gemma 3 rope scaling '{kind}' (supported: linear)")
    return dict(hidden_act="gelu_tanh", sandwich_norms=True, embed_scale=hidden ** 0.5,
                attn_scale=float(config.get("query_pre_attn_scalar", 256)) ** -0.5,
                attn_softcap=cap("attn_logit_softcapping", None),
                final_softcap=cap("final_logit_softcapping", None), qk_norm=True,
                rope_theta=float(full.get("rope_theta", config.get("rope_theta", 1e6))),
                local_rope_theta=float(local.get("rope_theta",
                                                 config.get("rope_local_base_freq", 1e4))),
                rope_linear_factor=factor, rope_scaling=None)


def _spec(config: dict[str, Any], name: str) -> ModelSpec:
    model_type = _model_type(config)
    # Qwen2 always has Q/K/V biases (and none on O); elsewhere attention_bias would add one to O
    if (config.get("attention_bias") and model_type != "qwen2") or config.get("mlp_bias"):
        raise ModelLoadError("attention/MLP biases are not supported (beyond Qwen2's Q/K/V)")
    gemma = model_type.startswith("gemma")
    act = config.get("hidden_activation", config.get("hidden_act", "silu")) if gemma \
        else config.get("hidden_act", "silu")
    if act not in ACTIVATIONS or (gemma != (ACTIVATIONS[act] == "gelu_tanh")):
        raise ModelLoadError(f"unsupported hidden_act '{act}' for {model_type} (supported: "
                             f"{'gelu_pytorch_tanh' if gemma else 'silu'})")
    if float(config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ModelLoadError("partial rotary embeddings (partial_rotary_factor) are not "
                             "supported")
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        num_layers = int(config["num_hidden_layers"])
        extra = _gemma(config, hidden, model_type) if gemma else {}
        kw = dict(
            name=name, num_layers=num_layers, hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]), num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab_size=int(config["vocab_size"]),
            max_position_embeddings=int(config["max_position_embeddings"]),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            architecture=model_type, attention_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            layer_windows=_layer_windows(config, model_type, num_layers))
        if "rope_theta" not in extra:
            extra.update(rope_theta=_rope_theta(config), rope_scaling=_rope_scaling(config))
        return ModelSpec(**{**kw, **extra})
    except KeyError as err:
        raise ModelLoadError(f"config.json is missing {err}") from None
    except (TypeError, ValueError) as err:  # ConfigError is a ValueError
        kind = "an invalid model" if isinstance(err, ConfigError) else "a bad value"
        raise ModelLoadError(f"config.json describes {kind}: {err}") from None


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"'{path}' has no *.safetensors files (.bin checkpoints are not "
                             "supported)")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:  # one file, or the shards of an index: every tensor is in exactly one
        try:
            shard = load_file(file, device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelLoadError(f"cannot read {file}: not a valid or a truncated safetensors "
                                 f"file ({err})") from None
        tensors.update({name: t.to(torch.float32) for name, t in shard.items()})
    return tensors


def _expected(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    h, inter = spec.hidden_size, spec.intermediate_size
    want = {"model.embed_tokens.weight": (spec.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        want.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (spec.q_size, h),
            p + "self_attn.k_proj.weight": (spec.kv_size, h),
            p + "self_attn.v_proj.weight": (spec.kv_size, h),
            p + "self_attn.o_proj.weight": (h, spec.q_size),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter)})
        if spec.attention_bias:
            want.update({p + "self_attn.q_proj.bias": (spec.q_size,),
                         p + "self_attn.k_proj.bias": (spec.kv_size,),
                         p + "self_attn.v_proj.bias": (spec.kv_size,)})
        if spec.qk_norm:
            want.update({p + "self_attn.q_norm.weight": (spec.head_dim,),
                         p + "self_attn.k_norm.weight": (spec.head_dim,)})
        if spec.sandwich_norms:
            want.update({p + "pre_feedforward_layernorm.weight": (h,),
                         p + "post_feedforward_layernorm.weight": (h,)})
    if not spec.tie_word_embeddings:
        want["lm_head.weight"] = (spec.vocab_size, h)
    return want


def _split_fused(tensors: dict[str, torch.Tensor], spec: ModelSpec) -> None:
    """Phi-3's qkv_proj / gate_up_proj rows -> q/k/v_proj and gate/up_proj, in place."""
    sizes = {"self_attn.qkv_proj.weight": (spec.q_size, spec.kv_size, spec.kv_size),
             "mlp.gate_up_proj.weight": (spec.intermediate_size,) * 2}
    for name in [n for n in tensors if n.startswith("model.layers.")]:
        prefix, _, rest = name.partition(".layers.")
        layer, _, suffix = rest.partition(".")
        if suffix in _FUSED:
            fused = tensors.pop(name)
            if fused.shape[0] != sum(sizes[suffix]):
                raise ModelLoadError(f"tensor {name} has {fused.shape[0]} rows, expected "
                                     f"{sum(sizes[suffix])} from config.json")
            for part, t in zip(_FUSED[suffix], fused.split(sizes[suffix])):
                tensors[f"{prefix}.layers.{layer}.{part}"] = t


def _select(tensors: dict[str, torch.Tensor], spec: ModelSpec,
            path: str) -> dict[str, torch.Tensor]:
    """Exactly the tensors the spec needs, shapes checked; extras (rotary caches, a tied
    lm_head copy) are dropped."""
    want = _expected(spec)
    _split_fused(tensors, spec)
    missing = [name for name in want if name not in tensors]
    if missing:
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise ModelLoadError(f"'{path}' is missing tensor(s): {', '.join(missing[:4])}{more}")
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise ModelLoadError(f"'{path}': tensor {name} has shape "
                                 f"{tuple(tensors[name].shape)}, expected {shape} from config.json")
    return {name: tensors[name] for name in want}


def load_hf_folder(path: str) -> Checkpoint:
    """Reads a Llama-family Hugging Face folder into float32 tensors and a Tokenizer."""
    if not os.path.isdir(path):
        raise ModelLoadError(f"model folder '{path}' not found")
    spec = _spec(_read_config(path), os.path.basename(os.path.normpath(path)))
    tensors = _select(_load_tensors(path), spec, path)
    if spec.architecture.startswith("gemma"):  # Gemma's RMSNorm scales by (1 + weight)
        for name, t in tensors.items():
            if name.endswith("norm.weight"):
                tensors[name] = t + 1.0
    return Checkpoint(spec=spec, tensors=tensors, tokenizer=Tokenizer.from_hf_folder(path),
                      source=path, source_format="hf")
