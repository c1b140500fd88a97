"""Building blocks of a Llama-family layer: RMSNorm, rotary embeddings, the linear op, SwiGLU.

Each is a plain function over tensors the model owns; the attention over cached K/V is not here but
behind the AttentionBackend seam (model/attention/), so this file never sees a cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvserve.config import RopeScaling
from kvserve.kernels import cpu as cpu_kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm: normalise in float32, scale in the input dtype.
    In float32 torch's fused F.rms_norm computes the same thing in one op (the hot path)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x[m, k] @ weight[n, k]^T: the C kernel for decode-sized batches on CPU, else PyTorch."""
    return cpu_kernels.linear(x, weight)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """[m, 2 * inter] -> [m, inter]: silu(gate) * up, with gate and up fused in one projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gated(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """SwiGLU (act "silu") or Gemma's GeGLU ("gelu_tanh": gelu with the tanh approximation)."""
    if act == "silu":
        return swiglu(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in float32, with Llama 3 frequency scaling if given."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding:
    """cos/sin tables for every position up to max_positions, built once, gathered per step."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: RopeScaling | None, dtype: torch.dtype, device: torch.device,
                 linear_factor: float | None = None):
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)
        if linear_factor is not None:  # rope_type "linear": positions divided by the factor
            self.inv_freq = self.inv_freq / linear_factor
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq)  # [max_positions, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.cos = emb.cos().to(dtype=dtype, device=device)
        self.sin = emb.sin().to(dtype=dtype, device=device)

    @property
    def num_positions(self) -> int:
        return self.cos.shape[0]

    def tables(self, positions: torch.Tensor, beyond: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """[num_tokens] positions -> cos, sin, each [num_tokens, head_dim], contiguous. beyond:
        some position is past the table (attention sinks run past the model's context): the
        step's rows are computed, angles in float64 (large positions lose float32 digits),
        and nothing is kept, so memory does not grow with a sequence's length."""
        if not beyond:
            return self.cos[positions], self.sin[positions]
        freqs = positions.double().unsqueeze(1) * self.inv_freq.double().to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.cos.dtype), emb.sin().to(self.sin.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (Hugging Face layout) on x [num_tokens, num_heads, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_shift(x: torch.Tensor, shift: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [..., head_dim], already rotated at some positions, rotated `shift` positions further:
    RoPE at p then by shift is RoPE at p + shift (the angles in float64, the product in
    float32, returned in x's dtype)."""
    angles = shift * inv_freq.double()  # [head_dim / 2]
    emb = torch.cat((angles, angles)).to(device=x.device)
    return apply_rope(x.float(), emb.cos().float(), emb.sin().float()).to(x.dtype)
