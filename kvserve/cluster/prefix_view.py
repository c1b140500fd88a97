"""What a router knows of each replica's prefix cache, and the choice it makes from it. No torch,
no Ray: the router (router.py) and the replicas (replica.py) share this code, and unit tests run
it alone.

A request's route keys are the engine's own block keys (kvcache.prefix_index: sha256 chained
from a root that holds the model identity and the request's cache salt), so a prompt of one
tenant never matches another tenant's blocks, in routing as in the cache. A replica follows its
KV events (stored adds a key, evicted removes it) and reports the set it holds; a router keeps,
per replica, that reported set plus the keys of the requests it has just sent there and that the
replica has not reported yet (their blocks are being computed). Keys travel as their first 8
bytes: two different prefixes sharing 64 bits would cost one routing guess, never wrong K/V (the
replica checks the tokens of every block it reuses).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kvserve.kvcache.events import BlockEvent, BlockEventKind
from kvserve.kvcache.prefix_index import chain_keys, root_key

DIGEST_BYTES = 8
KEY_BYTES = 32  # a group-0 block key (other KV groups' keys carry a suffix: not routed on)
PENDING_TTL_S = 120.0  # a routed request's keys count this long at most without a first output
REPORT_GRACE_S = 2.0  # after its first output: replicas report every 0.25 s, Serve relays it
MAX_PENDING = 4096  # requests per replica whose keys are kept unreported (oldest dropped)


def route_digests(model_key: str, cache_salt: str | None, token_ids: Sequence[int],
                  block_size: int) -> list[bytes]:
    """The digests of the blocks a replica could reuse for this prompt: its full blocks short
    of the last token (whose logits must be computed), chained as the engine chains them."""
    usable = (len(token_ids) - 1) // block_size * block_size
    keys = chain_keys(root_key((model_key, None, cache_salt)), token_ids[:usable], block_size)
    return [k[:DIGEST_BYTES] for k in keys]


class ReplicaKeys:
    """A replica's side: the digests of the blocks its prefix index holds, from its KV events
    (applied on the engine thread, read on the replica's event loop: hence the lock)."""

    def __init__(self) -> None:
        self._keys: dict[bytes, int] = {}  # digest -> blocks holding it (a digest may repeat)
        self._lock = threading.Lock()
        self.num_events = 0

    def apply(self, events: Iterable[BlockEvent]) -> None:
        with self._lock:
            for e in events:
                if e.block_key is None or len(e.block_key) != KEY_BYTES:
                    continue  # freed-only blocks, and other KV groups' keys
                d = e.block_key[:DIGEST_BYTES]
                self.num_events += 1
                if e.kind is BlockEventKind.STORED:
                    self._keys[d] = self._keys.get(d, 0) + 1
                elif e.kind is BlockEventKind.EVICTED:
                    left = self._keys.get(d, 0) - 1
                    if left > 0:
                        self._keys[d] = left
                    else:
                        self._keys.pop(d, None)

    def packed(self) -> bytes:
        """Every digest held, concatenated (8 bytes a cached block)."""
        with self._lock:
            return b"".join(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def unpack(packed: bytes) -> frozenset[bytes]:
    return frozenset(packed[i:i + DIGEST_BYTES] for i in range(0, len(packed), DIGEST_BYTES))


@dataclass
class Pending:
    digests: list[bytes]
    routed_at: float  # the router's clock (time.monotonic())
    prefilled_at: float | None = None  # when its first output came back (its blocks stored)
    weight: int = 1  # sequences it carries (n x prompts)


@dataclass
class ReplicaView:
    """What one router knows of one replica: the keys it last reported, and the keys of the
    requests sent there since (kept until reports surely show them: REPORT_GRACE_S after their
    first output, on the router's own clock; or PENDING_TTL_S; at most MAX_PENDING)."""

    reported: frozenset[bytes] = frozenset()
    reported_at: float = 0.0  # the replica's clock when it reported (orders its reports)
    pending: dict[str, Pending] = field(default_factory=dict)  # route id -> its keys
    in_flight: int = 0  # sequences sent there that have not completed
    _pending_keys: dict[bytes, int] = field(default_factory=dict)  # digest -> pending holders

    def add_pending(self, route_id: str, p: Pending) -> None:
        self.drop_pending(route_id)
        while len(self.pending) >= MAX_PENDING:
            self.drop_pending(next(iter(self.pending)))
        self.pending[route_id] = p
        for d in p.digests:
            self._pending_keys[d] = self._pending_keys.get(d, 0) + 1

    def drop_pending(self, route_id: str) -> Pending | None:
        p = self.pending.pop(route_id, None)
        if p is not None:
            for d in p.digests:
                left = self._pending_keys.get(d, 0) - 1
                if left > 0:
                    self._pending_keys[d] = left
                else:
                    self._pending_keys.pop(d, None)
        return p

    def expire(self, now: float) -> None:
        for route_id, p in list(self.pending.items()):
            if (p.prefilled_at is not None and now - p.prefilled_at > REPORT_GRACE_S) \
                    or now - p.routed_at > PENDING_TTL_S:
                self.drop_pending(route_id)

    def run_of(self, digests: Sequence[bytes]) -> int:
        """Leading blocks of digests this replica holds (or is computing for us)."""
        n = 0
        for d in digests:
            if d not in self.reported and d not in self._pending_keys:
                break
            n += 1
        return n

    def report(self, packed: bytes, at: float) -> None:
        if at > self.reported_at:
            self.reported, self.reported_at = unpack(packed), at


@dataclass(frozen=True)
class Choice:
    replica: str
    matched_blocks: int  # leading blocks the chosen replica holds
    best_blocks: int  # the longest run any candidate holds
    reason: str  # "prefix" | "load" (imbalance fallback) | "no-match"


def choose(views: dict[str, ReplicaView], candidates: Sequence[str], digests: Sequence[bytes],
           max_imbalance: int, rng: random.Random | None = None,
           avoid: Sequence[str] = ()) -> Choice:
    """The replica holding the longest run of the request's blocks, unless it is busier than
    the least busy candidate by more than max_imbalance sequences in flight: then (as when
    nothing matches) the least busy, ties broken at random. Among equal runs, the least busy.
    Replicas in `avoid` (one that just failed this request) only if nothing else is left."""
    rng = rng or random
    candidates = [r for r in candidates if r not in avoid] or list(candidates)
    runs = {r: views[r].run_of(digests) if r in views else 0 for r in candidates}
    load = {r: views[r].in_flight if r in views else 0 for r in candidates}
    least = min(load.values())
    idle = [r for r in candidates if load[r] == least]
    best = max(runs.values())
    if best == 0:
        r = rng.choice(idle)
        return Choice(r, 0, 0, "no-match")
    top = [r for r in candidates if runs[r] == best]
    pick = min(top, key=lambda r: (load[r], rng.random()))
    if load[pick] - least > max_imbalance:
        r = rng.choice(idle)
        return Choice(r, runs[r], best, "load")
    return Choice(pick, best, best, "prefix")
