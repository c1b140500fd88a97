"""KVLayout: the one memory formula. Shape and bytes of K/V per token, per block and per budget.

The pool sizes itself with it, the storage allocates tensors of its shapes, and the planner reports
its numbers; a test checks the formula against the bytes of tensors actually allocated. No torch.

KV formats are the plain float dtypes and four quantized ones. A quantized format stores each
element in fewer bits plus scales; the scales are part of the bill:
- fp8_e4m3, fp8_e5m2: FP8, one float32 scale per layer for K and one for V (per tensor, as vLLM
  does): no per-token overhead, 8 bytes per layer in all;
- int8, int4 (KIVI's rules, asymmetric, fp16 scale and fp16 zero point; int4 two codes per
  byte): K per channel over each block's tokens (one scale and zero per channel per block), V per
  token in groups of 32 channels. A block is quantized when it fills.
- The residual window (KIVI's): a quantized side keeps each running sequence's most recent
  `window_tokens` (whole blocks) and its partial block in float32 as well, and that sequence's
  own attention reads them there; int8/int4 keep at least the partial block (its codes do not
  exist until it fills). The windows are priced as fixed bytes for `residual_seqs` sequences.
K and V may use different formats (a name "int8/int4": K's, then V's).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvserve.config import ModelSpec
from kvserve.errors import ConfigError
from kvserve.kv_dtypes import KV_CACHE_DTYPES, canonical_kv_dtype, kv_dtype_pair, split_kv_dtype
from kvserve.kvcache.groups import KVGroups, single_group

RESIDUAL_BYTES = 4  # the residual window's tokens are float32
INT4_V_GROUP = 32  # channels per scale of int8/int4 V (a whole head of another head_dim)


def int4_v_group(head_dim: int) -> int:
    return INT4_V_GROUP if head_dim % INT4_V_GROUP == 0 else head_dim


@dataclass(frozen=True)
class KVFormat:
    name: str
    bits: int  # per stored element
    scale_group: str | None  # None: no scales; "tensor": per layer; "block": per channel per
    # block (K), per 32 channels per token (V)
    scale_bytes: int = 0  # bytes of one group's scale (and zero point)
    description: str = ""

    @property
    def residual(self) -> bool:
        """Quantized a block at a time: a sequence's partial block waits in float32."""
        return self.scale_group == "block"

    @property
    def quantized(self) -> bool:
        return self.scale_group is not None

    def window_blocks(self, window_tokens: int, block_size: int) -> int:
        """Blocks of a sequence's residual window in this format: the window's whole blocks and
        the partial one (int8/int4 always hold the partial block; float formats none)."""
        if self.residual or (self.quantized and window_tokens > 0):
            return window_tokens // block_size + 1
        return 0

    def bytes_per_block_head(self, head_dim: int, block_size: int, which: int) -> int:
        """One block's K (which=0) or V (1) for one KV head, scales included."""
        codes = -(-block_size * head_dim * self.bits // 8)
        if self.scale_group == "block":
            if which == 0:  # a scale and zero per channel of the block
                return codes + head_dim * self.scale_bytes
            return codes + block_size * (head_dim // int4_v_group(head_dim)) * self.scale_bytes
        return codes


KV_FORMATS: dict[str, KVFormat] = {f.name: f for f in (
    KVFormat("float32", 32, None, description="IEEE float32"),
    KVFormat("bfloat16", 16, None, description="bfloat16"),
    KVFormat("float16", 16, None, description="IEEE float16"),
    KVFormat("fp8_e4m3", 8, "tensor", 4, "FP8 E4M3, one float32 scale per layer for K and for V"),
    KVFormat("fp8_e5m2", 8, "tensor", 4, "FP8 E5M2, one float32 scale per layer for K and for V"),
    KVFormat("int8", 8, "block", 4, "int8, fp16 scale + zero point: K per channel per block, "
             "V per 32 channels per token; the partial block in float32"),
    KVFormat("int4", 4, "block", 4, "int4, fp16 scale + zero point: K per channel per block, "
             "V per 32 channels per token; the partial block in float32"),
)}
assert set(KV_FORMATS) == set(KV_CACHE_DTYPES) - {"auto"}, "kv_dtypes and layout list other formats"
# The short names tables show, in their order (fp8_e5m2 costs what fp8_e4m3 costs: no own row).
KV_FORMAT_SHORT_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16",
                         "fp8_e4m3": "fp8", "int8": "int8", "int4": "int4"}


def short_kv_dtype(name: str) -> str:
    """The name tables show: 'float16' -> 'fp16', 'fp8_e4m3' -> 'fp8', 'int8/int4' stays."""
    k, v = split_kv_dtype(name)
    return kv_dtype_pair(KV_FORMAT_SHORT_NAMES.get(k, k), KV_FORMAT_SHORT_NAMES.get(v, v))


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
    kv_cache_dtype: str  # a KV_FORMATS name or alias ("float32", "bf16", "int4", ...), or K's
    # and V's as kv_dtypes.kv_dtype_pair names them ("int8/int4")
    residual_seqs: int = 0  # sequences holding a residual window at once (quantized K or V)
    window_tokens: int = 0  # the residual window's whole-block tokens (a multiple of block_size)
    groups: KVGroups | None = None  # a block table per group of layers (None: one, of all)

    def __post_init__(self) -> None:
        for name in split_kv_dtype(self.kv_cache_dtype):
            kv_format(name)
        if self.window_tokens < 0 or self.window_tokens % self.block_size:
            raise ConfigError(f"the residual window ({self.window_tokens} tokens) must be a "
                              f"multiple of the block size ({self.block_size})")
        if self.groups is not None and self.groups.num_layers != self.spec.num_layers:
            raise ConfigError(f"KV groups cover {self.groups.num_layers} layers; the model has "
                              f"{self.spec.num_layers}")

    @property
    def k_format(self) -> KVFormat:
        return kv_format(split_kv_dtype(self.kv_cache_dtype)[0])

    @property
    def v_format(self) -> KVFormat:
        return kv_format(split_kv_dtype(self.kv_cache_dtype)[1])

    @property
    def formats(self) -> tuple[KVFormat, KVFormat]:
        return self.k_format, self.v_format

    @property
    def name(self) -> str:
        """The canonical name: 'float32', or 'int8/int4' when K's and V's formats differ."""
        return kv_dtype_pair(self.k_format.name, self.v_format.name)

    @property
    def format(self) -> KVFormat:
        """The one format of K and V (ConfigError when they differ: ask k_format/v_format)."""
        if self.k_format != self.v_format:
            raise ConfigError(f"K and V are stored in different formats ({self.name})")
        return self.k_format

    @property
    def bytes_per_block_per_layer(self) -> int:
        """K and V of one block in one layer, scales included."""
        s = self.spec
        return s.num_kv_heads * sum(f.bytes_per_block_head(s.head_dim, self.block_size, which)
                                    for which, f in enumerate(self.formats))

    @property
    def bytes_per_token_per_layer(self) -> int:
        """K and V of one token in one layer: 2 x kv_heads x (head_dim x bytes + scales); a
        per-block scale (int4 K) is shared by the block's tokens (rounded up)."""
        return -(-self.bytes_per_block_per_layer // self.block_size)

    @property
    def bytes_per_token(self) -> int:
        return -(-self.bytes_per_block // self.block_size)

    @property
    def window_blocks(self) -> tuple[int, int]:
        """K's and V's residual window in blocks (0: that side has none)."""
        return tuple(f.window_blocks(self.window_tokens, self.block_size)  # type: ignore
                     for f in self.formats)

    @property
    def residual_bytes_per_seq(self) -> int:
        """One sequence's residual window: its blocks of float32 K (V) in every layer, for each
        quantized side."""
        s = self.spec
        rows = sum(self.window_blocks) * self.block_size
        return rows * s.num_layers * s.num_kv_heads * s.head_dim * RESIDUAL_BYTES

    @property
    def fixed_bytes(self) -> int:
        """Bytes that do not grow with tokens: per-tensor scales (fp8), and the residual windows
        of residual_seqs sequences."""
        tensor = [f.scale_bytes for f in self.formats if f.scale_group == "tensor"]
        scales = 2 * self.spec.num_layers * tensor[0] if tensor else 0  # K's and V's, per layer
        return scales + self.residual_seqs * self.residual_bytes_per_seq

    @property
    def bytes_per_block(self) -> int:
        """K and V of one block of tokens across every layer."""
        return self.bytes_per_block_per_layer * self.spec.num_layers

    @property
    def kv_groups(self) -> KVGroups:
        return self.groups or single_group(self.spec.num_layers)

    @property
    def page_layers(self) -> int:
        """Layers one pool block holds: every layer with one table; a group's with several
        (kvcache/groups.py)."""
        return self.kv_groups.page_layers

    @property
    def bytes_per_page(self) -> int:
        """One pool block: a block of tokens' K and V in page_layers layers (bytes_per_block
        when there is one table)."""
        return self.bytes_per_block_per_layer * self.page_layers

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """Shape of one block of K (or V) in one layer: [block_size, num_kv_heads, head_dim]."""
        return (self.block_size, self.spec.num_kv_heads, self.spec.head_dim)

    def num_blocks_for_bytes(self, num_bytes: int) -> int:
        return max(0, num_bytes - self.fixed_bytes) // self.bytes_per_page

    def num_blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
