"""The two unpaged attention backends: no cache at all, and one growing K/V tensor per sequence.

`NoCacheAttention` keeps nothing: the runner feeds every token of a sequence at every step, so K/V
for the whole prefix are recomputed each time (the quadratic baseline). `ContiguousAttention`
keeps, per sequence, one tensor [num_layers, 2, num_kv_heads, capacity, head_dim] that doubles
when full. Both implement backend.AttentionBackend; paged.py is the third.
"""

from __future__ import annotations

import torch

from kvserve.config import ModelSpec
from kvserve.kernels import cpu as cpu_kernels
from kvserve.model.attention.metadata import AttentionMetadata
from kvserve.model.attention.ops import attention_sdpa

MIN_CAPACITY_TOKENS = 64


class NoCacheAttention:
    """Attention over the step's own tokens only: each sequence is fed whole, from position 0."""

    retains_kv = False

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    def prepare(self, meta: AttentionMetadata) -> None:
        if any(s.start_position != 0 for s in meta.seqs):
            raise RuntimeError("a no-cache step must feed every sequence from position 0")

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        for s in meta.seqs:
            rows = slice(s.row_start, s.row_start + s.num_new_tokens)
            # [n, kv, d] -> [kv, n, d]: the head-major layout attention_sdpa takes
            out[rows] = attention_sdpa(q[rows], k[rows].transpose(0, 1), v[rows].transpose(0, 1),
                                       self.spec.window(layer_idx), self.spec.attn_scale,
                                       self.spec.attn_softcap)
        return out

    def fused_decode(self, meta: AttentionMetadata) -> None:
        return None  # per layer: forward()

    def fuses_decode_steps(self) -> bool:
        return False

    def fused_decode_steps(self, meta: AttentionMetadata, num_steps: int) -> None:
        return None

    def release(self, seq_id: str) -> None:
        """Nothing is held."""

    def num_bytes_allocated(self) -> int:
        return 0


class ContiguousAttention:
    """One K/V tensor per sequence; capacity doubles (copying) when a step would overflow it."""

    retains_kv = True
    use_fast_decode = True  # tests switch the C decode attention off to compare with PyTorch

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> None:
        self.spec = spec
        self.dtype = dtype
        self.device = device
        self.store: dict[str, torch.Tensor] = {}
        self.lengths: dict[str, int] = {}
        self._scores = torch.empty(0, dtype=torch.float32)  # scratch of the C decode attention

    def _ensure_capacity(self, seq_id: str, num_tokens: int) -> torch.Tensor:
        kv = self.store.get(seq_id)
        capacity = 0 if kv is None else kv.shape[3]
        if num_tokens <= capacity:
            return kv
        new_capacity = max(MIN_CAPACITY_TOKENS, capacity * 2, num_tokens)
        s = self.spec
        grown = torch.empty(  # [num_layers, 2, num_kv_heads, capacity, head_dim]
            (s.num_layers, 2, s.num_kv_heads, new_capacity, s.head_dim),
            dtype=self.dtype, device=self.device)
        if kv is not None:
            grown[:, :, :, :capacity] = kv
        self.store[seq_id] = grown
        return grown

    def prepare(self, meta: AttentionMetadata) -> None:
        for s in meta.seqs:
            if self.lengths.get(s.seq_id, 0) != s.start_position:
                raise RuntimeError(f"sequence {s.seq_id} has {self.lengths.get(s.seq_id, 0)} "
                                   f"cached tokens, step starts at {s.start_position}")
            self._ensure_capacity(s.seq_id, s.context_len)

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        last_layer = layer_idx == self.spec.num_layers - 1
        for s in meta.seqs:
            rows = slice(s.row_start, s.row_start + s.num_new_tokens)
            kv = self.store[s.seq_id][layer_idx]  # [2, num_kv_heads, capacity, head_dim]
            window = self.spec.window(layer_idx)
            if (self.use_fast_decode and s.num_new_tokens == 1 and window is None
                    and self.spec.plain_attention and cpu_kernels.decode_attention_ok(q, kv)):
                self._decode_fast(q, k, v, kv, s, out)
            else:
                self._attend(q, k, v, kv, s, out, rows, window)
            if last_layer:
                self.lengths[s.seq_id] = s.context_len
        return out

    def _decode_fast(self, q, k, v, kv, s, out) -> None:
        """Write and attend in one C call (kernels/gemv.c), for one decode token on CPU."""
        r = s.row_start
        need = q.shape[1] * s.context_len
        if self._scores.numel() < need:
            self._scores = torch.empty(max(need, 2 * self._scores.numel()), dtype=torch.float32)
        cpu_kernels.decode_attention_(q[r].contiguous(), k[r].contiguous(), v[r].contiguous(),
                                      kv[0], kv[1], s.start_position, out[r], self._scores)

    def _attend(self, q, k, v, kv, s, out, rows, window=None) -> None:
        """The PyTorch path: any number of new tokens, any device (the reference of _decode_fast).
        """
        # [0, start_position) cached | [start_position, context_len) written now
        new = slice(s.start_position, s.context_len)
        kv[0, :, new] = k[rows].transpose(0, 1)
        kv[1, :, new] = v[rows].transpose(0, 1)
        # The store may hold a narrower dtype than the activations (bf16 K/V, fp32 compute).
        keys = kv[0, :, :s.context_len].to(q.dtype)
        values = kv[1, :, :s.context_len].to(q.dtype)
        out[rows] = attention_sdpa(q[rows], keys, values, window, self.spec.attn_scale,
                                   self.spec.attn_softcap)

    def fused_decode(self, meta: AttentionMetadata) -> None:
        return None  # per layer: forward()

    def fuses_decode_steps(self) -> bool:
        return False

    def fused_decode_steps(self, meta: AttentionMetadata, num_steps: int) -> None:
        return None

    def release(self, seq_id: str) -> None:
        self.store.pop(seq_id, None)
        self.lengths.pop(seq_id, None)

    def num_bytes_allocated(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store.values())
