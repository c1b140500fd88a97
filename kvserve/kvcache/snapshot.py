"""The immutable picture of the KV cache that --stats, /metrics and the labs read.

The engine assembles one from the block manager (pool, tables, prefix index, event counts) and
the runner's byte counts; nobody reads the live bookkeeping objects for reporting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvserve.kvcache.tiers import TierSnapshot


@dataclass(frozen=True)
class PoolSnapshot:
    block_size: int
    num_blocks: int
    num_used_blocks: int
    peak_used_blocks: int
    # the share of the model's layers one block holds: 1, or with a table per KV group its
    # group's layers over all layers (kvcache/groups.py)
    layer_share: float = 1.0

    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks - self.num_used_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks


@dataclass(frozen=True)
class PrefixSnapshot:
    num_queried_tokens: int
    num_hit_tokens: int
    num_cached_blocks: int
    num_evictions: int

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0


@dataclass(frozen=True)
class EventCounts:
    num_stored: int = 0
    num_evicted: int = 0
    num_freed: int = 0
    num_dropped: int = 0  # emitted but pushed out of the log before a consumer drained them


@dataclass(frozen=True)
class RequestBlocks:
    request_id: str
    num_tokens: int  # tokens whose K/V are computed
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class KVQuality:
    """How much a KV format changed the model's predictions on a text (engine/kv_quality.py
    measures it; the start-up guardrail judges it)."""

    kv_cache_dtype: str
    reference: str  # the format it was compared with
    num_predictions: int  # positions compared (each predicts the next token)
    mean_kl: float  # mean KL(reference || format) of the next-token distributions, nats
    top1_agreement: float  # fraction of positions whose most likely next token is the same
    nll_reference: float  # mean negative log-likelihood of the text's next tokens, reference
    nll: float  # the same in the format under test

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def perplexity_reference(self) -> float:
        return math.exp(self.nll_reference)

    def to_dict(self) -> dict:
        return {"kv_cache_dtype": self.kv_cache_dtype, "reference": self.reference,
                "num_predictions": self.num_predictions, "mean_kl": self.mean_kl,
                "top1_agreement": self.top1_agreement, "perplexity": self.perplexity,
                "perplexity_reference": self.perplexity_reference}


@dataclass(frozen=True)
class CacheSnapshot:
    cache_mode: str  # none | contiguous | paged
    kv_cache_dtype: str  # the resolved storage format ("auto" already decided)
    retention: str  # the retention policy's name
    bytes_per_token: int
    num_bytes_allocated: int
    peak_bytes_allocated: int
    # Computed tokens of live requests, swapped-out ones included, a shared prefix block counted
    # once per request that holds it (so paged waste is clamped at 0)
    num_tokens_stored: int
    num_preemptions: int
    pool: PoolSnapshot | None = None  # paged only
    prefix: PrefixSnapshot | None = None  # paged with prefix caching only
    events: EventCounts = EventCounts()
    requests: tuple[RequestBlocks, ...] = ()
    quant_check: KVQuality | None = None  # the start-up guardrail's measure (quantized formats)
    tiers: tuple[TierSnapshot, ...] = ()  # the prefix cache's tiers below the pool (offload)

    @property
    def bytes_per_block(self) -> int:
        """One pool block: block_size tokens' K/V in the layers a block holds (every layer, or
        with a table per KV group one group's); 0 unless paged."""
        if self.pool is None:
            return 0
        return round(self.pool.block_size * self.bytes_per_token * self.pool.layer_share)

    @property
    def num_bytes_used(self) -> int:
        """Bytes of K/V slots in use: whole blocks when paged, stored tokens otherwise."""
        if self.pool is None:
            return self.num_tokens_stored * self.bytes_per_token
        return self.pool.num_used_blocks * self.bytes_per_block

    @property
    def num_waste_bytes(self) -> int:
        """Allocated block slots that hold no token (paged); 0 for the other modes."""
        if self.pool is None:
            return 0
        return max(0, self.num_bytes_used - self.num_tokens_stored * self.bytes_per_token)

    @property
    def waste_fraction(self) -> float:
        used = self.num_bytes_used
        return self.num_waste_bytes / used if used and self.pool is not None else 0.0

    def blocks_of(self, request_id: str) -> tuple[int, ...]:
        for r in self.requests:
            if r.request_id == request_id:
                return r.block_ids
        return ()
