"""KV cache dtype names and the one "auto" rule, shared by the engine's config and the planner.

Canonical names are what the CLI, LLM(...), the server and `kvserve plan` accept (with a few
aliases); kvcache/layout.py gives each its bytes. No torch.
"""

from __future__ import annotations

from kvserve.errors import ConfigError

KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8_e4m3", "fp8_e5m2", "int8",
                   "int4")
# What the engine stores: every float format in every cache mode, the quantized ones in the paged
# pool (codes and scales block by block).
BUILT_KV_CACHE_DTYPES = KV_CACHE_DTYPES
QUANTIZED_DTYPES = ("fp8_e4m3", "fp8_e5m2", "int8", "int4")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
KV_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16",
                    "f16": "float16", "half": "float16", "fp8": "fp8_e4m3", "q8": "int8",
                    "q4": "int4"}


def canonical_kv_dtype(name: str) -> str:
    """'fp16' -> 'float16', 'fp8' -> 'fp8_e4m3', 'auto' stays; ConfigError naming the choices."""
    key = str(name).strip().lower()
    key = KV_DTYPE_ALIASES.get(key, key)
    if key not in KV_CACHE_DTYPES:
        raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)} "
                          f"(aliases: fp32, bf16, fp16, fp8), got {name!r}")
    return key


def resolve_kv_cache_dtype(kv_cache_dtype: str, dtype: str) -> str:
    """The format K/V are stored in. "auto" follows the model's dtype (the compute dtype in the
    engine, the weights dtype in the planner) when that is a float format, else float16:
    quantized weights still compute, and cache, in 16 bits."""
    name = canonical_kv_dtype(kv_cache_dtype)
    if name != "auto":
        return name
    model = KV_DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    return model if model in FLOAT_DTYPES else "float16"


def kv_dtype_pair(k: str, v: str) -> str:
    """One name for K in format k and V in format v (both canonical): 'int8' when they agree,
    else 'int8/int4' (K's, then V's). Names with a slash are what layouts, keys and logs carry."""
    return k if k == v else f"{k}/{v}"


def split_kv_dtype(name: str) -> tuple[str, str]:
    """(K's format, V's format) of a name kv_dtype_pair made, or of one format for both."""
    k, _, v = str(name).partition("/")
    return canonical_kv_dtype(k), canonical_kv_dtype(v or k)


def resolve_kv_pair(kv_cache_dtype: str, dtype: str, k_cache_dtype: str | None = None,
                    v_cache_dtype: str | None = None) -> str:
    """The resolved name of K's and V's formats: each side's own setting if given, else
    kv_cache_dtype's ("auto" follows the model's dtype, as resolve_kv_cache_dtype)."""
    both = resolve_kv_cache_dtype(kv_cache_dtype, dtype)
    k = resolve_kv_cache_dtype(k_cache_dtype, dtype) if k_cache_dtype else both
    v = resolve_kv_cache_dtype(v_cache_dtype, dtype) if v_cache_dtype else both
    return kv_dtype_pair(k, v)


def check_kv_cache_dtype_built(name: str) -> None:
    """Refuse, in one line, a format the engine cannot store yet."""
    key = canonical_kv_dtype(name)
    if key not in BUILT_KV_CACHE_DTYPES:
        raise ConfigError(f"kv_cache_dtype {key!r} is not implemented in the engine yet "
                          f"(`kvserve plan` already sizes it); use one of "
                          f"{', '.join(BUILT_KV_CACHE_DTYPES)}")
