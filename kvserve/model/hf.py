"""Loads a Hugging Face Llama-family folder (config.json + *.safetensors + tokenizer.json) into a
Checkpoint with float32 tensors under their own Hugging Face names.

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

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral")


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


def _check_architecture(config: dict[str, Any]) -> None:
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    if any(a in SUPPORTED_ARCHITECTURES for a in archs) or (
            not archs and model_type in SUPPORTED_MODEL_TYPES):
        return
    name = archs[0] if archs else model_type
    raise ModelLoadError(f"unsupported architecture '{name}' (supported: llama family: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)})")


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


def _spec(config: dict[str, Any], name: str) -> ModelSpec:
    _check_architecture(config)
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ModelLoadError("attention/MLP biases are not supported")
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        return ModelSpec(
            name=name, num_layers=int(config["num_hidden_layers"]), hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]), num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab_size=int(config["vocab_size"]),
            max_position_embeddings=int(config["max_position_embeddings"]),
            rope_theta=_rope_theta(config),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            rope_scaling=_rope_scaling(config), architecture="llama")
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
    if not spec.tie_word_embeddings:
        want["lm_head.weight"] = (spec.vocab_size, h)
    return want


def _select(tensors: dict[str, torch.Tensor], spec: ModelSpec,
            path: str) -> dict[str, torch.Tensor]:
    """Exactly the tensors the spec needs, shapes checked; extras (rotary caches, a tied
    lm_head copy) are dropped."""
    want = _expected(spec)
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
    return Checkpoint(spec=spec, tensors=tensors, tokenizer=Tokenizer.from_hf_folder(path),
                      source=path, source_format="hf")
