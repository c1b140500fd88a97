"""Weights kept in a GGUF file's own quantized formats, for the kernels that read them as stored.

A QuantWeight is one [n, k] matrix (n output rows, k inputs) cut into blocks of 32 inputs per row:
  q4  (GGUF Q4_1, and Q4_0 as Q4_1 with min = -8 * scale, which fp16 holds exactly):
      x = code * scale + min, code in 0..15; codes [n, k / 2] uint8, the low nibble of a block's
      byte j is element j and the high nibble element j + 16 (GGUF's order); scale, min
      [n, k / 32] float16.
  q8  (GGUF Q8_0): x = code * scale, code int8; codes [n, k] int8; scale [n, k / 32] float16.
The block bytes are split into codes and scales once at load, so each kernel reads aligned rows.
dequantize() is the plain PyTorch reference every kernel is tested against; it equals gguf-py's
dequantize of the same blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 32
GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


@dataclass
class QuantWeight:
    format: str  # "q4" or "q8"
    codes: torch.Tensor
    scale: torch.Tensor  # [n, k / 32] float16
    min: torch.Tensor | None  # [n, k / 32] float16 (q4), None (q8)

    @property
    def shape(self) -> tuple[int, int]:
        n, per_row = self.codes.shape
        return n, per_row * (2 if self.format == "q4" else 1)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def nbytes(self) -> int:
        parts = [self.codes, self.scale] + ([self.min] if self.min is not None else [])
        return sum(p.numel() * p.element_size() for p in parts)

    def _map(self, fn) -> QuantWeight:
        return QuantWeight(self.format, fn(self.codes), fn(self.scale),
                           None if self.min is None else fn(self.min))

    def rows(self, index: torch.Tensor) -> QuantWeight:
        """The rows `index` (a permutation or a selection), still quantized."""
        return self._map(lambda t: t[index].contiguous())

    def codes_in_order(self) -> torch.Tensor:
        """Each block's codes in element order, [n, k / 32, 32] (q4's nibbles unpacked)."""
        n, k = self.shape
        if self.format == "q8":
            return self.codes.view(n, k // BLOCK, BLOCK)
        c = self.codes.view(n, k // BLOCK, BLOCK // 2)
        return torch.cat((c & 15, c >> 4), dim=-1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reference: [n, k] in `dtype` (computed in float32)."""
        n, k = self.shape
        x = self.codes_in_order().float() * self.scale.float().unsqueeze(-1)
        if self.min is not None:
            x = x + self.min.float().unsqueeze(-1)
        return x.reshape(n, k).to(dtype)

    def dequantize_rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `index` dequantized (an embedding lookup)."""
        return self.rows(index).dequantize(dtype)


ACTIVATION_LEVELS = 32767  # the decode kernels round activations to int16 per block


def round_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, k] float32 rounded per block of 32 to int16 as the decode kernels do (gemv.c
    qx_init): step dx = max|x| / 32767 (float32), codes = round-half-even(x * (32767 / max|x|)).
    Returns the codes [m, k / 32, 32] (as float32) and dx [m, k / 32]."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // BLOCK, BLOCK)
    amax = blocks.abs().amax(-1)  # [m, k / 32]
    inv = torch.where(amax > 0, ACTIVATION_LEVELS / amax, torch.zeros_like(amax))
    codes = torch.round(blocks * inv.unsqueeze(-1))
    return codes, amax / ACTIVATION_LEVELS


def rounded_activation_linear(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """The reference of the decode-sized C product (gemv.c q_gemv): y [m, n] = x @ W^T with x
    rounded per block to int16 (round_activations), each block's integer dot product exact,
    times scale * dx; q4's min term over x's exact float block sums. Computed in float64.
    (int8 activations, as llama.cpp rounds them, were ~10% faster here but moved the default
    model's perplexity by +1.4% over 20k tokens against float32; int16's moves it by 0.001%.)"""
    n, k = w.shape
    codes, dx = round_activations(x)  # [m, nb, 32], [m, nb]
    dots = torch.einsum("mbj,nbj->mnb", codes.double(),
                        w.codes_in_order().double())  # exact integers
    y = (dots * w.scale.double().unsqueeze(0) * dx.double().unsqueeze(1)).sum(-1)
    if w.min is not None:
        xsum = x.double().reshape(x.shape[0], k // BLOCK, BLOCK).sum(-1)  # [m, nb]
        y = y + xsum @ w.min.double().t()
    return y


def cat(weights: list[QuantWeight]) -> QuantWeight:
    """Row-wise concatenation (fused Q|K|V, gate|up); all in one format."""
    fmt = weights[0].format
    if any(w.format != fmt for w in weights):
        raise ValueError("cannot fuse weights of different quantized formats")
    mins = None if fmt == "q8" else torch.cat([w.min for w in weights])
    return QuantWeight(fmt, torch.cat([w.codes for w in weights]),
                       torch.cat([w.scale for w in weights]), mins)


def from_gguf_blocks(type_name: str, blocks: np.ndarray, n: int, k: int) -> QuantWeight:
    """A GGUF tensor's raw blocks ([n, bytes per row] uint8, as gguf-py memory-maps them) of type
    Q4_0, Q4_1 or Q8_0, for an [n, k] matrix, split into codes and scales (copied out of the map).
    """
    if k % BLOCK:
        raise ValueError(f"row length {k} is not a multiple of {BLOCK}")
    size = GGUF_BLOCK_BYTES[type_name]
    raw = np.ascontiguousarray(blocks).reshape(n, k // BLOCK, size)
    scale = torch.from_numpy(raw[..., 0:2].copy().view(np.float16).reshape(n, k // BLOCK))
    if type_name == "Q8_0":
        codes = raw[..., 2:].copy().view(np.int8).reshape(n, k)
        return QuantWeight("q8", torch.from_numpy(codes), scale, None)
    if type_name == "Q4_1":
        mins = torch.from_numpy(raw[..., 2:4].copy().view(np.float16).reshape(n, k // BLOCK))
        codes = raw[..., 4:].copy().reshape(n, k // 2)
    else:  # Q4_0: x = (code - 8) * scale, i.e. min = -8 * scale (exact in float16)
        mins = scale * -8
        codes = raw[..., 2:].copy().reshape(n, k // 2)
    return QuantWeight("q4", torch.from_numpy(codes), scale, mins)
