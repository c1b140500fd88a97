"""How K/V vectors become the bytes of a KV format, and back: one codec per format.

A codec turns new tokens' K (or V) [n, num_kv_heads, head_dim] into named parts, each with the
token on dimension 0 ([n, num_kv_heads, ...]), which the paged store scatters into the same slots
of same-named tensors; reading gathers those parts and decodes them. This file is the plain
PyTorch reference of every format: the C decode kernel (kernels/gemv.c) reads the same codes and
scales where they lie, and tests check it against decode() here.

Formats (KVLayout prices each with the same rule):
- float32 / bfloat16 / float16: one part, "kv", in that dtype (rounding on write, nothing else).
- fp8_e4m3 / fp8_e5m2: torch's float8 dtypes (held as their bytes), with one float32 scale per
  layer for K and one for V (per tensor, as vLLM does), x / scale stored, saturating at the
  format's largest finite value; the scale is 1.0 unless calibrated.
- int8 and int4 (KIVI's rules): asymmetric codes (int4: two per byte, element 2i in the low
  nibble, 2i+1 in the high), x = code * scale + zero with an fp16 scale and zero: K per channel
  over a block's tokens (outlier channels get their own range), V per token per 32 channels.
  These are block codecs (per_token False): they encode whole blocks, so the paged store keeps
  each sequence's partial block in float32 (its residual window) and encodes it when it fills.
  Per-channel K was chosen by measurement (README, the quant lab): on the default model, int8
  with one scale per token per head (the first int8 of kvserve) agreed with float32 on 60 of 128
  greedy tokens; per-channel K with the residual window on 101.
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


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [..., d] -> bytes [..., d/2], element 2i in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """bytes [..., d/2] -> uint8 codes [..., d]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def _quantize(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, levels: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x with its group minimum `lo` and maximum `hi` (broadcastable) -> (codes uint8 0..levels,
    fp16 scale, fp16 zero). Codes are computed against the fp16-rounded scale and zero, the
    values decode reads."""
    scale = ((hi - lo) / levels).to(torch.float16)
    zero = lo.to(torch.float16)
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))  # a constant group: every code 0
    codes = ((x - zero.float()) / s).round_().clamp_(0, levels).to(torch.uint8)
    return codes, scale, zero


class _AffineBlockCodec(KVCodec):
    """Asymmetric `bits`-bit codes (4: two per byte; 8: one) with an fp16 scale and zero."""

    per_token = False

    def __init__(self, name: str, bits: int):
        self.name, self.bits, self.levels = name, bits, (1 << bits) - 1

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_int4(codes) if self.bits == 4 else codes

    def _unpack(self, codes: torch.Tensor) -> torch.Tensor:
        return unpack_int4(codes) if self.bits == 4 else codes

    def _code_shape(self, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (block_size, num_kv_heads, head_dim * self.bits // 8)


class ChannelBlockCodec(_AffineBlockCodec):
    """K: one scale and zero per channel per block, over the block's tokens (KIVI's per-channel
    K: an outlier channel gets its own range instead of coarsening every other)."""

    def block_parts(self, block_size, num_kv_heads, head_dim):
        return {"codes": (self._code_shape(block_size, num_kv_heads, head_dim), torch.uint8),
                "scale": ((num_kv_heads, head_dim), torch.float16),
                "zero": ((num_kv_heads, head_dim), torch.float16)}

    def encode_blocks(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [nb, block_size, kv, d] -> parts, each [nb, ...]."""
        x = x.float()
        codes, scale, zero = _quantize(x, x.amin(dim=1, keepdim=True),
                                       x.amax(dim=1, keepdim=True), self.levels)
        return {"codes": self._pack(codes), "scale": scale.squeeze(1), "zero": zero.squeeze(1)}

    def decode_blocks(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """parts [nb, ...] -> [nb, block_size, kv, d] in dtype."""
        codes = self._unpack(parts["codes"]).float()
        return (codes * parts["scale"].float().unsqueeze(1)
                + parts["zero"].float().unsqueeze(1)).to(dtype)


class TokenGroupBlockCodec(_AffineBlockCodec):
    """V: one scale and zero per token per group of channels (KIVI's per-token V)."""

    def __init__(self, name: str, bits: int, group: int | None = None):
        super().__init__(name, bits)
        self.group = group  # None: layout.int4_v_group(head_dim)

    def _group(self, head_dim: int) -> int:
        from kvserve.kvcache.layout import int4_v_group

        return self.group or int4_v_group(head_dim)

    def block_parts(self, block_size, num_kv_heads, head_dim):
        groups = head_dim // self._group(head_dim)
        return {"codes": (self._code_shape(block_size, num_kv_heads, head_dim), torch.uint8),
                "scale": ((block_size, num_kv_heads, groups), torch.float16),
                "zero": ((block_size, num_kv_heads, groups), torch.float16)}

    def encode_blocks(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.float()
        g = self._group(x.shape[-1])
        xg = x.unflatten(-1, (-1, g))  # [nb, bs, kv, groups, g]
        codes, scale, zero = _quantize(xg, xg.amin(dim=-1, keepdim=True),
                                       xg.amax(dim=-1, keepdim=True), self.levels)
        return {"codes": self._pack(codes.flatten(-2)), "scale": scale.squeeze(-1),
                "zero": zero.squeeze(-1)}

    def decode_blocks(self, parts, dtype):
        codes = self._unpack(parts["codes"]).float()
        g = codes.shape[-1] // parts["scale"].shape[-1]
        x = codes.unflatten(-1, (-1, g)) * parts["scale"].float().unsqueeze(-1) \
            + parts["zero"].float().unsqueeze(-1)
        return x.flatten(-2).to(dtype)


BLOCK_BITS = {"int8": 8, "int4": 4}  # the block formats and their code widths


def codec_for(name: str, which: int = 0) -> KVCodec:
    """The codec of a canonical KV format name (kv_dtypes.canonical_kv_dtype) for K (which=0)
    or V (1)."""
    if name in FLOAT_KV_DTYPES:
        return FloatCodec(name)
    if name in FP8_KV_DTYPES:
        return Fp8Codec(name)
    if name in BLOCK_BITS:
        return (ChannelBlockCodec if which == 0 else TokenGroupBlockCodec)(name, BLOCK_BITS[name])
    raise NotImplementedError(f"KV format {name!r} has no codec yet")
