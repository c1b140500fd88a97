"""KVLayout: the one memory formula. Shape and bytes of K/V per token, per block and per budget.

The pool sizes itself with it, the storage allocates tensors of its shapes, and the planner reports
its numbers; a test checks the formula against the bytes of tensors actually allocated. No torch.

KV formats are the plain float dtypes and three quantized ones. A quantized format stores each
element in fewer bits plus scales; the scales are part of the bill:
- fp8: FP8 E4M3, one float32 scale per layer for K and one for V (per tensor, as vLLM does):
  no per-token overhead, 8 bytes per layer in all;
- int8: symmetric, one fp16 scale per token per KV head (per head vector);
- int4: asymmetric, an fp16 scale and an fp16 zero point per group of 32 elements (KIVI-style).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvserve.config import ModelSpec
from kvserve.errors import ConfigError


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
    KVFormat("fp8", 8, "tensor", 4, "FP8 E4M3, one float32 scale per layer for K and for V"),
    KVFormat("int8", 8, "head", 2, "int8, one fp16 scale per token per KV head"),
    KVFormat("int4", 4, 32, 4, "int4, fp16 scale + zero point per 32 elements"),
)}
KV_FORMAT_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16",
                     "f16": "float16", "half": "float16", "fp8_e4m3": "fp8", "q8": "int8",
                     "q4": "int4"}
# The short names people type, in the order tables show them.
KV_FORMAT_SHORT_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "fp8": "fp8",
                         "int8": "int8", "int4": "int4"}


def kv_format(name: str) -> KVFormat:
    """The format for a dtype name ('fp16', 'bfloat16', 'int4', ...); ConfigError if unknown."""
    key = KV_FORMAT_ALIASES.get(str(name).lower(), str(name).lower())
    if key not in KV_FORMATS:
        names = ", ".join(KV_FORMAT_SHORT_NAMES.values())
        raise ConfigError(f"unknown KV dtype {name!r} (one of {names})")
    return KV_FORMATS[key]


@dataclass(frozen=True)
class KVLayout:
    spec: ModelSpec
    block_size: int  # tokens per block
    kv_dtype: str  # a KV_FORMATS name or alias: "float32", "bf16", "fp8", "int4", ...

    def __post_init__(self) -> None:
        kv_format(self.kv_dtype)

    @property
    def format(self) -> KVFormat:
        return kv_format(self.kv_dtype)

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
