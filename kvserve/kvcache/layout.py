"""KVLayout: the one memory formula. Shape and bytes of K/V per token, per block and per budget.

The pool sizes itself with it, the storage allocates tensors of its shapes, and the planner reports
its numbers; a test checks the formula against the bytes of tensors actually allocated. No torch.

KV formats are the plain float dtypes and four quantized ones. A quantized format stores each
element in fewer bits plus scales; the scales are part of the bill:
- fp8_e4m3, fp8_e5m2: FP8, one float32 scale per layer for K and one for V (per tensor, as vLLM
  does): no per-token overhead, 8 bytes per layer in all;
- int8: symmetric, one float32 scale per token per KV head (per head vector);
- int4: asymmetric, an fp16 scale and an fp16 zero point per group of 32 elements (KIVI-style).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvserve.config import ModelSpec
from kvserve.errors import ConfigError
from kvserve.kv_dtypes import KV_CACHE_DTYPES, canonical_kv_dtype


@dataclass(frozen=True)
class KVFormat:
    name: str
    bits: int  # per stored element
    scale_group: str | int | None  # None: no scales; "tensor": per layer; "head": per head
    # vector of each token; an int: per that many elements
    scale_bytes: int = 0  # bytes of one group's scale (and zero point)
    description: str = ""

    def bytes_per_head_vector(self, head_dim: int) -> int:
        """One token's K (or V) for one KV head, scales included."""
        if self.scale_group == "head":
            num_groups = 1
        elif isinstance(self.scale_group, int):
            num_groups = -(-head_dim // self.scale_group)
        else:
            num_groups = 0
        return -(-head_dim * self.bits // 8) + num_groups * self.scale_bytes


KV_FORMATS: dict[str, KVFormat] = {f.name: f for f in (
    KVFormat("float32", 32, None, description="IEEE float32"),
    KVFormat("bfloat16", 16, None, description="bfloat16"),
    KVFormat("float16", 16, None, description="IEEE float16"),
    KVFormat("fp8_e4m3", 8, "tensor", 4, "FP8 E4M3, one float32 scale per layer for K and for V"),
    KVFormat("fp8_e5m2", 8, "tensor", 4, "FP8 E5M2, one float32 scale per layer for K and for V"),
    KVFormat("int8", 8, "head", 4, "int8, one float32 scale per token per KV head"),
    KVFormat("int4", 4, 32, 4, "int4, fp16 scale + zero point per 32 elements"),
)}
assert set(KV_FORMATS) == set(KV_CACHE_DTYPES) - {"auto"}, "kv_dtypes and layout list other formats"
# The short names tables show, in their order (fp8_e5m2 costs what fp8_e4m3 costs: no own row).
KV_FORMAT_SHORT_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16",
                         "fp8_e4m3": "fp8", "int8": "int8", "int4": "int4"}


def short_kv_dtype(name: str) -> str:
    """The name tables show: 'float16' -> 'fp16', 'fp8_e4m3' -> 'fp8'."""
    key = canonical_kv_dtype(name)
    return KV_FORMAT_SHORT_NAMES.get(key, key)


def kv_format(name: str) -> KVFormat:
    """The format for a dtype name ('fp16', 'bfloat16', 'int4', ...); ConfigError if unknown."""
    key = canonical_kv_dtype(name)
    if key == "auto":
        raise ConfigError("kv_cache_dtype 'auto' must be resolved (resolve_kv_cache_dtype) "
                          "before it has a format")
    return KV_FORMATS[key]


@dataclass(frozen=True)
class KVLayout:
    spec: ModelSpec
    block_size: int  # tokens per block
    kv_cache_dtype: str  # a KV_FORMATS name or alias: "float32", "bf16", "fp8", "int4", ...

    def __post_init__(self) -> None:
        kv_format(self.kv_cache_dtype)

    @property
    def format(self) -> KVFormat:
        return kv_format(self.kv_cache_dtype)

    @property
    def bytes_per_token_per_layer(self) -> int:
        """K and V of one token in one layer: 2 x kv_heads x (head_dim x bytes + scales)."""
        return 2 * self.spec.num_kv_heads * self.format.bytes_per_head_vector(self.spec.head_dim)

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_token_per_layer * self.spec.num_layers

    @property
    def fixed_bytes(self) -> int:
        """Bytes that do not grow with tokens: per-tensor scales (fp8)."""
        f = self.format
        return 2 * self.spec.num_layers * f.scale_bytes if f.scale_group == "tensor" else 0

    @property
    def bytes_per_block(self) -> int:
        """K and V of one block across every layer (a block id names the same slots in each)."""
        return self.bytes_per_token * self.block_size

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """Shape of one block of K (or V) in one layer: [block_size, num_kv_heads, head_dim]."""
        return (self.block_size, self.spec.num_kv_heads, self.spec.head_dim)

    def num_blocks_for_bytes(self, num_bytes: int) -> int:
        return max(0, num_bytes - self.fixed_bytes) // self.bytes_per_block

    def num_blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
