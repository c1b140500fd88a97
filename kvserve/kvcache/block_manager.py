"""Per-request block tables: the only writer of which physical blocks a request's tokens live in.

A request's token at position p lives in block table[p // block_size], slot p % block_size. Tables
grow a block at a time as tokens arrive (all or nothing per call) and are released whole when a
request finishes, is aborted or is preempted. Under a window or sinks policy (kvcache/policy.py)
the run of blocks no layer reads any more is released mid-sequence: their table entries become
HOLE, so positions keep their indices. With a PrefixIndex, a new request's table starts
with the cached blocks its prompt begins with (shared by reference count), every block a request
fills is offered to the index, and a block the pool hands out again is forgotten by the index.

Only full blocks are ever shared, and a request writes only slots at or past its computed count,
which lie past every block it was given from the index (at least its last prompt token is always
computed): no sequence ever writes into a block another can read, so no copy-on-write is needed.
No torch.
"""

from __future__ import annotations

from collections import Counter

from kvserve.kvcache.block_pool import BlockPool
from kvserve.kvcache.events import BlockEvent, BlockEventKind, EventLog
from kvserve.kvcache.policy import FullHistory, RetentionPolicy
from kvserve.kvcache.prefix_index import PrefixIndex, chain_keys, root_key
from kvserve.kvcache.snapshot import EventCounts, PoolSnapshot, PrefixSnapshot, RequestBlocks
from kvserve.kvcache.tiers import LowerTiers, TierBlock, TierOps
from kvserve.request import Request

HOLE = -1  # a released block's place in a table: no layer reads its tokens any more


class BlockManager:
    def __init__(self, pool: BlockPool, block_size: int, prefix_index: PrefixIndex | None = None,
                 model_key: str = "", policy: RetentionPolicy | None = None,
                 lower: LowerTiers | None = None):
        self.pool = pool
        self.block_size = block_size
        self.tables: dict[str, list[int]] = {}
        self.prefix_index = prefix_index  # None: prefix caching off
        # One log for the index's stored/evicted events and the pool's freed ones.
        self.events = prefix_index.events if prefix_index is not None else EventLog()
        self.model_key = model_key  # the model identity every block key starts from
        self.policy: RetentionPolicy = policy or FullHistory()
        self.num_indexed: dict[str, int] = {}  # request id -> leading blocks offered to the index
        self.holes: dict[str, range] = {}  # request id -> the run of its table that is HOLE
        self.parked_holes: dict[str, range] = {}  # the same, for requests swapped out
        # Tiers below the pool (prefix caching only): evicted cached blocks move down, hits
        # there come back up.
        self.lower = lower if prefix_index is not None else None

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def most_blocks_held(self, num_tokens: int, step_tokens: int) -> int:
        """The most blocks a sequence of num_tokens tokens holds at once: every one of them
        under full history; under a sliding window, at most its window's keys' and one step's
        (of up to step_tokens) new tokens', however long it grows."""
        return self.num_blocks_for(
            self.policy.most_tokens_held(num_tokens, step_tokens, self.block_size))

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
        index = self.prefix_index
        if index is not None:
            for b in block_ids:
                key = index.key_of_block(b)
                if key is not None and self.lower is not None:
                    cached = index.index[key]
                    self.lower.offload(b, key, TierBlock(cached.token_ids, cached.tenant))
                index.evict(b)
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
        if self.prefix_index is None:
            return 0
        assert r.request_id not in self.tables, f"{r.request_id} already has blocks"
        bs = self.block_size
        max_blocks = (r.num_tokens - 1) // bs
        self._extend_keys(r, max_blocks * bs)
        hits = self.prefix_index.lookup(r.block_keys[:max_blocks],
                                 r.token_ids_between(0, max_blocks * bs), bs)
        self.pool.incref(hits)  # a hit on a free block takes it back out of the free queue
        self.tables[r.request_id] = list(hits)
        if self.lower is not None:
            if len(hits) < max_blocks:
                hits = hits + self._fetch_from_lower(r, len(hits), max_blocks)
            self.lower.unpin(r.request_id)  # what it waited for is on the device now
        self.num_indexed[r.request_id] = len(hits)
        # Under a window, hits before it are read by no layer: back to the pool (still cached)
        # now, before this step's blocks are counted against it.
        self._release(r.request_id, len(hits) * bs)
        return len(hits) * bs

    def _fetch_from_lower(self, r: Request, first: int, max_blocks: int) -> list[int]:
        """Device blocks for the run of r's blocks [first, max_blocks) that a lower tier holds
        and the cost model says to fetch (as many as the pool has free blocks for), indexed at
        once: their K/V arrive before this step's forward."""
        bs = self.block_size
        keys = r.block_keys[first:max_blocks]
        found = self.lower.match(keys, r.token_ids_between(first * bs, max_blocks * bs), first * bs)
        found = found[:self.pool.num_free_blocks]
        if not found:
            return []
        block_ids = self.allocate_blocks(len(found))
        self.tables[r.request_id].extend(block_ids)
        for key, block_id, block in zip(keys, block_ids, found):
            self.prefix_index.insert(key, block_id, block.token_ids, block.tenant)
        self.lower.fetch_run(r.request_id, list(zip(block_ids, keys)), first * bs)
        return block_ids

    def must_wait(self, r: Request) -> bool:
        """Whether r, not yet admitted, should wait for blocks loading from a tier below the
        host (reads of a disk hit past its device and host hits, or of Redis, start here)."""
        if (self.lower is None or (self.lower.disk is None and not self.lower.redis)
                or r.request_id in self.tables
                or r.num_computed_tokens or r.params.prompt_logprobs is not None):
            return False
        bs = self.block_size
        max_blocks = (r.num_tokens - 1) // bs
        self._extend_keys(r, max_blocks * bs)
        first = len(self.prefix_index.lookup(r.block_keys[:max_blocks],
                                             r.token_ids_between(0, max_blocks * bs), bs))
        return self.lower.prefetch(r.request_id, r.block_keys[first:max_blocks],
                                   r.token_ids_between(first * bs, max_blocks * bs), first * bs)

    def evict_cached(self) -> int:
        """Every cached block no request holds leaves the pool's index now, copied down to the
        tiers below (as if the pool had handed it out again); returns how many."""
        index = self.prefix_index
        if index is None:
            return 0
        evicted = [b for b in self.pool.free_queue if index.key_of_block(b) is not None]
        for b in evicted:
            key = index.key_of_block(b)
            if self.lower is not None:
                cached = index.index[key]
                self.lower.offload(b, key, TierBlock(cached.token_ids, cached.tenant))
            index.evict(b)
        return len(evicted)

    def take_tier_ops(self) -> TierOps | None:
        """What the plan being built moves between the pool and the tiers below it."""
        return None if self.lower is None else self.lower.take_ops()

    def park(self, num_blocks: int) -> None:
        """num_blocks of a preempted request are swapped out to host memory (a lower host tier
        makes room for them)."""
        if self.lower is not None:
            self.lower.park(num_blocks)

    def unpark(self, num_blocks: int) -> None:
        if self.lower is not None:
            self.lower.unpark(num_blocks)

    def record_admission(self, r: Request, num_hit_tokens: int) -> None:
        """Count one admitted request's prefix lookup in the hit rate (a lookup whose admission
        failed for want of blocks is retried later and counted then, once)."""
        if self.prefix_index is not None:
            self.prefix_index.record_query(r.num_tokens, num_hit_tokens)

    def next_uncached_key(self, r: Request) -> bytes | None:
        """Key of the first full block of r's prompt that is not cached (None if there is none)."""
        if self.prefix_index is None:
            return None
        max_blocks = (r.num_tokens - 1) // self.block_size
        self._extend_keys(r, max_blocks * self.block_size)
        for key in r.block_keys[:max_blocks]:
            if key not in self.prefix_index.index:
                return key
        return None

    def cache_full_blocks(self, r: Request) -> None:
        """Offer the prefix index every block of r that its computed tokens have filled."""
        if self.prefix_index is None or r.request_id not in self.tables:
            return
        bs, table = self.block_size, self.tables[r.request_id]
        num_full = min(r.num_computed_tokens // bs, len(table))
        exact = self.policy.exact_blocks(bs)
        if exact is not None:  # later blocks' K/V depend on what this request released
            num_full = min(num_full, exact)
        first = self.num_indexed.get(r.request_id, 0)
        if num_full <= first:
            return
        self._extend_keys(r, num_full * bs)
        tokens = r.token_ids_between(first * bs, num_full * bs)
        tenant = self.events.tenant_hash(r.cache_salt)
        for i in range(first, num_full):
            offset = (i - first) * bs
            block_tokens = tokens[offset:offset + bs]
            if table[i] == HOLE:
                continue
            if self.prefix_index.insert(r.block_keys[i], table[i], block_tokens, tenant) \
                    and self.lower is not None:  # a shared tier below gets it now
                self.lower.publish(table[i], r.block_keys[i],
                                   TierBlock(tuple(block_tokens), tenant))
        self.num_indexed[r.request_id] = num_full

    def release_unread(self, r: Request) -> list[int]:
        """Under a window policy: release the request's leading blocks that no layer reads once
        its computed tokens are in (after cache_full_blocks offered them to the index, which
        keeps them while the pool does). Returns the blocks that became free."""
        return self._release(r.request_id, r.num_computed_tokens)

    def _release(self, request_id: str, num_computed: int) -> list[int]:
        table = self.tables.get(request_id)
        if table is None or isinstance(self.policy, FullHistory):
            return []
        run = self.policy.released_blocks(num_computed, self.block_size)
        held = self.holes.get(request_id, range(run.start, run.start))
        end = min(run.stop, len(table))
        if end <= held.stop:
            return []
        released = table[held.stop:end]
        table[held.stop:end] = [HOLE] * (end - held.stop)
        self.holes[request_id] = range(run.start, end)
        return self._unref(released)

    def num_tokens_released(self, request_id: str) -> int:
        return len(self.holes.get(request_id, ())) * self.block_size

    def adopt(self, request_id: str, block_ids: list[int]) -> None:
        """Give a request a table of blocks allocated elsewhere (swap-in of preempted blocks),
        after the holes it had when it was swapped out."""
        assert request_id not in self.tables, f"{request_id} already has blocks"
        holes = self.parked_holes.pop(request_id, range(0))
        table = list(block_ids)
        table[holes.start:holes.start] = [HOLE] * len(holes)
        self.tables[request_id] = table
        if holes:
            self.holes[request_id] = holes

    def block_ids(self, request_id: str) -> list[int]:
        """The request's table, HOLE where a block was released."""
        return self.tables.get(request_id, [])

    def num_blocks_held(self, request_id: str) -> int:
        return len(self.tables.get(request_id, ())) - len(self.holes.get(request_id, ()))

    def free(self, request_id: str, swap: bool = False) -> list[int]:
        """Release the request's blocks; returns the ids it held, in table order (its holes left
        out; swap: remembered, so that adopt() puts them back)."""
        if not swap:  # a swapped-out request that ends: its holes are forgotten too
            self.parked_holes.pop(request_id, None)
        holes = self.holes.pop(request_id, range(0))
        if swap and holes:
            self.parked_holes[request_id] = holes
        block_ids = [b for b in self.tables.pop(request_id, []) if b != HOLE]
        self.num_indexed.pop(request_id, None)
        if self.lower is not None:  # fetches planned for it whose K/V will not arrive now
            for b in self.lower.cancel(request_id):
                self.prefix_index.evict(b)
        # Tail first: a chain's last blocks reach the head of the free queue (evicted first)
        # before the prefix blocks that other prompts are likelier to share.
        self._unref(reversed(block_ids))
        return block_ids

    def _unref(self, block_ids) -> list[int]:
        freed = self.pool.free(block_ids)
        for b in freed:
            index = self.prefix_index
            key = index.key_of_block(b) if index is not None else None
            tenant = index.tenant_of_block(b) if key is not None else None
            self.events.emit(BlockEvent(BlockEventKind.FREED, b, key, tenant))
        return freed

    def reset_prefix_index(self) -> bool:
        """Forget every cached block (their memory stays with whoever holds it); False if
        prefix caching is off."""
        if self.prefix_index is None:
            return False
        self.prefix_index.reset()
        return True

    # -- reporting -----------------------------------------------------------------------------
    def pool_snapshot(self, peak_used_blocks: int) -> PoolSnapshot:
        return PoolSnapshot(self.block_size, self.pool.num_blocks, self.pool.num_used_blocks,
                            peak_used_blocks)

    def prefix_snapshot(self) -> PrefixSnapshot | None:
        index = self.prefix_index
        if index is None:
            return None
        return PrefixSnapshot(index.num_queried_tokens, index.num_hit_tokens,
                              index.num_cached_blocks, index.num_evictions)

    def event_counts(self) -> EventCounts:
        c = self.events.counts
        return EventCounts(c[BlockEventKind.STORED], c[BlockEventKind.EVICTED],
                           c[BlockEventKind.FREED], self.events.num_dropped)

    def request_blocks(self, requests: list[Request]) -> tuple[RequestBlocks, ...]:
        return tuple(RequestBlocks(r.request_id, r.num_computed_tokens,
                                   tuple(self.tables.get(r.request_id, ())))
                     for r in requests)

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        held = Counter(b for table in self.tables.values() for b in table if b != HOLE)
        for rid, table in self.tables.items():
            holes = self.holes.get(rid, range(0))
            assert [i for i, b in enumerate(table) if b == HOLE] == list(holes), (
                f"{rid}: its HOLEs are not the run it released")
        for b, count in held.items():
            assert self.pool.ref_counts[b] >= count, (
                f"block {b} is in {count} tables but has {self.pool.ref_counts[b]} references")
            assert b not in self.pool.free_queue, f"block {b} is in a table and free"
        assert sum(self.pool.ref_counts) == sum(held.values()), "a referenced block is in no table"
        if self.prefix_index is not None:
            self.prefix_index.check_invariants()
            # A shared block was full when shared: it lies among each holder's indexed blocks.
            for rid, table in self.tables.items():
                tail = table[self.num_indexed.get(rid, 0):]
                for b in tail:
                    if b == HOLE:
                        continue
                    assert held[b] == 1, f"{rid} may write block {b}, which others read"
