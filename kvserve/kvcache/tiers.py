"""Lower tiers of the prefix cache: what each holds (by block key, LRU), what a step must move
between them and the device pool, and whether a hit there is worth fetching. No torch.

Write policy: write-back on eviction. A cached block leaves the device pool only when the pool
hands it out again; it is then copied into the host tier (unless a copy is already there: the
host keeps what it sent up, so a block that goes back and forth is copied down once). A block
the host tier's LRU pushes out is dropped. Swapped-out blocks of preempted requests live in
the same host memory: they are parked there (never evicted while their request waits) and push
cached blocks out to make room.

Keys are the device pool's chained block keys, whose root carries the model identity, the KV
format and the request's cache salt: a tier can only ever answer a lookup made under the same
tenant, model and format, and it checks the block's token ids as the device index does.
The K/V bytes are the runner's (kvstore.host); this module decides and records.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvserve.kvcache.costs import Decision, PrefillRate, TransferRate, decide

BlockKey = bytes


@dataclass(frozen=True)
class TierBlock:
    token_ids: tuple[int, ...]
    tenant: str | None  # events.tenant_hash of the salt its K/V was made under


@dataclass
class TierCounters:
    num_hit_blocks: int = 0  # blocks found here past the device pool's hits
    num_fetched_blocks: int = 0  # ... brought up (the cost model chose fetch)
    num_recomputed_blocks: int = 0  # ... recomputed instead (the cost model chose recompute)
    num_fetch_decisions: int = 0
    num_recompute_decisions: int = 0
    num_stored_blocks: int = 0  # blocks copied into this tier
    num_evicted_blocks: int = 0  # blocks its LRU pushed out
    num_bytes_in: int = 0
    num_bytes_out: int = 0
    expected_saved_s: float = 0.0  # sum over fetches of expected (recompute - fetch) seconds


@dataclass(frozen=True)
class TierSnapshot:
    name: str
    capacity_blocks: int
    num_blocks: int  # cached blocks held
    num_parked_blocks: int  # swapped-out blocks of preempted requests (host tier)
    bytes_per_s: float  # the cost model's current bandwidth of this tier
    latency_s: float
    counters: TierCounters


class TierIndex:
    """One lower tier's cached blocks by key, least recently used first."""

    def __init__(self, name: str, capacity_blocks: int):
        if capacity_blocks < 0:
            raise ValueError(f"a tier's capacity cannot be negative, got {capacity_blocks}")
        self.name = name
        self.capacity_blocks = capacity_blocks
        self.entries: OrderedDict[BlockKey, TierBlock] = OrderedDict()
        self.num_parked = 0  # blocks held for swapped-out requests (never evicted)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: BlockKey) -> bool:
        return key in self.entries

    def find(self, key: BlockKey, token_ids: Sequence[int]) -> TierBlock | None:
        """The block under key if it holds exactly these tokens."""
        block = self.entries.get(key)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def touch(self, key: BlockKey) -> None:
        """Most recently used now (if still held: an offload may have pushed it out)."""
        if key in self.entries:
            self.entries.move_to_end(key)

    def insert(self, key: BlockKey, block: TierBlock) -> list[BlockKey]:
        """Hold a block (most recently used); returns the keys pushed out to make room."""
        self.entries[key] = block
        self.entries.move_to_end(key)
        return self._shrink()

    def remove(self, key: BlockKey) -> None:
        self.entries.pop(key, None)

    def park(self, num_blocks: int) -> list[BlockKey]:
        """Room for swapped-out blocks: cached blocks pushed out as needed (returned)."""
        self.num_parked += num_blocks
        return self._shrink()

    def unpark(self, num_blocks: int) -> None:
        self.num_parked = max(0, self.num_parked - num_blocks)

    def _shrink(self) -> list[BlockKey]:
        out = []
        while self.entries and len(self.entries) + self.num_parked > self.capacity_blocks:
            out.append(self.entries.popitem(last=False)[0])
        return out


@dataclass
class _Pending:
    """What this plan moves: device blocks read into the host tier, host copies written into
    device blocks (for whom), and host copies to forget once the plan's copies are done."""

    offloads: list[tuple[int, BlockKey]] = field(default_factory=list)
    fetches: list[tuple[int, BlockKey, str]] = field(default_factory=list)
    drops: dict[BlockKey, None] = field(default_factory=dict)
    runs: dict[str, tuple[int, int]] = field(default_factory=dict)  # request -> (blocks, start)


@dataclass(frozen=True)
class TierOps:
    offloads: tuple[tuple[int, BlockKey], ...]  # (device block, key): copy it into the host
    fetches: tuple[tuple[int, BlockKey], ...]  # (device block, key): copy the host's into it
    drops: tuple[BlockKey, ...]  # host copies to forget after the copies above


class LowerTiers:
    """The host tier below the device pool, its cost model and its counters."""

    def __init__(self, host: TierIndex, host_rate: TransferRate, prefill: PrefillRate,
                 block_bytes: int, block_size: int):
        self.host = host
        self.rates = {host.name: host_rate}
        self.prefill = prefill
        self.block_bytes = block_bytes
        self.block_size = block_size
        self.counters = {host.name: TierCounters()}
        self._pending = _Pending()

    # -- blocks leaving the device pool ----------------------------------------------------
    def offload(self, block_id: int, key: BlockKey, block: TierBlock) -> None:
        """A cached device block is handed out again: keep its K/V in the host tier."""
        if key in self.host:
            self.host.touch(key)  # the host still holds the copy it sent up
            return
        self._pending.offloads.append((block_id, key))
        self._pending.drops.pop(key, None)  # pushed out earlier in this plan: back again
        c = self.counters[self.host.name]
        c.num_stored_blocks += 1
        c.num_bytes_in += self.block_bytes
        self._drop(self.host.insert(key, block))

    def park(self, num_blocks: int) -> None:
        """A preempted request's blocks are swapped into host memory."""
        self._drop(self.host.park(num_blocks))

    def unpark(self, num_blocks: int) -> None:
        self.host.unpark(num_blocks)

    def _drop(self, keys: list[BlockKey]) -> None:
        self.counters[self.host.name].num_evicted_blocks += len(keys)
        for key in keys:
            self._pending.drops[key] = None

    # -- hits below the device pool --------------------------------------------------------
    def match(self, keys: Sequence[BlockKey], token_ids: Sequence[int], start: int
              ) -> list[TierBlock]:
        """The blocks to bring up for a request whose device hits end at token `start`: the
        run of `keys` (its next full blocks, token_ids their tokens) the host tier holds, if
        the cost model says fetching it beats recomputing it; else none."""
        bs, found = self.block_size, []
        for i, key in enumerate(keys):
            block = self.host.find(key, token_ids[i * bs:(i + 1) * bs])
            if block is None:
                break
            found.append(block)
        if not found:
            return []
        decision = self.decide(self.host.name, len(found), start)
        c = self.counters[self.host.name]
        c.num_hit_blocks += len(found)
        if not decision.fetch:
            c.num_recompute_decisions += 1
            c.num_recomputed_blocks += len(found)
            return []
        c.num_fetch_decisions += 1
        return found

    def decide(self, tier: str, num_blocks: int, start: int) -> Decision:
        return decide(self.rates[tier], self.prefill, num_blocks * self.block_bytes,
                      num_blocks * self.block_size, start)

    def fetch_run(self, request_id: str, blocks: Sequence[tuple[int, BlockKey]],
                  start: int) -> None:
        """Copy the host's blocks into these device blocks (allocated for them), a run that
        follows `start` cached tokens of the request."""
        for block_id, key in blocks:
            self.host.touch(key)
            self._pending.fetches.append((block_id, key, request_id))
        self._pending.runs[request_id] = (len(blocks), start)

    def cancel(self, request_id: str) -> list[int]:
        """Withdraw this plan's fetches for a request whose admission failed; returns their
        device blocks (their K/V will never arrive)."""
        p = self._pending
        mine = [block_id for block_id, _, rid in p.fetches if rid == request_id]
        if mine:
            p.fetches = [f for f in p.fetches if f[2] != request_id]
        p.runs.pop(request_id, None)
        return mine

    def take_ops(self) -> TierOps:
        """The plan's moves, final: its fetches are counted now."""
        p, self._pending = self._pending, _Pending()
        c = self.counters[self.host.name]
        for num_blocks, start in p.runs.values():
            d = self.decide(self.host.name, num_blocks, start)
            c.num_fetched_blocks += num_blocks
            c.num_bytes_out += num_blocks * self.block_bytes
            c.expected_saved_s += d.recompute_s - d.fetch_s
        return TierOps(tuple(p.offloads), tuple((b, k) for b, k, _ in p.fetches),
                       tuple(p.drops))

    # -- measurements ----------------------------------------------------------------------
    def observe_transfer(self, tier: str, num_bytes: int, seconds: float) -> None:
        self.rates[tier].observe(num_bytes, seconds)

    def snapshots(self) -> tuple[TierSnapshot, ...]:
        return tuple(TierSnapshot(t.name, t.capacity_blocks, len(t), t.num_parked,
                                  self.rates[t.name].bytes_per_s, self.rates[t.name].latency_s,
                                  TierCounters(**vars(self.counters[t.name])))
                     for t in (self.host,))
