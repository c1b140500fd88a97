"""Per-request block tables: the only writer of which physical blocks a request's tokens live in.

A request's token at position p lives in block table[p // block_size], slot p % block_size. Tables
grow a block at a time as tokens arrive (all or nothing per call) and are released whole when a
request finishes, is aborted or is preempted. With a PrefixCache, a new request's table starts
with the cached blocks its prompt begins with (shared by reference count), every block a request
fills is offered to the cache, and a block the pool hands out again is forgotten by the cache.

Only full blocks are ever shared, and a request writes only slots at or past its computed count,
which lie past every block it was given from the cache (at least its last prompt token is always
computed): no sequence ever writes into a block another can read, so no copy-on-write is needed.
No torch.
"""

from __future__ import annotations

from collections import Counter

from kvserve.cache.block_pool import BlockPool
from kvserve.cache.prefix_cache import PrefixCache, chain_keys, root_key
from kvserve.request import Request


class BlockManager:
    def __init__(self, pool: BlockPool, block_size: int, prefix_cache: PrefixCache | None = None,
                 model_key: str = ""):
        self.pool = pool
        self.block_size = block_size
        self.tables: dict[str, list[int]] = {}
        self.cache = prefix_cache  # None: prefix caching off
        self.model_key = model_key  # the model identity every block key starts from
        self.num_indexed: dict[str, int] = {}  # request id -> leading blocks offered to the cache

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, request_id: str, num_tokens: int) -> int:
        """Blocks to add so that the request's table holds num_tokens tokens."""
        have = len(self.tables.get(request_id, ()))
        return max(0, self.num_blocks_for(num_tokens) - have)

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.pool.can_allocate(self.num_new_blocks(request_id, num_tokens))

    def allocate_slots(self, request_id: str, num_tokens: int) -> bool:
        """Grow the table to hold num_tokens tokens; False (and nothing taken) if blocks are short.
        """
        need = self.num_new_blocks(request_id, num_tokens)
        if not self.pool.can_allocate(need):
            return False
        self.tables.setdefault(request_id, []).extend(self.allocate_blocks(need))
        return True

    def allocate_blocks(self, num_blocks: int) -> list[int]:
        """Blocks for new K/V, least recently freed first: cached ones among them are evicted."""
        block_ids = self.pool.allocate(num_blocks)
        if self.cache is not None:
            for b in block_ids:
                self.cache.evict(b)
        return block_ids

    # -- prefix caching ------------------------------------------------------------------------
    def _extend_keys(self, r: Request, num_tokens: int) -> None:
        """Chain r.block_keys over the full blocks of its first num_tokens tokens."""
        have, bs = len(r.block_keys), self.block_size
        if have >= num_tokens // bs:
            return
        parent = r.block_keys[-1] if have else root_key((self.model_key, None, r.cache_salt))
        tokens = r.token_ids_between(have * bs, (num_tokens // bs) * bs)
        r.block_keys.extend(chain_keys(parent, tokens, bs))

    def match_prefix(self, r: Request) -> int:
        """Start the table of a request that holds no blocks with the longest cached run of its
        leading full blocks, stopping short of its last token (its logits must be computed);
        returns the tokens that need no prefill."""
        if self.cache is None:
            return 0
        assert r.request_id not in self.tables, f"{r.request_id} already has blocks"
        bs = self.block_size
        max_blocks = (r.num_tokens - 1) // bs
        self._extend_keys(r, max_blocks * bs)
        hits = self.cache.lookup(r.block_keys[:max_blocks],
                                 r.token_ids_between(0, max_blocks * bs), bs)
        self.pool.incref(hits)  # a hit on a free block takes it back out of the free queue
        self.tables[r.request_id] = list(hits)
        self.num_indexed[r.request_id] = len(hits)
        return len(hits) * bs

    def record_admission(self, r: Request, num_hit_tokens: int) -> None:
        """Count one admitted request's prefix lookup in the hit rate (a lookup whose admission
        failed for want of blocks is retried later and counted then, once)."""
        if self.cache is not None:
            self.cache.record_query(r.num_tokens, num_hit_tokens)

    def next_uncached_key(self, r: Request) -> bytes | None:
        """Key of the first full block of r's prompt that is not cached (None if there is none)."""
        if self.cache is None:
            return None
        max_blocks = (r.num_tokens - 1) // self.block_size
        self._extend_keys(r, max_blocks * self.block_size)
        for key in r.block_keys[:max_blocks]:
            if key not in self.cache.index:
                return key
        return None

    def cache_full_blocks(self, r: Request) -> None:
        """Offer the cache every block of r that its computed tokens have filled."""
        if self.cache is None or r.request_id not in self.tables:
            return
        bs, table = self.block_size, self.tables[r.request_id]
        num_full = min(r.num_computed_tokens // bs, len(table))
        first = self.num_indexed.get(r.request_id, 0)
        if num_full <= first:
            return
        self._extend_keys(r, num_full * bs)
        tokens = r.token_ids_between(first * bs, num_full * bs)
        for i in range(first, num_full):
            offset = (i - first) * bs
            self.cache.insert(r.block_keys[i], table[i], tokens[offset:offset + bs])
        self.num_indexed[r.request_id] = num_full

    def adopt(self, request_id: str, block_ids: list[int]) -> None:
        """Give a request a table of blocks allocated elsewhere (swap-in of preempted blocks)."""
        assert request_id not in self.tables, f"{request_id} already has blocks"
        self.tables[request_id] = list(block_ids)

    def block_ids(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    def num_blocks_held(self, request_id: str) -> int:
        return len(self.tables.get(request_id, ()))

    def free(self, request_id: str) -> list[int]:
        """Release the request's blocks; returns the ids it held, in table order."""
        block_ids = self.tables.pop(request_id, [])
        self.num_indexed.pop(request_id, None)
        # Tail first: a chain's last blocks reach the head of the free queue (evicted first)
        # before the prefix blocks that other prompts are likelier to share.
        self.pool.free(reversed(block_ids))
        return block_ids

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        held = Counter(b for table in self.tables.values() for b in table)
        for b, count in held.items():
            assert self.pool.ref_counts[b] >= count, (
                f"block {b} is in {count} tables but has {self.pool.ref_counts[b]} references")
            assert b not in self.pool.free_queue, f"block {b} is in a table and free"
        assert sum(self.pool.ref_counts) == sum(held.values()), "a referenced block is in no table"
        if self.cache is not None:
            self.cache.check_invariants()
            # A shared block was full when shared: it lies among each holder's indexed blocks.
            for rid, table in self.tables.items():
                tail = table[self.num_indexed.get(rid, 0):]
                for b in tail:
                    assert held[b] == 1, f"{rid} may write block {b}, which others read"
