"""Frozen configuration, split by concern and validated once at construction.

Derived values are returned by properties, never written back. No torch here: the control plane
(and the planner) read these without loading a model.
"""

from __future__ import annotations

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

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
        """K and V, every layer, KV heads only (GQA): 2 x layers x kv_heads x head_dim x bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_element


@dataclass(frozen=True)
class CacheConfig:
    cache_mode: str = "contiguous"
    kv_cache_dtype: str = "auto"  # "auto": same as the model's compute dtype
    block_size: int = 16

    def __post_init__(self) -> None:
        if self.cache_mode not in CACHE_MODES:
            raise ConfigError(f"cache_mode must be one of {', '.join(CACHE_MODES)}, "
                              f"got {self.cache_mode!r}")
        if self.cache_mode == "paged":
            raise ConfigError("cache_mode 'paged' is not available yet: use 'contiguous' or 'none'")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                              f"got {self.kv_cache_dtype!r}")
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ConfigError(f"block_size must be a positive integer, got {self.block_size!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 8
    max_model_len: int | None = None  # None: the model's own context length

    def __post_init__(self) -> None:
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs <= 0:
            raise ConfigError(
                f"max_num_seqs must be a positive integer, got {self.max_num_seqs!r}")
        if self.max_model_len is not None and (
                not isinstance(self.max_model_len, int) or self.max_model_len <= 0):
            raise ConfigError(
                f"max_model_len must be a positive integer, got {self.max_model_len!r}")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
