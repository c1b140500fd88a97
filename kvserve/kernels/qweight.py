"""Weights kept quantized in memory, for the kernels that multiply them as they are.

A QuantWeight is one [n, k] matrix (n output rows, k inputs) cut into blocks of 32 inputs per row:
  q4: x = code * scale + min, code in 0..15; codes [n, k / 2] uint8, the low nibble of a block's
      byte j is element j and the high nibble element j + 16 (GGUF's Q4_0/Q4_1 order); scale, min
      [n, k / 32].
  q5: q4's codes plus each value's fifth bit: high [n, k / 8] uint8, per block a little-endian
      32-bit word, bit j for element j (GGUF's qh); x = (code + 16 * bit) * scale + min.
  q8: x = code * scale (+ min), code int8; codes [n, k] int8; scale [n, k / group] with group 32
      or 16 (a scale per 16 values: GGUF's Q6_K); min [n, k / 32], or None.
Scales and mins are float16, float32, or (the k-quants, as stored) small integers uint8/int8
times a float32 factor per 256-value super-block (scale_sb, min_sb [n, k / 256]): the C kernels'
scale kinds SV_F16, SV_F32, SV_U8, SV_I8.
Which GGUF block formats map onto these, and how exactly, is model/gguf_blocks.py's; quantize()
makes them from float weights (`--quantization int8|int4`). The codes and scales are split apart
once at load, so each kernel reads aligned rows. dequantize() is the plain PyTorch reference every
kernel is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32
SUPER_BLOCK = 256  # values per k-quant super-block (integer scales' factors)
_KINDS = {torch.float16: 0, torch.float32: 1, torch.uint8: 2, torch.int8: 3}


@dataclass
class QuantWeight:
    format: str  # "q4", "q5" or "q8"
    codes: torch.Tensor
    scale: torch.Tensor  # [n, k / group] float16, float32, uint8 or int8
    min: torch.Tensor | None  # [n, k / 32] as scale (always for q4/q5), or None
    group: int = BLOCK  # values per scale: 32, or 16 (q8 only)
    high: torch.Tensor | None = None  # q5's fifth bits [n, k / 8] uint8
    scale_sb: torch.Tensor | None = None  # uint8/int8 scales' factors [n, k / 256] float32
    min_sb: torch.Tensor | None = None  # the same for the mins

    def __post_init__(self):
        if self.format in ("q4", "q5") and (self.min is None or self.group != BLOCK):
            raise ValueError(f"{self.format} weights have a min and a scale per 32 values")
        if (self.format == "q5") != (self.high is not None):
            raise ValueError("q5 weights, and only they, have fifth bits")
        if self.group not in (BLOCK, 16):
            raise ValueError(f"scale groups of {self.group} values are not supported (32, 16)")
        if self.scale.dtype not in _KINDS or (
                self.min is not None and self.min.dtype != self.scale.dtype):
            raise ValueError("scales and mins are of one kind: float16, float32, uint8 or int8")
        compact = self.scale.dtype in (torch.uint8, torch.int8)
        if compact and (self.scale_sb is None or (self.min is not None) != (
                self.min_sb is not None) or self.shape[1] % SUPER_BLOCK):
            raise ValueError("integer scales need their super-block factors and rows of a "
                             f"multiple of {SUPER_BLOCK} values")

    @property
    def scale_kind(self) -> int:
        """The C kernels' kind of scales and mins (gemv.c sv_t): 0 float16, 1 float32, 2 uint8
        and 3 int8 times a float32 per super-block."""
        return _KINDS[self.scale.dtype]

    def _expand(self, values: torch.Tensor, sb: torch.Tensor | None) -> torch.Tensor:
        if sb is None:
            return values.float()
        per = values.shape[1] // sb.shape[1]
        return values.float() * sb.repeat_interleave(per, dim=1)  # exact: small ints x float

    def full_scale(self) -> torch.Tensor:
        """The scales as float32 [n, k / group] (the integer kinds times their factors)."""
        return self._expand(self.scale, self.scale_sb)

    def full_min(self) -> torch.Tensor | None:
        return None if self.min is None else self._expand(self.min, self.min_sb)

    def widened(self) -> QuantWeight:
        """The same weight with float32 scales and mins (exact)."""
        return QuantWeight(self.format, self.codes, self.full_scale(), self.full_min(),
                           self.group, self.high)

    @property
    def shape(self) -> tuple[int, int]:
        n, per_row = self.codes.shape
        return n, per_row * (1 if self.format == "q8" else 2)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def nbytes(self) -> int:
        parts = [t for t in (self.codes, self.scale, self.min, self.high, self.scale_sb,
                             self.min_sb) if t is not None]
        return sum(p.numel() * p.element_size() for p in parts)

    def _map(self, fn) -> QuantWeight:
        opt = lambda t: None if t is None else fn(t)  # noqa: E731
        return QuantWeight(self.format, fn(self.codes), fn(self.scale), opt(self.min),
                           self.group, opt(self.high), opt(self.scale_sb), opt(self.min_sb))

    def rows(self, index: torch.Tensor) -> QuantWeight:
        """The rows `index` (a permutation or a selection), still quantized."""
        return self._map(lambda t: t[index].contiguous())

    def codes_in_order(self) -> torch.Tensor:
        """Each block's codes in element order, [n, k / 32, 32] (nibbles unpacked, q5's fifth
        bits added)."""
        n, k = self.shape
        if self.format == "q8":
            return self.codes.view(n, k // BLOCK, BLOCK)
        c = self.codes.view(n, k // BLOCK, BLOCK // 2)
        codes = torch.cat((c & 15, c >> 4), dim=-1)
        if self.high is not None:
            shifts = torch.arange(8, dtype=torch.uint8, device=c.device)
            bits = (self.high.view(n, k // BLOCK, 4, 1) >> shifts) & 1  # [n, nb, 4 bytes, 8]
            codes = codes | (bits.reshape(n, k // BLOCK, BLOCK) << 4)
        return codes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reference: [n, k] in `dtype` (computed in float32)."""
        n, k = self.shape
        x = self.codes_in_order().float().reshape(n, k // self.group, self.group) \
            * self.full_scale().unsqueeze(-1)
        x = x.reshape(n, k // BLOCK, BLOCK)
        if self.min is not None:
            x = x + self.full_min().unsqueeze(-1)
        return x.reshape(n, k).to(dtype)


ACTIVATION_LEVELS = 32767  # the decode kernels round activations to int16 per block


def round_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, k] float32 rounded per block of 32 to int16 as the decode kernels do (gemv.c
    qx_init): step dx = max|x| / 32767 (float32), codes = round-half-even(x * (32767 / max|x|)).
    Returns the codes [m, k / 32, 32] (as float32) and dx [m, k / 32]."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // BLOCK, BLOCK)
    amax = blocks.abs().amax(-1)  # [m, k / 32]
    # tensor / tensor: rounded once, as C's 32767.f / amax (a Python number / tensor is taken as
    # a reciprocal times the number, one ulp off at times: a code then differs by one)
    levels = torch.full_like(amax, ACTIVATION_LEVELS)
    inv = torch.where(amax > 0, levels / amax, torch.zeros_like(amax))
    codes = torch.round(blocks * inv.unsqueeze(-1))
    return codes, amax / ACTIVATION_LEVELS


def rounded_activation_linear(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """The reference of the decode-sized C product (gemv.c q_gemv): y [m, n] = x @ W^T with x
    rounded per block to int16 (round_activations), each block's integer dot product exact,
    times scale * dx (per group of 16 as two half-block sums); the min term over x's exact float
    block sums. Computed in float64.
    (int8 activations, as llama.cpp rounds them, were ~10% faster here but moved the default
    model's perplexity by +1.4% over 20k tokens against float32; int16's moves it by 0.001%.)"""
    n, k = w.shape
    codes, dx = round_activations(x)  # [m, nb, 32], [m, nb]
    per = BLOCK // w.group  # scale groups per block
    dots = torch.einsum("mgj,ngj->mng", codes.double().reshape(x.shape[0], -1, w.group),
                        w.codes_in_order().double().reshape(n, -1, w.group))  # exact integers
    dx = dx.double().repeat_interleave(per, dim=1)  # [m, ng]
    y = (dots * w.full_scale().double().unsqueeze(0) * dx.unsqueeze(1)).sum(-1)
    if w.min is not None:
        xsum = x.double().reshape(x.shape[0], k // BLOCK, BLOCK).sum(-1)  # [m, nb]
        y = y + xsum @ w.full_min().double().t()
    return y


def as_q8(w: QuantWeight, group: int, with_min: bool, dtype: torch.dtype) -> QuantWeight:
    """The same values as q8 with scale groups of `group`, scales in `dtype` (w's or wider) and
    a min (zero if w has none) when with_min: exact, as q4 codes (0..15) are int8 codes, a scale
    per 32 is two equal ones per 16, and float16 widens to float32 exactly."""
    n, k = w.shape
    if w.scale_kind > 1:
        w = w.widened()
    codes = w.codes_in_order().reshape(n, k).to(torch.int8) if w.format != "q8" else w.codes
    scale = w.scale.repeat_interleave(w.group // group, dim=1) if w.group != group else w.scale
    scale = scale.to(dtype)
    mins = None if w.min is None else w.min.to(dtype)
    if with_min and mins is None:
        mins = torch.zeros((n, k // BLOCK), dtype=dtype, device=w.device)
    return QuantWeight("q8", codes.contiguous(), scale.contiguous(), mins, group)


def as_q5(w: QuantWeight) -> QuantWeight:
    """q4 as q5 (fifth bits all 0): exact."""
    if w.format == "q5":
        return w
    n, k = w.shape
    return QuantWeight("q5", w.codes, w.scale, w.min, BLOCK,
                       torch.zeros((n, k // 8), dtype=torch.uint8, device=w.device))


def cat(weights: list[QuantWeight]) -> QuantWeight:
    """Row-wise concatenation (fused Q|K|V, gate|up). Parts in different layouts (a Q4_K_M file
    keeps some layers' V in Q6_K beside Q4_K Q and K) are first widened exactly to one: q4 beside
    q5 to q5, anything beside q8 to q8 (as_q8): more bytes for those rows, the same values,
    still one product."""
    if len({w.scale.dtype for w in weights}) > 1:  # integer scales beside others: float32
        weights = [w.widened() if w.scale_kind > 1 else w for w in weights]
    dtype = torch.float32 if any(w.scale_kind == 1 for w in weights) else torch.float16
    if {w.format for w in weights} == {"q4", "q5"}:
        weights = [as_q5(w) for w in weights]
    first = weights[0]
    layout = (first.format, first.group, first.min is None)
    if any((w.format, w.group, w.min is None) != layout for w in weights):
        group = min(w.group for w in weights)
        with_min = any(w.min is not None for w in weights)
        weights = [as_q8(w, group, with_min, dtype) for w in weights]
    elif weights[0].scale_kind < 2 and any(w.scale.dtype != dtype for w in weights):
        weights = [w._map(lambda t: t.to(dtype) if t.is_floating_point() else t)
                   for w in weights]  # float16 scales widened to float32, exactly
    first = weights[0]
    joined = lambda name: None if getattr(first, name) is None else \
        torch.cat([getattr(w, name) for w in weights])  # noqa: E731
    return QuantWeight(first.format, joined("codes"), joined("scale"), joined("min"),
                       first.group, joined("high"), joined("scale_sb"), joined("min_sb"))


def quantize(weight: torch.Tensor, bits: int) -> QuantWeight:
    """A float [n, k] matrix quantized per block of 32 inputs, as GGUF's round-to-nearest
    quantizers do: bits 8 -> q8, scale = max|x| / 127, code = round(x / scale) (Q8_0); bits 4 ->
    q4, min = the block's minimum, scale = (max - min) / 15, code = round((x - min) / scale)
    (Q4_1). Scales and mins are float16; codes are computed from the float16 values, so each
    weight is off by at most half a step (plus the float16 rounding of min)."""
    n, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"row length {k} is not a multiple of {BLOCK}")
    x = weight.detach().float().reshape(n, k // BLOCK, BLOCK)
    if bits == 8:
        scale = (x.abs().amax(-1) / 127).half()
        inv = torch.where(scale > 0, 1 / scale.float(), torch.zeros_like(scale, dtype=torch.float))
        codes = torch.round(x * inv.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
        return QuantWeight("q8", codes.reshape(n, k).contiguous(), scale.contiguous(), None)
    if bits != 4:
        raise ValueError(f"quantize takes 8 or 4 bits, not {bits}")
    lo = x.amin(-1).half()
    scale = ((x.amax(-1) - lo.float()) / 15).half()
    inv = torch.where(scale > 0, 1 / scale.float(), torch.zeros_like(scale, dtype=torch.float))
    codes = torch.round((x - lo.float().unsqueeze(-1)) * inv.unsqueeze(-1)).clamp(0, 15)
    codes = codes.to(torch.uint8)
    packed = codes[..., :BLOCK // 2] | (codes[..., BLOCK // 2:] << 4)
    return QuantWeight("q4", packed.reshape(n, k // 2).contiguous(), scale.contiguous(),
                       lo.contiguous())
