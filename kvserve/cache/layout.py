"""KVLayout: the one memory formula. Shape and bytes of K/V per token, per block and per budget.

The pool sizes itself with it, the storage allocates tensors of its shapes, and the planner reports
its numbers; a test checks the formula against the bytes of tensors actually allocated. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvserve.config import ModelSpec
from kvserve.errors import ConfigError

BYTES_PER_ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class KVLayout:
    spec: ModelSpec
    block_size: int  # tokens per block
    kv_dtype: str  # "float32", "bfloat16" or "float16"

    def __post_init__(self) -> None:
        if self.kv_dtype not in BYTES_PER_ELEMENT:
            raise ConfigError(f"unknown KV dtype {self.kv_dtype!r}")

    @property
    def bytes_per_element(self) -> int:
        return BYTES_PER_ELEMENT[self.kv_dtype]

    @property
    def bytes_per_token_per_layer(self) -> int:
        """K and V of one token in one layer: 2 x kv_heads x head_dim x bytes."""
        return 2 * self.spec.num_kv_heads * self.spec.head_dim * self.bytes_per_element

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_token_per_layer * self.spec.num_layers

    @property
    def bytes_per_block(self) -> int:
        """K and V of one block across every layer (a block id names the same slots in each)."""
        return self.bytes_per_token * self.block_size

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """Shape of one block of K (or V) in one layer: [block_size, num_kv_heads, head_dim]."""
        return (self.block_size, self.spec.num_kv_heads, self.spec.head_dim)

    def num_blocks_for_bytes(self, num_bytes: int) -> int:
        return num_bytes // self.bytes_per_block

    def num_blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
