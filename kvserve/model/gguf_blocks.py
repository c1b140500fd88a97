"""GGUF's block formats as the QuantWeight layouts the kernels multiply (kernels/qweight.py).

Per format, what a matrix becomes at load (a scale per 32 values unless said), every value the
same float gguf-py's dequantize makes:
  format  layout  codes               scale, min                   bits/value: stored, held
  Q8_0    q8      as stored           float16, as stored           8.5   8.5
  Q4_0    q4      as stored           float16; min = -8 * scale*   4.5   5
  Q4_1    q4      as stored           float16, as stored           5     5
  Q5_0    q5      as stored           float16; min = -16 * scale*  5.5   6
  Q5_1    q5      as stored           float16, as stored           6     6
  Q4_K    q4      nibbles reordered   sc, m as stored x d, -dmin   4.5   4.75
  Q5_K    q5      reordered           sc, m as stored x d, -dmin   5.5   5.75
  Q6_K    q8      6-bit value - 32    sc per 16 as stored x d      6.6   8.6
(* both float32 in the odd file whose -8 or -16 * scale overflows float16.)
A k-quant stores a float16 super-block scale d (and dmin) per 256 values and small integer
sub-block scales sc (and mins m); they are kept so (sc, m as uint8, Q6_K's sc as int8, d and -dmin
as float32) and multiplied in float32 by the kernels, exactly as gguf-py does. (Their products
held as one float16 per block were rounded by up to 2^-11, which moved the tiny test model's
logits by ~0.6%: in Q4_K's asymmetric blocks a rounded scale * code and the min nearly cancel;
held as float32 they cost 6 bits per value for Q4_K.) Q6_K's 6-bit codes are held as int8. What
`kvserve generate --stats` reports per token counts what is really read.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf.quants import Q4_K

from kvserve.kernels.qweight import BLOCK, QuantWeight

QK_K = 256  # values per k-quant super-block
# format -> (values per block, bytes per block)
BLOCK_SIZES = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22),
               "Q5_1": (32, 24), "Q4_K": (QK_K, 144), "Q5_K": (QK_K, 176), "Q6_K": (QK_K, 210)}

def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _pack_q4(codes: np.ndarray, n: int, k: int) -> np.ndarray:
    """codes [n, k] in 0..15 -> q4 bytes: per 32-value block, byte j = element j | element j+16."""
    c = codes.reshape(n, k // BLOCK, 2, BLOCK // 2).astype(np.uint8)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2)


def _k_scales(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's d, dmin [n, nsb] (float32) and 6-bit sc, m [n, nsb, 8] (uint8)."""
    d, dmin = _f16(raw[..., 0:2]), _f16(raw[..., 2:4])
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(raw[..., 4:16]).reshape(-1, 12))
    shape = raw.shape[:-1] + (8,)
    return d, dmin, sc.reshape(shape).astype(np.uint8), m.reshape(shape).astype(np.uint8)


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's qs [..., 128] -> [..., 8, 32]: 32 bytes per pair of sub-blocks, the first's
    values in the low nibbles, the second's in the high ones."""
    q = qs.reshape(qs.shape[:-1] + (4, 1, 32))
    return np.concatenate([q & 0x0F, q >> 4], axis=-2).reshape(qs.shape[:-1] + (8, 32))


def _quant(fmt: str, codes: np.ndarray, scale: np.ndarray, mins: np.ndarray | None,
           n: int, group: int = BLOCK, high: np.ndarray | None = None,
           scale_sb: np.ndarray | None = None, min_sb: np.ndarray | None = None) -> QuantWeight:
    def t(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a).reshape(n, -1))
    return QuantWeight(fmt, t(codes), t(scale), t(mins), group, t(high), t(scale_sb), t(min_sb))


def _scaled_min(d: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0's / Q5_0's implicit min (d * factor, factor -8 or -16: exact in float16 unless it
    overflows, then scale and min both float32) and the scale to go with it."""
    mins = d.astype(np.float32) * factor
    if np.all(np.abs(mins) <= np.finfo(np.float16).max):
        return d, mins.astype(np.float16)
    return d.astype(np.float32), mins


def from_gguf_blocks(type_name: str, blocks: np.ndarray, n: int, k: int) -> QuantWeight:
    """A GGUF tensor's raw blocks ([n, bytes per row] uint8, as gguf-py memory-maps them) for an
    [n, k] matrix, as a QuantWeight (copied out of the map; see the module's table)."""
    per, size = BLOCK_SIZES[type_name]
    if k % per:
        raise ValueError(f"row length {k} is not a multiple of {per}")
    nsb = k // per
    raw = np.ascontiguousarray(blocks).reshape(n, nsb, size)
    if per == BLOCK:
        d = raw[..., 0:2].copy().view(np.float16)[..., 0]
    if type_name == "Q8_0":
        return _quant("q8", raw[..., 2:].copy().view(np.int8).reshape(n, k), d, None, n)
    if type_name == "Q4_0":
        d, mins = _scaled_min(d, -8)
        return _quant("q4", raw[..., 2:].reshape(n, k // 2), d, mins, n)
    if type_name == "Q4_1":
        mins = raw[..., 2:4].copy().view(np.float16)[..., 0]
        return _quant("q4", raw[..., 4:].reshape(n, k // 2), d, mins, n)
    if type_name in ("Q5_0", "Q5_1"):  # nibbles and fifth bits both in q5's order already
        off = 2 if type_name == "Q5_0" else 4
        if type_name == "Q5_0":
            d, mins = _scaled_min(d, -16)
        else:
            mins = raw[..., 2:4].copy().view(np.float16)[..., 0]
        return _quant("q5", raw[..., off + 4:].reshape(n, k // 2), d, mins, n,
                      high=raw[..., off:off + 4].reshape(n, k // 8))
    if type_name in ("Q4_K", "Q5_K"):  # scale d * sc, min -dmin * m: kept as sc, m and d, -dmin
        dd, dmin, sc, m = _k_scales(raw)
        factors = {"scale_sb": dd, "min_sb": -dmin}
        if type_name == "Q4_K":
            q = _k_low_nibbles(raw[..., 16:])
            return _quant("q4", _pack_q4(q.reshape(n, k), n, k), sc, m, n, **factors)
        high = np.unpackbits(raw[..., 16:48].reshape(n, nsb, 32, 1), axis=-1, bitorder="little")
        high = high.transpose(0, 1, 3, 2).reshape(n, k // BLOCK, BLOCK)  # bit i: sub-block i
        q = _k_low_nibbles(raw[..., 48:]).reshape(n, k)
        return _quant("q5", _pack_q4(q, n, k), sc, m, n,
                      high=np.packbits(high, axis=-1, bitorder="little").reshape(n, k // 8),
                      **factors)
    # Q6_K: ql [128], qh [64], scales [16] int8, d
    ql = raw[..., 0:128].reshape(n, nsb, 2, 1, 64)
    ql = np.concatenate([ql & 0x0F, ql >> 4], axis=-2).reshape(n, nsb, 8, 32)
    qh = raw[..., 128:192].reshape(n, nsb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]
    qh = (qh & 3).reshape(n, nsb, 8, 32)
    q = (ql | (qh << 4)).astype(np.int16) - 32
    scale = raw[..., 192:208].copy().view(np.int8)  # times d per super-block
    return _quant("q8", q.astype(np.int8).reshape(n, k), scale, None, n, group=16,
                  scale_sb=_f16(raw[..., 208:210]))
