"""Frozen configuration, split by concern and validated once at construction.

Derived values are returned by properties, never written back. No torch here: the control plane
(and the planner) read these without loading a model. Engine settings are declared once, as the
fields of EngineConfig, CacheConfig and SchedulerConfig made with setting(): the CLI's engine
flags, LLM(...)'s keywords and EngineConfig.create all derive from engine_settings().
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from kvserve.errors import ConfigError
from kvserve.kv_dtypes import (
    BUILT_KV_CACHE_DTYPES,  # noqa: F401 (re-exported: labs import config, not kv_dtypes)
    KV_CACHE_DTYPES,
    QUANTIZED_DTYPES,
    canonical_kv_dtype,
    check_kv_cache_dtype_built,
    resolve_kv_pair,
    split_kv_dtype,
)

CACHE_MODES = ("none", "contiguous", "paged")
CACHE_POLICIES = ("full", "sinks")
SINKS_CONTEXT_FACTOR = 16  # --cache-policy sinks: default max_model_len, in model contexts
DEFAULT_SINK_TOKENS = 4  # StreamingLLM's
KV_QUANT_CHECKS = ("refuse", "warn", "off")  # engine/kv_check.py judges
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("auto", "none", "gguf", "int8", "int4")


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
    # Qwen2/2.5: Q, K and V projections carry a bias. Qwen3: an RMSNorm over each query and key
    # head (weight [head_dim]) before RoPE.
    attention_bias: bool = False
    qk_norm: bool = False
    # Sliding-window attention: entry i is layer i's window in tokens (a query at position p sees
    # keys p - W + 1 .. p, as transformers' sliding_window), 0 for full attention; () = all full.
    layer_windows: tuple[int, ...] = ()
    # Gemma 2: GeGLU ("gelu_tanh"), a norm on each sublayer's output too ("sandwich"), the
    # embedding times sqrt(hidden), attention scaled by attn_scale instead of head_dim ** -0.5,
    # and tanh soft-capping of attention scores and of the final logits.
    hidden_act: str = "silu"
    sandwich_norms: bool = False
    embed_scale: float | None = None
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    # Gemma 3: sliding layers rotate with their own RoPE base; the global layers' frequencies
    # may be divided by a linear factor (rope_type "linear")
    local_rope_theta: float | None = None
    rope_linear_factor: float | None = None

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
        if self.layer_windows and (len(self.layer_windows) != self.num_layers or any(
                not isinstance(w, int) or w < 0 for w in self.layer_windows)):
            raise ConfigError(f"layer_windows must give each of the {self.num_layers} layers a "
                              f"window of 0 (full attention) or more tokens, got "
                              f"{self.layer_windows!r}")

    @property
    def plain_attention(self) -> bool:
        """softmax(q k / sqrt(head_dim)): what the C attention kernels compute."""
        return self.attn_scale is None and self.attn_softcap is None

    def window(self, layer: int) -> int | None:
        """Layer `layer`'s sliding window in tokens; None: it attends to every earlier token."""
        return (self.layer_windows[layer] or None) if self.layer_windows else None

    @property
    def has_windows(self) -> bool:
        return any(self.layer_windows)

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
MAX_THREADS = 1024
DEFAULT_KV_RESIDUAL_TOKENS = 128  # KIVI's residual length
MAX_KV_RESIDUAL_TOKENS = 4096
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


def setting(default: Any, help: str, *, kind: str = "str", choices: tuple[str, ...] | None = None,
            normalize: Callable[[str], str] | None = None, flag: bool = True) -> Any:
    """A dataclass field that is also an engine setting: its name is the LLM(...) keyword and,
    with dashes, the CLI flag (kind: str | int | bool | size); `normalize` maps a typed alias
    to its canonical choice; flag=False keeps it off the shared engine flags (a command
    declares its own)."""
    return field(default=default, metadata={"help": help, "kind": kind, "choices": choices,
                                            "normalize": normalize, "flag": flag})


@dataclass(frozen=True)
class CacheConfig:
    cache_mode: str = setting("paged", "where K/V live: paged blocks, one contiguous tensor per "
                              "sequence, or no cache (recompute everything)", choices=CACHE_MODES)
    kv_cache_dtype: str = setting(
        "auto", "storage format of K/V; auto: the model's dtype if a float format, else "
        "float16; fp8_*, int8 and int4 are quantized (paged mode only)",
        choices=KV_CACHE_DTYPES, normalize=canonical_kv_dtype)
    k_cache_dtype: str | None = setting(
        None, "storage format of K alone (default: --kv-cache-dtype's); K is usually the more "
        "sensitive of the two", choices=KV_CACHE_DTYPES, normalize=canonical_kv_dtype)
    v_cache_dtype: str | None = setting(
        None, "storage format of V alone (default: --kv-cache-dtype's)",
        choices=KV_CACHE_DTYPES, normalize=canonical_kv_dtype)
    kv_residual_tokens: int | None = setting(
        None, "quantized K/V (fp8, int8, int4): the residual window, the most recent tokens of "
        "each sequence (a multiple of --block-size, plus the partial block) that its own "
        "attention reads in float32, as KIVI does; 0: none for fp8, the partial block for "
        "int8/int4 (whose codes wait for the block to fill); default 128", kind="int")
    block_size: int = setting(16, "tokens per KV block (a power of two)", kind="int")
    kv_quant_check: str = setting(
        "refuse", "quantized KV formats only: compare next-token distributions with float32 "
        "K/V on ~1,000 tokens of calibration text at start-up, and refuse to start (or warn) "
        "when mean KL > 0.1 nats or top-1 agreement < 80%", choices=KV_QUANT_CHECKS)
    kv_cache_memory: str | int | float = setting(
        "1GiB", "paged KV pool size, e.g. 2GiB, or a fraction of free memory (0.5)", kind="size")
    enable_prefix_caching: bool = setting(
        True, "reuse cached K/V of shared prompt prefixes (paged mode)", kind="bool")
    cache_policy: str = setting(
        "full", "which K/V a sequence keeps: full (all; a sequence ends at max_model_len) or "
        "sinks (StreamingLLM: the blocks of the first --sink-tokens tokens and of the last "
        "--window-tokens; the blocks between go back to the pool, attention places the sinks "
        "just before the window, and a sequence may run past the model's context: "
        f"max_model_len defaults to {SINKS_CONTEXT_FACTOR}x it); paged mode",
        choices=CACHE_POLICIES)
    sink_tokens: int = setting(
        DEFAULT_SINK_TOKENS, "--cache-policy sinks: the leading tokens kept as attention "
        "sinks (their blocks: rounded up to whole blocks)", kind="int")
    window_tokens: int | None = setting(
        None, "--cache-policy sinks: the recent tokens kept (their blocks); default: the "
        "model's context less the sinks, one step (--max-num-batched-tokens) and a block",
        kind="int")

    def __post_init__(self) -> None:
        if not isinstance(self.enable_prefix_caching, bool):
            raise ConfigError(f"enable_prefix_caching must be True or False, "
                              f"got {self.enable_prefix_caching!r}")
        if self.cache_mode not in CACHE_MODES:
            raise ConfigError(f"cache_mode must be one of {', '.join(CACHE_MODES)}, "
                              f"got {self.cache_mode!r}")
        for name in (self.kv_cache_dtype, self.k_cache_dtype, self.v_cache_dtype):
            if name is not None:
                check_kv_cache_dtype_built(name)
        if self.kv_quant_check not in KV_QUANT_CHECKS:
            raise ConfigError(f"kv_quant_check must be one of {', '.join(KV_QUANT_CHECKS)}, "
                              f"got {self.kv_quant_check!r}")
        kv_dtypes = split_kv_dtype(self.resolved_kv_cache_dtype("float32"))
        for kv_dtype in kv_dtypes:
            if self.cache_mode != "paged" and kv_dtype in QUANTIZED_DTYPES:
                raise ConfigError(f"kv_cache_dtype {kv_dtype!r} is stored in the paged "
                                  f"pool only; cache_mode {self.cache_mode!r} keeps float K/V")
        if self.cache_mode != "paged" and kv_dtypes[0] != kv_dtypes[1]:
            raise ConfigError(f"K and V in different formats ({'/'.join(kv_dtypes)}) need the "
                              f"paged pool; cache_mode {self.cache_mode!r} keeps one float dtype")
        residual = self.kv_residual_tokens
        if residual is not None:
            if not set(QUANTIZED_DTYPES) & set(kv_dtypes):
                raise ConfigError("kv_residual_tokens applies to quantized K or V only "
                                  f"(the KV format is {'/'.join(dict.fromkeys(kv_dtypes))})")
            residual_window(residual, self.block_size)
        bs = self.block_size
        if (not isinstance(bs, int) or isinstance(bs, bool) or bs <= 0 or bs & (bs - 1)
                or bs > MAX_BLOCK_SIZE):
            raise ConfigError(f"block_size must be a power of two from 1 to {MAX_BLOCK_SIZE}, "
                              f"got {bs!r}")
        parse_memory(self.kv_cache_memory)
        if self.cache_policy not in CACHE_POLICIES:
            raise ConfigError(f"cache_policy must be one of {', '.join(CACHE_POLICIES)}, "
                              f"got {self.cache_policy!r}")
        for name in ("sink_tokens", "window_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 0):
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if self.cache_policy == "sinks":
            if self.cache_mode != "paged":
                raise ConfigError(f"cache_policy 'sinks' releases blocks of the paged pool; "
                                  f"cache_mode {self.cache_mode!r} keeps every token")
            if self.window_tokens is not None and self.window_tokens < bs:
                raise ConfigError(f"window_tokens must hold at least one block ({bs} tokens), "
                                  f"got {self.window_tokens}")
            if self.residual_window_tokens:
                raise ConfigError("cache_policy 'sinks' reads K/V from the pool only: with a "
                                  "quantized KV format, set kv_residual_tokens 0")
        elif self.window_tokens is not None or self.sink_tokens != DEFAULT_SINK_TOKENS:
            raise ConfigError("sink_tokens and window_tokens apply to cache_policy 'sinks'")

    @property
    def kv_cache_memory_spec(self) -> int | float:
        """Bytes (int) or a fraction of free device memory (float)."""
        return parse_memory(self.kv_cache_memory)

    def resolved_kv_cache_dtype(self, dtype: str) -> str:
        """The format K/V are stored in when the model computes in `dtype` ('int8/int4' when
        K's and V's differ: kv_dtypes.kv_dtype_pair)."""
        return resolve_kv_pair(self.kv_cache_dtype, dtype, self.k_cache_dtype,
                               self.v_cache_dtype)

    @property
    def residual_window_tokens(self) -> int:
        """The residual window's whole-block tokens (kv_residual_tokens, or the default: 128
        rounded up to whole blocks for a quantized format, 0 for float formats)."""
        kv_dtypes = split_kv_dtype(self.resolved_kv_cache_dtype("float32"))
        if self.kv_residual_tokens is None and not set(QUANTIZED_DTYPES) & set(kv_dtypes):
            return 0
        return residual_window(self.kv_residual_tokens, self.block_size)


def residual_window(kv_residual_tokens: int | None, block_size: int) -> int:
    """The quantized formats' residual window in tokens, as the engine and the planner read
    --kv-residual-tokens: None is the default (128, rounded up to whole blocks); else a multiple
    of block_size from 0 to MAX_KV_RESIDUAL_TOKENS (ConfigError otherwise)."""
    if kv_residual_tokens is None:
        return -(-DEFAULT_KV_RESIDUAL_TOKENS // block_size) * block_size
    w = kv_residual_tokens
    if (not isinstance(w, int) or isinstance(w, bool) or w < 0 or w > MAX_KV_RESIDUAL_TOKENS
            or w % block_size):
        raise ConfigError(f"kv_residual_tokens must be a multiple of block_size ({block_size}) "
                          f"from 0 to {MAX_KV_RESIDUAL_TOKENS}, got {w!r}")
    return w


PREEMPTION_MODES = ("recompute", "swap")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = setting(8, "sequences in the running batch at most", kind="int")
    max_model_len: int | None = setting(None, "context length (default: the model's own)",
                                        kind="int")
    max_num_batched_tokens: int = setting(
        2048, "token budget of one step (chunked prefill cuts prompts to it)", kind="int")
    preemption_mode: str = setting("recompute", "what a preempted request loses: its K/V "
                                   "(recompute) or its device blocks (swap to host memory)",
                                   choices=PREEMPTION_MODES)
    # Limits that protect capacity (None: no limit). A long request is one whose prompt +
    # max_tokens exceeds long_context_threshold; at most max_long_requests of them run at once.
    max_input_tokens: int | None = setting(None, "reject longer prompts", kind="int")
    max_output_tokens: int | None = setting(None, "reject requests asking for more new tokens",
                                            kind="int")
    max_long_requests: int | None = setting(
        None, "at most this many requests over --long-context-threshold run at once", kind="int")
    long_context_threshold: int = setting(
        4096, "prompt + max_tokens above which a request counts as long", kind="int")
    num_scheduler_steps: int = setting(
        8, "greedy decode steps run back to back between two schedules when every running "
        "request decodes greedily (no logprobs, penalties or grammar) and none waits: the "
        "per-step Python runs once for all of them (vLLM's --num-scheduler-steps; 1: off)",
        kind="int")

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "long_context_threshold",
                     "num_scheduler_steps"):
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
class OffloadConfig:
    """Tiers below the paged pool for the prefix cache's blocks (kvcache/tiers.py)."""

    cpu_offload_memory: str | int | None = setting(
        None, "host RAM for cached K/V blocks the device pool evicts, e.g. 4GiB: a prefix hit "
        "there is copied back instead of recomputed when the measured costs say it is faster; "
        "swapped-out blocks share it (default: none, evicted blocks are gone)", kind="size")
    disk_offload_dir: str | None = setting(
        None, "directory for cached K/V blocks the host tier pushes out (needs "
        "--cpu-offload-memory); what an earlier process left there is reused at start-up")
    disk_offload_size: str | int = setting("16GiB", "most bytes the disk tier may hold",
                                           kind="size")
    redis_url: str | None = setting(
        None, "a Redis server that several kvserve processes share as the lowest tier, e.g. "
        "redis://127.0.0.1:6379/0 (needs --cpu-offload-memory; blocks are put there when "
        "cached, read back through the host tier; Redis's maxmemory policy evicts)")

    def __post_init__(self) -> None:
        if self.cpu_offload_memory is not None:
            parse_size(self.cpu_offload_memory, "cpu_offload_memory")
        parse_size(self.disk_offload_size, "disk_offload_size")
        if self.redis_url is not None and (self.cpu_offload_memory is None or not (
                isinstance(self.redis_url, str) and self.redis_url.startswith(
                    ("redis://", "rediss://", "unix://")))):
            raise ConfigError("redis_url must be a redis://, rediss:// or unix:// URL and "
                              "needs cpu_offload_memory (blocks come back up through the host "
                              f"tier), got {self.redis_url!r}")
        if self.disk_offload_dir is not None:
            if self.cpu_offload_memory is None:
                raise ConfigError("disk_offload_dir needs cpu_offload_memory: blocks reach the "
                                  "disk through the host tier and come back up through it")
            if not isinstance(self.disk_offload_dir, str) or not self.disk_offload_dir:
                raise ConfigError(f"disk_offload_dir must be a directory path, "
                                  f"got {self.disk_offload_dir!r}")

    @property
    def cpu_offload_bytes(self) -> int:
        return 0 if self.cpu_offload_memory is None else parse_size(self.cpu_offload_memory,
                                                                    "cpu_offload_memory")

    @property
    def disk_offload_bytes(self) -> int:
        return parse_size(self.disk_offload_size, "disk_offload_size")

    @property
    def enabled(self) -> bool:
        return self.cpu_offload_memory is not None


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = setting(None, "GGUF file or Hugging Face folder (default: the embedded "
                                "SmolLM2-135M-Instruct)")
    dtype: str = setting("float32", "weights and compute dtype", choices=DTYPES)
    device: str = setting("cpu", "cpu, cuda or cuda:N")
    quantization: str = setting(
        "auto", "weights' format in memory: gguf: a GGUF file's quantized matrices (Q8_0, Q4_0, "
        "Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) kept quantized and multiplied so (other tensors "
        "dequantized); int8, int4: every matrix of any checkpoint quantized at load per block "
        "of 32 inputs (int8: scale = max|x| / 127; int4: scale and min, 16 levels, the embedding "
        "and LM head at int8); none: every "
        "tensor dequantized to --dtype (the exact reference path); auto: gguf for a GGUF file "
        "on cpu with dtype float32, else none. gguf, int8 and int4 run on cpu with dtype "
        "float32", choices=QUANTIZATIONS)
    seed: int = setting(0, "seed of unseeded sampling", kind="int", flag=False)
    chat_template: str | None = setting(
        None, "a Jinja chat template file used instead of the model's own (for chat requests "
        "and --chat)")
    threads: int | None = setting(
        None, "CPU threads for the model's matrix products and kvserve's C kernels (llama.cpp's "
        "-t); default: torch's (OMP_NUM_THREADS, else one per core). Process-wide", kind="int")
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)

    @classmethod
    def create(cls, **settings: Any) -> EngineConfig:
        """From the flat engine settings every command and LLM(...) share (see
        engine_settings()); an unknown name is a ConfigError naming it."""
        parts: dict[type, dict[str, Any]] = {cls: {}, CacheConfig: {}, SchedulerConfig: {},
                                             OffloadConfig: {}}
        owners = {s.name: s.owner for s in engine_settings()}
        for name, value in settings.items():
            if name not in owners:
                raise ConfigError(f"unknown engine setting {name!r}")
            parts[owners[name]][name] = value
        return cls(**parts[cls], cache=CacheConfig(**parts[CacheConfig]),
                   scheduler=SchedulerConfig(**parts[SchedulerConfig]),
                   offload=OffloadConfig(**parts[OffloadConfig]))

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.threads is not None and not (
                isinstance(self.threads, int) and not isinstance(self.threads, bool)
                and 1 <= self.threads <= MAX_THREADS):
            raise ConfigError(f"threads must be an integer in [1, {MAX_THREADS}], got "
                              f"{self.threads!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got "
                              f"{self.quantization!r}")
        if self.quantization in ("gguf", "int8", "int4") and (
                self.device != "cpu" or self.dtype != "float32"):
            raise ConfigError(f"quantization '{self.quantization}' runs on cpu with dtype "
                              "float32 (the activations' dtype); use quantization 'none' "
                              "elsewhere")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.offload.enabled and (self.cache.cache_mode != "paged"
                                     or not self.cache.enable_prefix_caching):
            raise ConfigError("offload tiers (cpu_offload_memory) hold the prefix cache's "
                              "blocks: they need cache_mode 'paged' with prefix caching on")

    @property
    def resolved_quantization(self) -> str:
        """What the loader is asked for: 'auto' stays 'auto' (blocks kept if the file is a GGUF)
        only where stored blocks can run: cpu, float32."""
        if self.quantization == "auto":
            return "auto" if self.device == "cpu" and self.dtype == "float32" else "none"
        return self.quantization

    @property
    def kv_cache_dtype(self) -> str:
        """The resolved storage format of K/V ("auto" decided by the compute dtype)."""
        return self.cache.resolved_kv_cache_dtype(self.dtype)


@dataclass(frozen=True)
class EngineSetting:
    """One engine setting, read off the config dataclasses: the single declaration that the CLI
    flags, LLM(...)'s keywords and EngineConfig.create derive from."""

    name: str
    owner: type
    default: Any
    help: str
    kind: str
    choices: tuple[str, ...] | None
    normalize: Callable[[str], str] | None
    flag: bool

    @property
    def flag_name(self) -> str:
        return "--" + self.name.replace("_", "-")


def engine_settings() -> tuple[EngineSetting, ...]:
    """Every engine setting in declaration order: EngineConfig's own, then cache, scheduler,
    offload."""
    out = []
    for owner in (EngineConfig, CacheConfig, SchedulerConfig, OffloadConfig):
        for f in fields(owner):
            if "help" in f.metadata:
                m = f.metadata
                out.append(EngineSetting(f.name, owner, f.default, m["help"], m["kind"],
                                         m["choices"], m["normalize"], m["flag"]))
    return tuple(out)


@dataclass(frozen=True)
class ServerConfig:
    """`kvserve serve`: where to listen, who may call, and how much may wait."""

    host: str = "127.0.0.1"
    port: int = 8000
    # empty: no auth; else each key is its own tenant (cache salt, fair share, queue limit)
    api_keys: tuple[str, ...] = ()
    # Limits every client is held to (429 past the queues, 400 past the per-request ones).
    max_queue: int = 1024  # sequences waiting in all
    max_queue_per_tenant: int = 256  # sequences one API key may have waiting (with keys)
    max_sequences_per_request: int = 256  # prompts x n of one request
    max_logprob_entries: int = 100_000  # n x max_tokens x (top_logprobs + 1) of one request
    served_model_name: str | None = None  # None: the model's own name
    shutdown_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may finish
    # Larger request bodies are answered 413 from their headers, before a byte is parsed. None:
    # what the model needs, at least 4 MiB (ServerState.max_body_bytes).
    max_body_bytes: int | None = None
    # Sampling defaults for fields a request leaves out (server/defaults.py reads
    # --generation-config): OpenAI's when empty (temperature 1, top_p 1)
    generation_defaults: tuple[tuple[str, object], ...] = ()
    access_log: bool = True  # one line per request: status, tokens, TTFT, time (never text)

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port!r}")
        if any(not isinstance(k, str) or not k.strip() for k in self.api_keys):
            raise ConfigError("api keys must be non-empty strings")
        for name in ("max_queue", "max_queue_per_tenant", "max_sequences_per_request",
                     "max_logprob_entries"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not self.shutdown_timeout_s >= 0:
            raise ConfigError(f"shutdown_timeout must be >= 0 seconds, "
                              f"got {self.shutdown_timeout_s!r}")
        if self.max_body_bytes is not None and (not isinstance(self.max_body_bytes, int)
                                                or self.max_body_bytes <= 0):
            raise ConfigError(f"max_body_bytes must be a positive integer, "
                              f"got {self.max_body_bytes!r}")


CLUSTER_ROUTERS = ("cache-aware", "pow2", "round-robin")


@dataclass(frozen=True)
class ClusterConfig:
    """`kvserve serve --replicas N`: engine replicas as a Ray Serve deployment behind one
    ingress, and how requests are placed on them."""

    replicas: int = 2
    ray_address: str | None = None  # None: start a local Ray instance
    router: str = "cache-aware"  # or Ray Serve's "pow2", or "round-robin"
    # the cache-aware router sends a request where its prefix is unless that replica has more
    # than this many requests in flight beyond the least busy one (then: the least busy)
    max_imbalance: int = 4
    replica_cpus: float = 1.0  # Ray CPUs each replica reserves (and its torch threads)
    stats_period_s: float = 0.25  # how often replicas report their cached blocks
    max_ongoing_per_replica: int = 256  # Ray Serve's cap on one replica's requests in flight

    def __post_init__(self) -> None:
        if not isinstance(self.replicas, int) or isinstance(self.replicas, bool) \
                or not 1 <= self.replicas <= 1024:
            raise ConfigError(f"replicas must be an integer in [1, 1024], got {self.replicas!r}")
        if self.router not in CLUSTER_ROUTERS:
            raise ConfigError(f"router must be one of {', '.join(CLUSTER_ROUTERS)}, "
                              f"got {self.router!r}")
        if not isinstance(self.max_imbalance, int) or self.max_imbalance < 0:
            raise ConfigError(f"max_imbalance must be an integer >= 0, "
                              f"got {self.max_imbalance!r}")
        if not self.replica_cpus >= 0:
            raise ConfigError(f"replica_cpus must be >= 0, got {self.replica_cpus!r}")
        if not self.stats_period_s > 0:
            raise ConfigError(f"stats_period_s must be > 0, got {self.stats_period_s!r}")
        if not isinstance(self.max_ongoing_per_replica, int) or self.max_ongoing_per_replica < 1:
            raise ConfigError(f"max_ongoing_per_replica must be a positive integer, "
                              f"got {self.max_ongoing_per_replica!r}")
