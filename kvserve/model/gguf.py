"""Loads a llama.cpp GGUF file into a Checkpoint: metadata -> ModelSpec, every tensor dequantized to
float32 (or, on request, kept quantized in the layouts of gguf_blocks.py: Q8_0, Q4_0, Q4_1, Q5_0,
Q5_1, Q4_K, Q5_K, Q6_K) and renamed to Hugging Face's Llama layout, with llama.cpp's Q/K row
permutation undone. Any other format gguf-py can read (Q2_K, Q3_K, IQ4_NL, IQ4_XS, the IQ2/IQ3
families, ...) loads dequantized.

The tokenizer is tokenizer.py's; choosing between GGUF and a Hugging Face folder is loader.py's.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from kvserve.config import ModelSpec, RopeScaling
from kvserve.errors import ConfigError, ModelLoadError
from kvserve.kernels import cpu as cpu_kernels
from kvserve.kernels.qweight import QuantWeight
from kvserve.model.checkpoint import Checkpoint
from kvserve.model.gguf_blocks import BLOCK_SIZES, from_gguf_blocks
from kvserve.model.tokenizer import Tokenizer
from kvserve.model_files import gguf_metadata, open_gguf

# llama.cpp writes Mistral / Mixtral-free Llama variants as "llama"; "mistral" is accepted too.
SUPPORTED_ARCHITECTURES = ("llama", "mistral")
_Q = GGMLQuantizationType
# every type gguf-py dequantizes (the ones in BLOCK_SIZES are also kept quantized on request)
SUPPORTED_TYPES = (_Q.F32, _Q.F16, _Q.BF16, _Q.Q8_0, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1,
                   _Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K, _Q.IQ4_NL, _Q.IQ4_XS,
                   _Q.IQ2_XXS, _Q.IQ2_XS, _Q.IQ2_S, _Q.IQ3_XXS, _Q.IQ3_S, _Q.IQ1_S, _Q.IQ1_M,
                   _Q.TQ1_0, _Q.TQ2_0)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_ROPE_FREQS = "rope_freqs.weight"


def _type_names() -> str:
    return ", ".join(t.name for t in SUPPORTED_TYPES)


def _require(meta: dict[str, Any], key: str) -> int:
    if key not in meta:
        raise ModelLoadError(f"GGUF metadata has no '{key}'")
    return int(meta[key])


def llama3_rope_factors(scaling: RopeScaling, head_dim: int, rope_theta: float) -> np.ndarray:
    """Per-frequency divisors llama.cpp stores as rope_freqs.weight for Llama 3 rope scaling."""
    freqs = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(scaling.factor)
        else:
            smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
                      / (scaling.high_freq_factor - scaling.low_freq_factor))
            factors.append(1 / ((1 - smooth) / scaling.factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _rope_scaling(meta: dict[str, Any], arch: str, rope_freqs: np.ndarray | None,
                  head_dim: int, rope_theta: float) -> RopeScaling | None:
    """Llama 3 scaling, from rope.scaling.* keys or recovered from the rope_freqs tensor that
    llama.cpp's converter writes (checked against the Llama 3 formula; anything else is refused)."""
    prefix = f"{arch}.rope.scaling."
    kind = meta.get(prefix + "type", "none")
    factor = float(meta.get(prefix + "factor", 1.0))
    if kind not in ("none", "llama3") and not (kind == "linear" and factor == 1.0):
        raise ModelLoadError(f"unsupported rope scaling type '{kind}' (supported: llama3)")
    if rope_freqs is not None and kind != "llama3":
        factor = float(rope_freqs.max())
    if factor == 1.0 and (rope_freqs is None or np.all(rope_freqs == 1.0)):
        return None
    scaling = RopeScaling(
        factor=factor,
        low_freq_factor=float(meta.get(prefix + "low_freq_factor", 1.0)),
        high_freq_factor=float(meta.get(prefix + "high_freq_factor", 4.0)),
        original_max_position_embeddings=int(meta.get(prefix + "original_context_length", 8192)))
    if rope_freqs is not None and not np.allclose(
            llama3_rope_factors(scaling, head_dim, rope_theta), rope_freqs, rtol=1e-4):
        raise ModelLoadError(f"rope_freqs.weight does not match Llama 3 rope scaling {scaling}: "
                             "unsupported rope scaling")
    return scaling


def _spec(meta: dict[str, Any], arch: str, vocab_size: int, has_lm_head: bool,
          rope_freqs: np.ndarray | None, name: str) -> ModelSpec:
    hidden = _require(meta, f"{arch}.embedding_length")
    num_heads = _require(meta, f"{arch}.attention.head_count")
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // num_heads))
    rotary_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise ModelLoadError(f"partial rotary embeddings (rope dimension {rotary_dim} < head_dim "
                             f"{head_dim}) are not supported")
    rope_theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    try:
        return ModelSpec(
            name=name, num_layers=_require(meta, f"{arch}.block_count"), hidden_size=hidden,
            intermediate_size=_require(meta, f"{arch}.feed_forward_length"),
            num_heads=num_heads,
            num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", num_heads)),
            head_dim=head_dim, vocab_size=vocab_size,
            max_position_embeddings=_require(meta, f"{arch}.context_length"),
            rope_theta=rope_theta,
            rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            tie_word_embeddings=not has_lm_head,
            rope_scaling=_rope_scaling(meta, arch, rope_freqs, head_dim, rope_theta),
            architecture="llama")
    except ConfigError as err:
        raise ModelLoadError(f"GGUF metadata describes an invalid model: {err}") from None


def _dequantize(tensor: Any) -> np.ndarray:
    """float32 in numpy order: GGUF lists ne0 (the fastest dim) first, numpy lists it last."""
    qtype = tensor.tensor_type
    if qtype not in SUPPORTED_TYPES:
        raise ModelLoadError(f"tensor '{tensor.name}' has unsupported quantization type "
                             f"{qtype.name} (supported: {_type_names()})")
    shape = tuple(int(d) for d in reversed(tensor.shape))
    values = np.asarray(dequantize(tensor.data, qtype), dtype=np.float32)
    if not values.flags.writeable:  # F32 comes back as a read-only view of the memory map
        values = values.copy()
    if values.size != math.prod(shape):
        raise ModelLoadError(f"tensor '{tensor.name}' holds {values.size} values, expected "
                             f"{math.prod(shape)}: the file is truncated or damaged")
    return values.reshape(shape)


def unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf's permute: llama.cpp interleaves each head's rotary pairs
    ([h, pair, 2]); Hugging Face keeps the two halves apart ([h, 2, half]) for rotate-half RoPE."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return (weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2)
            .reshape(weight.shape).contiguous())


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        return None
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"


def _expected_names(spec: ModelSpec) -> list[str]:
    names = ["token_embd.weight", "output_norm.weight"]
    names += [f"blk.{i}.{part}.weight" for i in range(spec.num_layers) for part in _LAYER_NAMES]
    return names if spec.tie_word_embeddings else names + ["output.weight"]


def _check_names(spec: ModelSpec, present: set[str], path: str) -> None:
    missing = [n for n in _expected_names(spec) if n not in present]
    if missing:
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        shown = ", ".join(missing[:4]) + more
        raise ModelLoadError(f"'{path}' is missing tensor(s): {shown}")
    unknown = sorted(n for n in present if _hf_name(n) is None and n != _ROPE_FREQS)
    if unknown:
        raise ModelLoadError(f"'{path}' has tensor(s) this Llama loader does not know: "
                             f"{', '.join(unknown[:4])}")


def _as_stored(tensor: Any) -> QuantWeight | None:
    """A 2-D tensor in a block format the kernels read (gguf_blocks.py), split into codes and
    scales; None for any other tensor (dequantized instead)."""
    if tensor.tensor_type.name not in BLOCK_SIZES or len(tensor.shape) != 2:
        return None
    n, k = int(tensor.shape[1]), int(tensor.shape[0])
    per, size = BLOCK_SIZES[tensor.tensor_type.name]
    if k % per:
        raise ModelLoadError(f"tensor '{tensor.name}' has rows of {k} values, not a multiple of "
                             f"its {tensor.tensor_type.name} blocks ({per})")
    if tensor.data.size != n * (k // per) * size:
        raise ModelLoadError(f"tensor '{tensor.name}' holds {tensor.data.size} bytes, expected "
                             f"those of [{n}, {k}]: the file is truncated or damaged")
    return from_gguf_blocks(tensor.tensor_type.name, tensor.data, n, k)


def _hf_tensors(raw: dict[str, Any], spec: ModelSpec,
                keep_quantized: bool) -> dict[str, torch.Tensor | QuantWeight]:
    out: dict[str, torch.Tensor | QuantWeight] = {}
    for gguf_name, tensor in raw.items():
        hf_name = _hf_name(gguf_name)
        if hf_name is None:
            continue
        weight = _as_stored(tensor)
        if weight is not None and not keep_quantized:  # the C twin of gguf-py's dequantize
            weight = cpu_kernels.dequantize(weight)
        elif weight is None:
            weight = torch.from_numpy(_dequantize(tensor))
        heads = (spec.num_heads if hf_name.endswith("q_proj.weight") else
                 spec.num_kv_heads if hf_name.endswith("k_proj.weight") else 0)
        if heads and isinstance(weight, QuantWeight):  # whole rows move: blocks stay intact
            order = unpermute_rows(torch.arange(weight.shape[0]).unsqueeze(1), heads)
            weight = weight.rows(order.squeeze(1))
        elif heads:
            weight = unpermute_rows(weight, heads)
        out[hf_name] = weight
    return out


def _check_shapes(tensors: dict[str, torch.Tensor], spec: ModelSpec, path: str) -> None:
    h, inter = spec.hidden_size, spec.intermediate_size
    want = {"q_proj": (spec.q_size, h), "k_proj": (spec.kv_size, h), "v_proj": (spec.kv_size, h),
            "o_proj": (h, spec.q_size), "gate_proj": (inter, h), "up_proj": (inter, h),
            "down_proj": (h, inter), "norm": (h,),
            "embed_tokens": (spec.vocab_size, h), "lm_head": (spec.vocab_size, h)}
    for name, tensor in tensors.items():
        part = name.split(".")[-2]
        kind = "norm" if part.endswith("norm") else part
        if tuple(tensor.shape) != want[kind]:
            raise ModelLoadError(f"'{path}': tensor {name} has shape {tuple(tensor.shape)}, "
                                 f"expected {want[kind]} from the metadata")


def load_gguf(path: str, keep_quantized: bool = False) -> Checkpoint:
    """Reads `path` (a llama-family GGUF) into float32 Hugging Face-named tensors; with
    keep_quantized, its matrices in the formats of gguf_blocks.py stay quantized (QuantWeight)."""
    reader = open_gguf(path, _type_names())
    meta = gguf_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"unsupported architecture '{arch}' (supported: llama family)")
    raw = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in raw:
        raise ModelLoadError(f"'{path}' is missing tensor(s): token_embd.weight")
    rope_freqs = _dequantize(raw[_ROPE_FREQS]) if _ROPE_FREQS in raw else None
    name = os.path.basename(path).removesuffix(".gguf")
    spec = _spec(meta, arch, int(raw["token_embd.weight"].shape[1]), "output.weight" in raw,
                 rope_freqs, name)
    _check_names(spec, set(raw), path)
    tensors = _hf_tensors(raw, spec, keep_quantized)
    _check_shapes(tensors, spec, path)
    return Checkpoint(spec=spec, tensors=tensors, tokenizer=Tokenizer.from_gguf(reader),
                      source=path, source_format="gguf")
