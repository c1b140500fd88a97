"""CPU fast path for decode-sized matrix products (gemv.c), built on first use and called by ctypes.

`linear(x, w)` is the one entry point the model uses; it falls back to the plain PyTorch reference
(`reference_linear`) when the input is not a small float32 CPU batch, when no C compiler is found,
or when KVSERVE_NO_CKERNELS=1. Building needs only a C compiler with OpenMP (gcc or clang); the
shared object is cached under ~/.cache/kvserve/kernels keyed by source, flags and CPU features.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kvserve.kernels.qweight import QuantWeight

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("gemv.c")
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
MAX_M = 64  # rows the fused C path takes (MAX_M in gemv.c); prefill-sized batches use torch
_lib: ctypes.CDLL | None = None
_tried = False
# KV format -> the C paged decode attention over codes of that format
_QUANT_DECODE = {"fp8_e4m3": "kv_paged_decode_attention_e4m3",
                 "fp8_e5m2": "kv_paged_decode_attention_e5m2"}


def reference_linear(x: torch.Tensor, weight: torch.Tensor | QuantWeight) -> torch.Tensor:
    """y = x @ weight^T in plain PyTorch; bf16/fp16 weights on CPU are widened to float32 first
    because CPUs without native bf16 matmul run F.linear in bf16 several times slower, and
    quantized weights are dequantized (QuantWeight.dequantize, the reference of their kernels)."""
    if isinstance(weight, QuantWeight):
        return F.linear(x.float(), weight.dequantize(torch.float32)).to(x.dtype)
    if x.device.type == "cpu" and weight.dtype != torch.float32:
        return F.linear(x.float(), weight.float()).to(x.dtype)
    return F.linear(x, weight)


def _cpu_key() -> str:
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    blob = _SOURCE.read_bytes() + " ".join(_CFLAGS).encode() + flags.encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _cache_dir() -> Path:
    root = os.environ.get("KVSERVE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "kvserve")
    return Path(root) / "kernels"


def _build() -> Path | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not _SOURCE.exists():
        return None
    target = _cache_dir() / f"gemv-{_cpu_key()}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build to a temporary name, then rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler, *_CFLAGS, str(_SOURCE), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        logger.warning("kvserve: C kernels not built (%s); using PyTorch reference",
                       proc.stderr.strip().splitlines()[-1:] or "compiler failed")
        return None
    os.replace(tmp, target)
    # Builds of older sources (or other flags) are never loaded again: drop them. A process that
    # still has one mapped keeps its copy until it exits (unlinking does not unmap).
    for stale in target.parent.glob("gemv-*.so"):
        if stale != target:
            stale.unlink(missing_ok=True)
    return target


def load() -> ctypes.CDLL | None:
    """The compiled kernels, or None (then every call takes the PyTorch reference)."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("KVSERVE_NO_CKERNELS") == "1" or not sys.platform.startswith("linux"):
        return None
    try:
        path = _build()
        if path is None:
            return None
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        logger.warning("kvserve: C kernels unavailable (%s); using PyTorch reference", err)
        return None
    _declare(lib)
    if lib.kv_max_m() != MAX_M:
        logger.warning("kvserve: stale C kernel build; using PyTorch reference")
        return None
    _lib = lib
    return _lib


def _declare(lib: ctypes.CDLL) -> None:
    ptr, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    signatures = {
        "kv_gemv_f32": [ptr, ptr, ptr, i32, i32, i32, i32],
        "kv_gemv_bf16": [ptr, ptr, ptr, i32, i32, i32, i32],
        "kv_rms_norm": [ptr, ptr, ptr, i32, i32, f32],
        "kv_rope": [ptr, ptr, ptr, i32, i32, i32, i32],
        "kv_swiglu": [ptr, ptr, i32, i32],
        "kv_read_sum": [ptr, ctypes.c_size_t],
        "kv_set_num_threads": [i32],
        "kv_decode_attention_f32": [ptr, ptr, ptr, ptr, ptr] + [i32] * 5 + [ptr, ptr],
        "kv_decode_attention_bf16": [ptr, ptr, ptr, ptr, ptr] + [i32] * 5 + [ptr, ptr],
        "kv_paged_decode_attention_f32": [ptr, i32, ptr, ptr, ptr, i32, ptr] + [i32] * 6
        + [ptr, ptr],
        "kv_paged_decode_attention_bf16": [ptr, i32, ptr, ptr, ptr, i32, ptr] + [i32] * 6
        + [ptr, ptr],
        "kv_set_fp8_lut": [i32, ptr],
        "kv_gemv_q": [i32, i32, ptr, ptr, ptr, ptr, ptr, ptr, i32, ptr, ptr, i32, i32, i32,
                      i32],  # returns 0: no scratch
        "kv_dequantize_q": [i32, i32, ptr, ptr, ptr, ptr, ptr, ptr, i32, ptr, i32, i32],
        "kv_dequantize_rows_q": [i32, i32, ptr, ptr, ptr, ptr, ptr, ptr, i32, ptr, ptr, i32, i32],
        "kv_layer_pre": [ptr, ptr, f32, ptr, ptr, ptr, i32, i32, i32, ptr],
        "kv_layer_post": [ptr, ptr, ptr, ptr, f32, ptr, ptr, i32],
        "kv_decode_layers": [ptr, i32, ptr, i32, f32, ptr, ptr, i32, i32, i32, i32, ptr, ptr,
                             ctypes.c_size_t, ptr, ptr, i32, ptr, i32, i32, ptr, ptr, ptr, ptr],
        "kv_decode_steps": [ptr, ptr, ptr, i32, ptr, i32, ptr, i32, f32, ptr, ptr, i32, i32, i32,
                            i32, ptr, ptr, ctypes.c_size_t, ptr, i32, i32, ptr, ptr, ptr, ptr],
    }
    signatures["kv_paged_decode_attention_affine"] = [
        i32, i32, ptr, i32, ptr, ptr, ptr, ptr, ptr, ptr, i32, ptr, ptr, ptr, i32, ptr, i32,
        ptr] + [i32] * 6 + [ptr, ptr]
    for name in _QUANT_DECODE.values():
        signatures[name] = [ptr, i32, ptr, ptr, f32, f32, ptr, ptr, ptr, i32, ptr, i32, ptr] \
            + [i32] * 6 + [ptr, ptr]
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = {"kv_read_sum": ctypes.c_double, "kv_gemv_q": ctypes.c_int,
                      "kv_layer_pre": ctypes.c_int,
                      "kv_layer_post": ctypes.c_int, "kv_decode_layers": ctypes.c_int,
                      "kv_decode_steps": ctypes.c_int,
                      "kv_paged_decode_attention_f32": ctypes.c_int,
                      "kv_paged_decode_attention_bf16": ctypes.c_int}.get(name)
    lib.kv_max_m.restype = i32
    lib.kv_gemm_rows.restype = i32
    for which, dtype in enumerate((torch.float8_e4m3fn, torch.float8_e5m2)):
        # the C side reads fp8 codes through torch's own conversion of all 256 bytes
        lut = torch.arange(256, dtype=torch.uint8).view(dtype).float().contiguous()
        lib.kv_set_fp8_lut(which, lut.data_ptr())


_KEPT = False


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed large blocks for reuse instead of returning them to the
    OS at every free (mallopt: M_MMAP_THRESHOLD and M_TRIM_THRESHOLD to 1 GiB). Prefill's
    activations (tens of MB per op) were otherwise mapped and unmapped op by op, and the page
    faults of fresh pages cost ~15% of a cold 2,000-token prefill on this CPU (~330 -> ~400
    tokens/s, interleaved runs). Resident memory then stays near its peak, as with the
    jemalloc/tcmalloc setups PyTorch recommends for CPU inference. Once per process, glibc on
    Linux only; KVSERVE_KEEP_FREED_MEMORY=0 opts out. Returns whether it is in effect."""
    global _KEPT
    if _KEPT or os.environ.get("KVSERVE_KEEP_FREED_MEMORY") == "0" \
            or not sys.platform.startswith("linux"):
        return _KEPT
    try:
        libc = ctypes.CDLL("libc.so.6")
        mmap_threshold, trim_threshold = -3, -1  # glibc's M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
        _KEPT = bool(libc.mallopt(mmap_threshold, 1 << 30)) and \
            bool(libc.mallopt(trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc
        _KEPT = False
    return _KEPT


def available() -> bool:
    return load() is not None


@contextlib.contextmanager
def decode_threads():
    """Run a decode step with torch on one thread and the C kernels on all of them.

    A decode step is ~10 tiny torch ops per layer around the C calls; with two or more OpenMP
    threads each of those pays a barrier, and when another process holds a core a barrier can
    wait milliseconds for a descheduled thread (measured here: a tiny bmm went from 3 us to 7.7 ms).
    The weight-streaming C loops keep every thread.
    """
    num_threads = torch.get_num_threads()
    if num_threads == 1 or _lib is None:
        yield
        return
    _lib.kv_set_num_threads(num_threads)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(num_threads)
        _lib.kv_set_num_threads(0)


def _gemv_for(weight: torch.Tensor | QuantWeight):
    """fn(weight, x, y, m, n, k, accumulate) for this weight's C product, or None."""
    lib = _lib if _tried else load()
    if lib is None:
        return None
    if isinstance(weight, QuantWeight):
        if weight.device.type != "cpu":
            return None
        return _quant_product
    if not weight.is_contiguous():
        return None
    fn = {torch.float32: lib.kv_gemv_f32, torch.bfloat16: lib.kv_gemv_bf16}.get(weight.dtype)
    return None if fn is None else lambda w, *rest: fn(w.data_ptr(), *rest)


def _quant_product(w: QuantWeight, x_ptr: int, y_ptr: int, m: int, n: int, k: int,
                   accumulate: int) -> None:
    done = _lib.kv_gemv_q(_FORMATS[w.format], w.group, *_pointers(w), x_ptr, y_ptr, m, n, k,
                          accumulate)
    if not done:
        raise MemoryError("kvserve: no memory for a quantized product's scratch")


_FORMATS = {"q4": 4, "q5": 5, "q8": 8}  # QuantWeight.format -> gemv.c's fmt / kv_weight kind


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _pointers(w: QuantWeight) -> tuple:
    """codes, hbits, scale, scale_sb, mins, mins_sb, scale kind: gemv.c's order"""
    return (w.codes.data_ptr(), _ptr(w.high), w.scale.data_ptr(), _ptr(w.scale_sb), _ptr(w.min),
            _ptr(w.min_sb), w.scale_kind)


_scratch = threading.local()


def dequantize(weight: QuantWeight, reuse: bool = False) -> torch.Tensor:
    """weight as float32 [n, k] (the C twin of QuantWeight.dequantize, for prefill-sized
    products). reuse: into this thread's scratch buffer, valid until its next reuse call (a
    fresh 100 MB tensor per product cost more in page faults than the dequantization)."""
    lib = _lib if _tried else load()
    if lib is None or weight.device.type != "cpu":
        return weight.dequantize(torch.float32)
    n, k = weight.shape
    if reuse:
        buf = getattr(_scratch, "buf", None)
        if buf is None or buf.numel() < n * k:
            buf = _scratch.buf = torch.empty(n * k, dtype=torch.float32)
        out = buf[:n * k].view(n, k)
    else:
        out = torch.empty((n, k), dtype=torch.float32)
    lib.kv_dequantize_q(_FORMATS[weight.format], weight.group, *_pointers(weight), out.data_ptr(),
                        n, k)
    return out


def dequantize_rows(weight: QuantWeight, ids: torch.Tensor) -> torch.Tensor:
    """weight's rows `ids` (int64, in range) as float32 [len(ids), k]: an embedding lookup in
    one C call (reference: weight.rows(ids).dequantize(); gathering the rows first cost ~0.15 ms
    a decode step in torch indexing)."""
    lib = _lib if _tried else load()
    if lib is None or weight.device.type != "cpu" or ids.device.type != "cpu":
        return weight.rows(ids).dequantize(torch.float32)
    ids = ids.to(torch.int64).contiguous()
    out = torch.empty((ids.shape[0], weight.shape[1]), dtype=torch.float32)
    lib.kv_dequantize_rows_q(_FORMATS[weight.format], weight.group, *_pointers(weight),
                             ids.data_ptr(), out.data_ptr(), ids.shape[0], weight.shape[1])
    return out


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y[m, n] = x[m, k] @ weight[n, k]^T, through gemv.c when m is small on CPU; quantized
    weights through its int16 panel GEMM up to kv_gemm_rows() rows (256; past that, torch's
    float32 GEMM over the weight dequantized into scratch was as fast here)."""
    fn = _gemv_for(weight) if x.device.type == "cpu" and x.dim() == 2 else None
    # quantized: gemv.c's panel GEMM up to kv_gemm_rows() (under the crossover to torch's GEMM)
    limit = max(MAX_M, _lib.kv_gemm_rows()) if fn is _quant_product else MAX_M
    if fn is None or x.shape[0] > limit:
        if isinstance(weight, QuantWeight) and weight.device.type == "cpu":
            return F.linear(x.float(), dequantize(weight, reuse=True)).to(x.dtype)
        return reference_linear(x, weight)
    m, k = x.shape
    xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
    y = torch.empty((m, weight.shape[0]), dtype=torch.float32)  # [m, n]
    fn(weight, xf.data_ptr(), y.data_ptr(), m, weight.shape[0], k, 0)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


# -- fused decode ops: float32 CPU tensors, contiguous, m <= MAX_M rows; callers check -------------
def fast_path_ok(x: torch.Tensor) -> bool:
    """Whether the fused decode ops below can take this activation tensor."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
            and x.shape[0] <= MAX_M and (_lib if _tried else load()) is not None)


def linear_add_(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """y[m, n] += x[m, k] @ weight[n, k]^T in place (the residual add fused into the product).
    Reference: y += reference_linear(x, weight)."""
    _gemv_for(weight)(weight, x.data_ptr(), y.data_ptr(), x.shape[0], weight.shape[0],
                      x.shape[1], 1)


class WeightRef(ctypes.Structure):
    """A matrix as gemv.c's kv_weight sees it; holds the tensors it points into."""
    _fields_ = [("kind", ctypes.c_int), ("n", ctypes.c_int), ("k", ctypes.c_int),
                ("data", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("mins", ctypes.c_void_p),
                ("group", ctypes.c_int), ("scale_kind", ctypes.c_int),
                ("hbits", ctypes.c_void_p), ("scale_sb", ctypes.c_void_p),
                ("mins_sb", ctypes.c_void_p)]


def weight_ref(weight: torch.Tensor | QuantWeight) -> WeightRef | None:
    """The C description of a CPU matrix the fused layer calls can read, or None."""
    if weight.device.type != "cpu":
        return None
    n, k = weight.shape
    if isinstance(weight, QuantWeight):
        ref = WeightRef(_FORMATS[weight.format], n, k, weight.codes.data_ptr(),
                        weight.scale.data_ptr(), _ptr(weight.min), weight.group,
                        weight.scale_kind, _ptr(weight.high), _ptr(weight.scale_sb),
                        _ptr(weight.min_sb))
    elif weight.is_contiguous() and weight.dtype in (torch.float32, torch.bfloat16):
        ref = WeightRef(32 if weight.dtype == torch.float32 else 16, n, k, weight.data_ptr(),
                        None, None, 0, 0, None, None, None)
    else:
        return None
    ref.keep = weight  # the memory it points into lives as long as the description
    return ref


def layer_pre(h: torch.Tensor, norm: torch.Tensor, eps: float, qkv: WeightRef,
              cos: torch.Tensor, sin: torch.Tensor, rope_heads: int,
              head_dim: int) -> torch.Tensor:
    """rope(rms_norm(h) @ Wqkv^T) in one call: [m, qkv.n]. Reference: the same three ops
    (model.llama.LlamaModel._layer_reference)."""
    out = torch.empty((h.shape[0], qkv.n), dtype=torch.float32)
    if not _lib.kv_layer_pre(h.data_ptr(), norm.data_ptr(), eps, ctypes.byref(qkv),
                             cos.data_ptr(), sin.data_ptr(), rope_heads, head_dim, h.shape[0],
                             out.data_ptr()):
        raise MemoryError("kvserve: no memory for a decode layer's scratch")
    return out


def layer_post_(h: torch.Tensor, o: torch.Tensor, wo: WeightRef, norm: torch.Tensor, eps: float,
                gate_up: WeightRef, down: WeightRef) -> None:
    """h += o @ Wo^T; h += swiglu(rms_norm(h) @ Wgu^T) @ Wdown^T, in place, in one call."""
    if not _lib.kv_layer_post(h.data_ptr(), o.data_ptr(), ctypes.byref(wo), norm.data_ptr(), eps,
                              ctypes.byref(gate_up), ctypes.byref(down), h.shape[0]):
        raise MemoryError("kvserve: no memory for a decode layer's scratch")


class LayerRef(ctypes.Structure):
    """One decode layer as gemv.c's kv_layer_ref sees it: its two norms and four matrices."""
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
                ("qkv", WeightRef), ("o", WeightRef), ("gate_up", WeightRef),
                ("down", WeightRef)]


def layer_refs(layers: list[tuple[torch.Tensor, torch.Tensor, WeightRef, WeightRef, WeightRef,
                                  WeightRef]]):
    """The C array of every layer's LayerRef (input norm, post norm, qkv, o, gate_up, down);
    keeps the tensors it points into alive."""
    arr = (LayerRef * len(layers))()
    for ref, (n1, n2, qkv, o, gu, down) in zip(arr, layers):
        ref.input_norm, ref.post_norm = n1.data_ptr(), n2.data_ptr()
        ref.qkv, ref.o, ref.gate_up, ref.down = qkv, o, gu, down
    arr.keep = layers
    return arr


@dataclass(frozen=True)
class PagedDecode:
    """What kv_decode_layers needs of a decode step over a paged float32/bfloat16 store: K and V
    of every layer ([layers, num_blocks, block_size, num_kv, d] each), the new tokens' slots
    (long), the tables (int32), the contexts (int32, new token included), the scores scratch."""

    keys: torch.Tensor
    values: torch.Tensor
    slots: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    max_context: int
    scores: torch.Tensor


def decode_layers_(h: torch.Tensor, layers, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                   num_heads: int, num_kv: int, head_dim: int, step: PagedDecode,
                   final_norm: torch.Tensor | None = None,
                   lm_head: WeightRef | None = None) -> torch.Tensor | None:
    """Every layer of a decode step in one call (h [m, hidden] updated in place): per layer
    layer_pre, the K/V write into the step's slots, paged_decode_attention, layer_post_; then,
    given lm_head, every row's float32 logits [m, vocab] = rms_norm(h) @ lm_head^T (returned).
    The reference is that sequence of calls (LlamaModel._layer_fast with PagedAttention, then
    LlamaModel._logits)."""
    k, v = step.keys, step.values
    kind = 32 if k.dtype == torch.float32 else 16
    logits = None if lm_head is None else torch.empty((h.shape[0], lm_head.n),
                                                      dtype=torch.float32)
    if not _lib.kv_decode_layers(
            h.data_ptr(), h.shape[0], layers, len(layers), eps, cos.data_ptr(), sin.data_ptr(),
            num_heads, num_kv, head_dim, kind, k.data_ptr(), v.data_ptr(), k[0].numel(),
            step.slots.data_ptr(), step.block_tables.data_ptr(), step.block_tables.shape[1],
            step.context_lens.data_ptr(), k.shape[2], step.max_context, step.scores.data_ptr(),
            None if lm_head is None else final_norm.data_ptr(),
            None if lm_head is None else ctypes.byref(lm_head),
            None if logits is None else logits.data_ptr()):
        raise MemoryError("kvserve: no memory for a decode step's scratch")
    return logits


def decode_steps(embed: WeightRef, input_ids: torch.Tensor, positions: torch.Tensor,
                 num_steps: int, layers, eps: float, cos_table: torch.Tensor,
                 sin_table: torch.Tensor, num_heads: int, num_kv: int, head_dim: int,
                 step: PagedDecode, final_norm: torch.Tensor, lm_head: WeightRef) -> torch.Tensor:
    """num_steps greedy decode steps in one call (gemv.c kv_decode_steps): each embeds its
    tokens, runs decode_layers_ with logits, and feeds each row's argmax to the next. input_ids,
    positions [m] int64: step 0's; step: step 0's store, tables (covering every step's slot)
    and scores scratch (for the last step's context); cos_table/sin_table: RoPE's whole
    [positions, head_dim] tables, every step's positions inside them. Returns the picks
    [num_steps, m] int64. Reference: ModelRunner.execute_steps' loop of single steps."""
    k, v = step.keys, step.values
    m = input_ids.shape[0]
    ids = input_ids.to(torch.int64).contiguous()
    pos = positions.to(torch.int64).contiguous()
    tokens = torch.empty((num_steps, m), dtype=torch.int64)
    logits = torch.empty((m, lm_head.n), dtype=torch.float32)
    if not _lib.kv_decode_steps(
            ctypes.byref(embed), ids.data_ptr(), pos.data_ptr(), num_steps, tokens.data_ptr(), m,
            layers, len(layers), eps, cos_table.data_ptr(), sin_table.data_ptr(), num_heads,
            num_kv, head_dim, 32 if k.dtype == torch.float32 else 16, k.data_ptr(),
            v.data_ptr(), k[0].numel(), step.block_tables.data_ptr(),
            step.block_tables.shape[1], k.shape[2], step.scores.data_ptr(),
            final_norm.data_ptr(), ctypes.byref(lm_head), logits.data_ptr()):
        raise MemoryError("kvserve: no memory for a decode step's scratch")
    return tokens


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference: model.layers.rms_norm_reference."""
    out = torch.empty_like(x)
    _lib.kv_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1],
                     eps)
    return out


def rope_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
          head_dim: int) -> None:
    """Rotate the first num_heads heads of each row of qkv [m, row] in place; cos/sin
    [m, head_dim] contiguous. Reference: model.layers.apply_rope."""
    _lib.kv_rope(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), qkv.shape[0], num_heads,
                 head_dim, qkv.stride(0))


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """[m, 2 * inter] -> [m, inter]. Reference: model.layers.swiglu."""
    m, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((m, inter), dtype=torch.float32)
    _lib.kv_swiglu(gate_up.data_ptr(), out.data_ptr(), m, inter)
    return out


def decode_attention_ok(q: torch.Tensor, store: torch.Tensor) -> bool:
    """Whether decode_attention_ can serve float32 queries over this K/V store."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and store.is_contiguous()
            and store.dtype in (torch.float32, torch.bfloat16)
            and (_lib if _tried else load()) is not None)


def decode_attention_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
                      values: torch.Tensor, position: int, out: torch.Tensor,
                      scores: torch.Tensor) -> None:
    """One decode token of one sequence: write k, v [num_kv, d] at `position` of the store
    (keys/values [num_kv, capacity, d], contiguous), then out [num_heads, d] = causal GQA
    attention of q [num_heads, d] over positions [0, position]. scores: float32 scratch of at
    least num_heads * (position + 1). Reference: model.attention.ops.attention_reference."""
    num_heads, d = q.shape
    fn = (_lib.kv_decode_attention_f32 if keys.dtype == torch.float32
          else _lib.kv_decode_attention_bf16)
    fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), keys.data_ptr(), values.data_ptr(), position,
       keys.shape[1], num_heads, keys.shape[0], d, out.data_ptr(), scores.data_ptr())


def paged_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           max_context: int, scores: torch.Tensor) -> torch.Tensor:
    """Batched decode attention over a paged store, one query token per sequence.

    q [batch, num_heads, d] (rows may be strided, heads contiguous); keys/values
    [num_blocks, block_size, num_kv, d] contiguous; block_tables [batch, max_blocks] int32;
    context_lens [batch] int32; scores: float32 scratch of batch * num_heads * max_context.
    Returns [batch, num_heads, d]. Reference: attention_reference over the gathered blocks."""
    batch, num_heads, d = q.shape
    out = torch.empty((batch, num_heads, d), dtype=torch.float32)
    fn = (_lib.kv_paged_decode_attention_f32 if keys.dtype == torch.float32
          else _lib.kv_paged_decode_attention_bf16)
    if not fn(q.data_ptr(), q.stride(0), keys.data_ptr(), values.data_ptr(),
              block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(), batch,
              keys.shape[1], num_heads, keys.shape[2], d, max_context, out.data_ptr(),
              scores.data_ptr()):
        raise MemoryError("kvserve: no memory for a decode attention's scratch")
    return out


def paged_decode_attention_codes(kv_format: str, q: torch.Tensor, k_codes: torch.Tensor,
                                 v_codes: torch.Tensor, k_tensor_scale: float,
                                 v_tensor_scale: float, window: Window | None,
                                 block_tables: torch.Tensor, context_lens: torch.Tensor,
                                 max_context: int, scores: torch.Tensor) -> torch.Tensor:
    """paged_decode_attention over an fp8 store, read as codes: k_codes/v_codes
    [num_blocks, block_size, num_kv, d] (held as uint8); the tensor scales multiply all of K / V;
    each sequence's last window.blocks blocks read from its residual window instead (None:
    none). Reference: PagedKVStore.gather (codecs.decode, the window), then attention."""
    batch, num_heads, d = q.shape
    out = torch.empty((batch, num_heads, d), dtype=torch.float32)
    fn = getattr(_lib, _QUANT_DECODE[kv_format])
    kr, vr, slots, blocks = (None, None, None, 0) if window is None else \
        (window.k.data_ptr(), window.v.data_ptr(), window.slots.data_ptr(), window.blocks)
    fn(q.data_ptr(), q.stride(0), k_codes.data_ptr(), v_codes.data_ptr(), k_tensor_scale,
       v_tensor_scale, kr, vr, slots, blocks, block_tables.data_ptr(), block_tables.shape[1],
       context_lens.data_ptr(), batch, k_codes.shape[1], num_heads, k_codes.shape[2], d,
       max_context, out.data_ptr(), scores.data_ptr())
    return out


@dataclass(frozen=True)
class Window:
    """One layer's residual windows for the decode kernels: K's and V's rings [slots,
    blocks * block_size, num_kv, d] float32, each decode row's slot (long), blocks per ring."""

    k: torch.Tensor
    v: torch.Tensor
    slots: torch.Tensor
    blocks: int


I4_MAX_HEAD_DIM = 512
I4_MAX_GROUP = 16  # query heads per KV head
I4_MAX_BLOCK_ELEMS = 16384  # block_size * head_dim
I4_MAX_BLOCK_TOKENS = 1024


def paged_decode_attention_affine(bits: tuple[int, int], q: torch.Tensor,
                                  k: dict[str, torch.Tensor],
                                  v: dict[str, torch.Tensor], window: Window,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor,
                                  max_context: int, scores: torch.Tensor) -> torch.Tensor:
    """paged_decode_attention over int8 or int4 K and V (bits: K's and V's, 8 or 4). k/v are one
    layer's parts: codes [num_blocks, block_size, num_kv, d * bits / 8] uint8; K's scale and
    zero [num_blocks, num_kv, d] fp16, V's [num_blocks, block_size, num_kv, d / group] fp16.
    Each sequence's last window.blocks blocks (its partial one among them) are read from its
    residual window; scores needs batch * num_heads * max_context floats. Reference:
    PagedKVStore.gather (ChannelBlockCodec/TokenGroupBlockCodec.decode_blocks), then
    attention."""
    batch, num_heads, d = q.shape
    num_kv = k["codes"].shape[2]
    out = torch.empty((batch, num_heads, d), dtype=torch.float32)
    vgroup = d // v["scale"].shape[-1]
    _lib.kv_paged_decode_attention_affine(
        bits[0], bits[1], q.data_ptr(), q.stride(0),
        k["codes"].data_ptr(), k["scale"].data_ptr(), k["zero"].data_ptr(),
        v["codes"].data_ptr(), v["scale"].data_ptr(), v["zero"].data_ptr(), vgroup,
        window.k.data_ptr(), window.v.data_ptr(), window.slots.data_ptr(), window.blocks,
        block_tables.data_ptr(),
        block_tables.shape[1], context_lens.data_ptr(), batch, k["codes"].shape[1], num_heads,
        num_kv, d, max_context, out.data_ptr(), scores.data_ptr())
    return out


def read_bandwidth_bytes_per_s(num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best-of-`repeats` read bandwidth over a buffer far larger than the caches: the roofline
    a decode step (which reads every weight once) can reach. Falls back to torch.sum."""
    import time

    buf = torch.ones(num_bytes // 4, dtype=torch.float32)
    lib = load()
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms pages and threads
        t0 = time.perf_counter()
        if lib is not None:
            lib.kv_read_sum(buf.data_ptr(), buf.numel())
        else:
            buf.sum()
        best = min(best, time.perf_counter() - t0)
    return num_bytes / best
