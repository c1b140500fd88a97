"""How K/V vectors become the bytes of a KV format, and back: one codec per format.

A codec turns new tokens' K (or V) [n, num_kv_heads, head_dim] into named parts, each with the
token on dimension 0 ([n, num_kv_heads, ...]), which the paged store scatters into the same slots
of same-named tensors; reading gathers those parts and decodes them. This file is the plain
PyTorch reference of every format: the C decode kernel (kernels/gemv.c) reads the same codes and
scales where they lie, and tests check it against decode() here.

Formats (KVLayout prices each with the same rule):
- float32 / bfloat16 / float16: one part, "kv", in that dtype (rounding on write, nothing else).
- int8: symmetric, one float32 scale per token per KV head: scale = max|x| / 127 over the head's
  head_dim values, codes = round(x / scale). Per token (not per channel, as KIVI does for K)
  because a token's codes are then final the moment it is written: no group has to fill first,
  every block can be shared, swapped and prefix-cached as soon as it is full, and the decode
  kernel folds one scale into each dot product. float32 (not fp16) scales: exact and read without
  F16C, at 4 bytes per 64 values (6% over the codes; fp16 would be 3%).
- fp8_e4m3 / fp8_e5m2: torch's float8 dtypes (held as their bytes), with one float32 scale per
  layer for K and one for V (per tensor, as vLLM does), x / scale stored, saturating at the
  format's largest finite value; the scale is 1.0 unless calibrated.
- int4 (KIVI): asymmetric 4-bit codes, two per byte (element 2i in the low nibble, 2i+1 in the
  high), x = code * scale + zero with an fp16 scale and zero: K per channel over a block's tokens
  (outlier channels get their own range), V per token per 32 channels. These are block codecs
  (per_token False): they encode whole blocks, so the paged store keeps each sequence's partial
  block in float32 (its residual window) and encodes it when it fills.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLOAT_KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}
FP8_KV_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
INT8_MAX = 127


@dataclass(frozen=True)
class PartSpec:
    """One tensor of a format: per token per KV head, `tail` more dims of `dtype`."""

    tail: tuple[int, ...]
    dtype: torch.dtype


class KVCodec:
    name: str
    quantized = True  # fewer bits than any float format the model computes in
    per_tensor_scale = False  # one scale per layer for K and for V (fp8)
    per_token = True  # each token's parts are final when written (else: encode_blocks)

    def parts(self, head_dim: int) -> dict[str, PartSpec]:
        raise NotImplementedError

    def block_parts(self, block_size: int, num_kv_heads: int, head_dim: int
                    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Each part's shape and dtype per block."""
        return {name: ((block_size, num_kv_heads, *p.tail), p.dtype)
                for name, p in self.parts(head_dim).items()}

    def encode(self, x: torch.Tensor, tensor_scale: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
        """x [n, num_kv, head_dim] -> parts, each [n, num_kv, ...]."""
        raise NotImplementedError

    def decode(self, parts: dict[str, torch.Tensor], dtype: torch.dtype,
               tensor_scale: torch.Tensor | None = None) -> torch.Tensor:
        """parts (as encode made them, any leading dims) -> [..., num_kv, head_dim] in dtype."""
        raise NotImplementedError


class FloatCodec(KVCodec):
    quantized = False

    def __init__(self, name: str):
        self.name, self.dtype = name, FLOAT_KV_DTYPES[name]

    def parts(self, head_dim: int) -> dict[str, PartSpec]:
        return {"kv": PartSpec((head_dim,), self.dtype)}

    def encode(self, x, tensor_scale=None):
        return {"kv": x.to(self.dtype)}

    def decode(self, parts, dtype, tensor_scale=None):
        return parts["kv"].to(dtype)


class Int8Codec(KVCodec):
    name = "int8"

    def parts(self, head_dim: int) -> dict[str, PartSpec]:
        return {"codes": PartSpec((head_dim,), torch.int8), "scales": PartSpec((), torch.float32)}

    def encode(self, x, tensor_scale=None):
        x = x.float()
        scale = x.abs().amax(dim=-1) / INT8_MAX  # [n, num_kv]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero vectors
        codes = (x / scale.unsqueeze(-1)).round_().clamp_(-INT8_MAX, INT8_MAX)
        return {"codes": codes.to(torch.int8), "scales": scale}

    def decode(self, parts, dtype, tensor_scale=None):
        return (parts["codes"].float() * parts["scales"].unsqueeze(-1)).to(dtype)


class Fp8Codec(KVCodec):
    per_tensor_scale = True

    def __init__(self, name: str):
        self.name, self.dtype = name, FP8_KV_DTYPES[name]
        self.max = torch.finfo(self.dtype).max

    def parts(self, head_dim: int) -> dict[str, PartSpec]:
        # held as raw bytes: torch's CPU copy kernels (index_copy_, index_select) skip float8
        return {"codes": PartSpec((head_dim,), torch.uint8)}

    def encode(self, x, tensor_scale=None):
        y = x.float() if tensor_scale is None else x.float() / tensor_scale
        codes = y.clamp_(-self.max, self.max).to(self.dtype)  # saturate, never inf
        return {"codes": codes.view(torch.uint8)}

    def decode(self, parts, dtype, tensor_scale=None):
        y = parts["codes"].view(self.dtype).float()
        return (y if tensor_scale is None else y * tensor_scale).to(dtype)


INT4_MAX = 15


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [..., d] -> bytes [..., d/2], element 2i in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """bytes [..., d/2] -> uint8 codes [..., d]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def _quantize_int4(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x with its group minimum `lo` and maximum `hi` (broadcastable) -> (codes uint8, fp16
    scale, fp16 zero). Codes are computed against the fp16-rounded scale and zero, the values
    decode reads."""
    scale = ((hi - lo) / INT4_MAX).to(torch.float16)
    zero = lo.to(torch.float16)
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))  # a constant group: every code 0
    codes = ((x - zero.float()) / s).round_().clamp_(0, INT4_MAX).to(torch.uint8)
    return codes, scale, zero


class Int4KCodec(KVCodec):
    """int4 K: one scale and zero per channel per block (KIVI's per-channel K)."""

    name = "int4"
    per_token = False

    def block_parts(self, block_size, num_kv_heads, head_dim):
        return {"codes": ((block_size, num_kv_heads, head_dim // 2), torch.uint8),
                "scale": ((num_kv_heads, head_dim), torch.float16),
                "zero": ((num_kv_heads, head_dim), torch.float16)}

    def encode_blocks(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [nb, block_size, kv, d] -> parts, each [nb, ...]."""
        x = x.float()
        codes, scale, zero = _quantize_int4(x, x.amin(dim=1, keepdim=True),
                                            x.amax(dim=1, keepdim=True))
        return {"codes": pack_int4(codes), "scale": scale.squeeze(1), "zero": zero.squeeze(1)}

    def decode_blocks(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """parts [nb, ...] -> [nb, block_size, kv, d] in dtype."""
        codes = unpack_int4(parts["codes"]).float()
        return (codes * parts["scale"].float().unsqueeze(1)
                + parts["zero"].float().unsqueeze(1)).to(dtype)


class Int4VCodec(KVCodec):
    """int4 V: one scale and zero per token per group of channels (KIVI's per-token V)."""

    name = "int4"
    per_token = False

    def __init__(self, group: int | None = None):
        self.group = group  # None: layout.int4_v_group(head_dim)

    def _group(self, head_dim: int) -> int:
        from kvserve.kvcache.layout import int4_v_group

        return self.group or int4_v_group(head_dim)

    def block_parts(self, block_size, num_kv_heads, head_dim):
        groups = head_dim // self._group(head_dim)
        return {"codes": ((block_size, num_kv_heads, head_dim // 2), torch.uint8),
                "scale": ((block_size, num_kv_heads, groups), torch.float16),
                "zero": ((block_size, num_kv_heads, groups), torch.float16)}

    def encode_blocks(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.float()
        g = self._group(x.shape[-1])
        xg = x.unflatten(-1, (-1, g))  # [nb, bs, kv, groups, g]
        codes, scale, zero = _quantize_int4(xg, xg.amin(dim=-1, keepdim=True),
                                            xg.amax(dim=-1, keepdim=True))
        return {"codes": pack_int4(codes.flatten(-2)), "scale": scale.squeeze(-1),
                "zero": zero.squeeze(-1)}

    def decode_blocks(self, parts, dtype):
        codes = unpack_int4(parts["codes"]).float()
        g = codes.shape[-1] // parts["scale"].shape[-1]
        x = codes.unflatten(-1, (-1, g)) * parts["scale"].float().unsqueeze(-1) \
            + parts["zero"].float().unsqueeze(-1)
        return x.flatten(-2).to(dtype)


def codec_for(name: str, which: int = 0) -> KVCodec:
    """The codec of a canonical KV format name (kv_dtypes.canonical_kv_dtype) for K (which=0)
    or V (1)."""
    if name in FLOAT_KV_DTYPES:
        return FloatCodec(name)
    if name in FP8_KV_DTYPES:
        return Fp8Codec(name)
    if name == "int8":
        return Int8Codec()
    if name == "int4":
        return Int4KCodec() if which == 0 else Int4VCodec()
    raise NotImplementedError(f"KV format {name!r} has no codec yet")
