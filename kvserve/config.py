"""Frozen configuration, split by concern and validated once at construction.

Derived values are returned by properties, never written back. No torch here: the control plane
(and the planner) read these without loading a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvserve.errors import ConfigError

CACHE_MODES = ("none", "contiguous", "paged")
DTYPES = ("float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto",)  # quantized KV formats arrive with the quantization issue


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling (rope_type "llama3"); other kinds are rejected by loaders."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a Llama-family model: everything the model, the cache and the planner need."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    rope_scaling: RopeScaling | None = None
    architecture: str = "llama"

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads",
                     "num_kv_heads", "head_dim", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


MAX_BLOCK_SIZE = 256
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
          "tib": 2**40}


def _split_size(value: str | int | float) -> tuple[float, str] | None:
    """(number, lower-case unit) of '2GiB', '512 MB', 1e9; None if it is not a size."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        text = str(value).strip().lower().replace(" ", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        try:
            number, unit = float(digits), text[len(digits):]
        except ValueError:
            return None
    if unit not in _UNITS or not math.isfinite(number):
        return None
    return number, unit


def parse_size(value: str | int | float, what: str) -> int:
    """'24GiB', '80GB', '512MiB', 1073741824 -> bytes; ConfigError naming `what` otherwise."""
    parsed = _split_size(value)
    if parsed is None or parsed[0] <= 0 or int(parsed[0] * _UNITS[parsed[1]]) <= 0:
        raise ConfigError(f"{what} must be a positive size like 24GiB, 80GB or 512MiB, "
                          f"got {value!r}")
    return int(parsed[0] * _UNITS[parsed[1]])


def format_bytes(num_bytes: float) -> str:
    """1536 -> '1.50 KiB'; bytes below 1 KiB as a whole number of B."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num_bytes) < 1024 or unit == "TiB":
            return f"{num_bytes:,.0f} {unit}" if unit == "B" else f"{num_bytes:,.2f} {unit}"
        num_bytes /= 1024
    return ""


def parse_memory(value: str | int | float) -> int | float:
    """'2GiB', '512MB', 1073741824 -> bytes (int); '0.5' or 0.5 -> a fraction of free memory."""
    parsed = _split_size(value)
    if parsed is None or parsed[0] <= 0:
        raise ConfigError(f"kv_cache_memory must be a size like 2GiB or 512MiB, or a fraction of "
                          f"free memory in (0, 1], got {value!r}")
    number, unit = parsed
    if unit == "" and number <= 1.0:
        return number  # a fraction
    return int(number * _UNITS[unit])


@dataclass(frozen=True)
class CacheConfig:
    cache_mode: str = "paged"
    kv_cache_dtype: str = "auto"  # "auto": same as the model's compute dtype
    block_size: int = 16
    kv_cache_memory: str | int | float = "1GiB"  # paged pool size, or a fraction of free memory
    # Reuse the K/V of cached prompt prefixes (paged mode; the other modes keep nothing to share)
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.enable_prefix_caching, bool):
            raise ConfigError(f"enable_prefix_caching must be True or False, "
                              f"got {self.enable_prefix_caching!r}")
        if self.cache_mode not in CACHE_MODES:
            raise ConfigError(f"cache_mode must be one of {', '.join(CACHE_MODES)}, "
                              f"got {self.cache_mode!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                              f"got {self.kv_cache_dtype!r}")
        bs = self.block_size
        if (not isinstance(bs, int) or isinstance(bs, bool) or bs <= 0 or bs & (bs - 1)
                or bs > MAX_BLOCK_SIZE):
            raise ConfigError(f"block_size must be a power of two from 1 to {MAX_BLOCK_SIZE}, "
                              f"got {bs!r}")
        parse_memory(self.kv_cache_memory)

    @property
    def kv_cache_memory_spec(self) -> int | float:
        """Bytes (int) or a fraction of free device memory (float)."""
        return parse_memory(self.kv_cache_memory)


PREEMPTION_MODES = ("recompute", "swap")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 8
    max_model_len: int | None = None  # None: the model's own context length
    max_num_batched_tokens: int = 2048  # token budget of one step (chunked prefill cuts to it)
    preemption_mode: str = "recompute"
    # Limits that protect capacity (None: no limit). A long request is one whose prompt +
    # max_tokens exceeds long_context_threshold; at most max_long_requests of them run at once.
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    max_long_requests: int | None = None
    long_context_threshold: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "long_context_threshold"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_input_tokens", "max_output_tokens", "max_long_requests"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value <= 0):
                raise ConfigError(f"{name} must be a positive integer or unset, got {value!r}")
        if self.max_model_len is not None and (
                not isinstance(self.max_model_len, int) or self.max_model_len <= 0):
            raise ConfigError(
                f"max_model_len must be a positive integer, got {self.max_model_len!r}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ConfigError(f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, "
                              f"got {self.preemption_mode!r}")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @classmethod
    def create(cls, model: str | None = None, dtype: str = "float32", device: str = "cpu",
               cache_mode: str = "paged", kv_cache_dtype: str = "auto",
               kv_cache_memory: str | int | float = "1GiB", block_size: int = 16,
               max_model_len: int | None = None, max_num_seqs: int = 8,
               max_num_batched_tokens: int = 2048, preemption_mode: str = "recompute",
               max_input_tokens: int | None = None, max_output_tokens: int | None = None,
               max_long_requests: int | None = None, long_context_threshold: int = 4096,
               enable_prefix_caching: bool = True, seed: int = 0) -> EngineConfig:
        """From the flat engine flags every command and LLM(...) share."""
        return cls(
            model=model, dtype=dtype, device=device, seed=seed,
            cache=CacheConfig(cache_mode=cache_mode, kv_cache_dtype=kv_cache_dtype,
                              block_size=block_size, kv_cache_memory=kv_cache_memory,
                              enable_prefix_caching=enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                      max_num_batched_tokens=max_num_batched_tokens,
                                      preemption_mode=preemption_mode,
                                      max_input_tokens=max_input_tokens,
                                      max_output_tokens=max_output_tokens,
                                      max_long_requests=max_long_requests,
                                      long_context_threshold=long_context_threshold))

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")


@dataclass(frozen=True)
class ServerConfig:
    """`kvserve serve`: where to listen, who may call, and how much may wait."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()  # empty: no auth; else each key is its own cache tenant
    max_queue: int | None = None  # waiting sequences before 429 (None: unbounded)
    served_model_name: str | None = None  # None: the model's own name
    shutdown_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may finish
    max_body_bytes: int = 16 * 2**20  # larger request bodies are answered 413

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port!r}")
        if any(not isinstance(k, str) or not k.strip() for k in self.api_keys):
            raise ConfigError("api keys must be non-empty strings")
        if self.max_queue is not None and (not isinstance(self.max_queue, int)
                                           or self.max_queue < 1):
            raise ConfigError(f"max_queue must be a positive integer, got {self.max_queue!r}")
        if not self.shutdown_timeout_s >= 0:
            raise ConfigError(f"shutdown_timeout must be >= 0 seconds, "
                              f"got {self.shutdown_timeout_s!r}")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes <= 0:
            raise ConfigError(f"max_body_bytes must be a positive integer, "
                              f"got {self.max_body_bytes!r}")
