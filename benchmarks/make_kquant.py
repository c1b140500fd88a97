"""Writes the default model requantized to a llama.cpp k-quant mix with llama.cpp's own quantizer
(llama-cpp-python's llama_model_quantize, the `peers` extra), for bench_native.py --model.

    .venv/bin/python benchmarks/make_kquant.py OUT.gguf [--type q4_k_m|q5_k_m|q6_k]

SmolLM2's 576-wide rows are not a multiple of 256 (a k-quant super-block), so llama.cpp falls
back to Q5_0/Q5_1/Q8_0 for most of its tensors; the 1,536-wide FFN down projections get
Q4_K/Q5_K/Q6_K. The source is already 4-bit (Q4_1), so the result is a test file for formats
and speed, not a better model.
"""

from __future__ import annotations

import argparse
import ctypes
import sys

from kvserve.model_files import default_model_path

FTYPES = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--type", default="q4_k_m", choices=sorted(FTYPES))
    args = p.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print("make_kquant: needs llama-cpp-python (pip install -e '.[peers]')", file=sys.stderr)
        return 2
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[args.type]
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(default_model_path().encode(), args.out.encode(),
                                        ctypes.byref(params))
    if rc != 0:
        print(f"make_kquant: llama_model_quantize returned {rc}", file=sys.stderr)
        return 1
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
