"""CPU fast path for decode-sized matrix products (gemv.c), built on first use and called by ctypes.

`linear(x, w)` is the one entry point the model uses; it falls back to the plain PyTorch reference
(`reference_linear`) when the input is not a small float32 CPU batch, when no C compiler is found,
or when KVSERVE_NO_CKERNELS=1. Building needs only a C compiler with OpenMP (gcc or clang); the
shared object is cached under ~/.cache/kvserve/kernels keyed by source, flags and CPU features.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("gemv.c")
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_lib: ctypes.CDLL | None = None
_tried = False


def reference_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x @ weight^T in plain PyTorch; bf16/fp16 weights on CPU are widened to float32 first
    because CPUs without native bf16 matmul run F.linear in bf16 several times slower."""
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
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    for fn in (lib.kv_gemv_f32, lib.kv_gemv_bf16):
        fn.argtypes = [ptr, ptr, ptr, i32, i32, i32]
        fn.restype = None
    lib.kv_max_m.restype = i32
    _lib = lib
    return _lib


def _max_m(lib: ctypes.CDLL) -> int:
    return lib.kv_max_m()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y[m, n] = x[m, k] @ weight[n, k]^T, through gemv.c when m is small on CPU."""
    lib = load() if x.device.type == "cpu" else None
    if (lib is None or x.dim() != 2 or x.shape[0] > _max_m(lib)
            or weight.dtype not in (torch.float32, torch.bfloat16)
            or not weight.is_contiguous()):
        return reference_linear(x, weight)
    m, k = x.shape
    n = weight.shape[0]
    xf = x.contiguous() if x.dtype == torch.float32 else x.float().contiguous()
    y = torch.empty((m, n), dtype=torch.float32)  # [m, n]
    fn = lib.kv_gemv_f32 if weight.dtype == torch.float32 else lib.kv_gemv_bf16
    fn(weight.data_ptr(), xf.data_ptr(), y.data_ptr(), m, n, k)
    return y if x.dtype == torch.float32 else y.to(x.dtype)
