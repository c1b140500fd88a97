"""Block events: a block's K/V was stored in the prefix index, evicted from it, or freed.

Routers and dashboards follow the cache through these. An event names the block by its id and
chained key and its tenant by a short keyed hash of the cache salt (HMAC under a random key of the
log's own), never the salt in clear: a short salt cannot be recovered by hashing guesses. The log
counts every event; it keeps the events themselves only once someone records them, and then at
most max_pending: a consumer that falls behind loses the oldest (counted), never memory.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from collections import deque
from dataclasses import dataclass

MAX_PENDING_EVENTS = 65536


class BlockEventKind(str, enum.Enum):
    STORED = "stored"  # a full block entered the prefix index (its K/V can be reused)
    EVICTED = "evicted"  # the index forgot a block: the pool handed it out for new K/V
    FREED = "freed"  # no request holds the block any more (it may still be cached)



@dataclass(frozen=True)
class BlockEvent:
    kind: BlockEventKind
    block_id: int
    block_key: bytes | None  # None for a freed block that was never indexed
    tenant: str | None = None  # EventLog.tenant_hash of the salt the block's K/V was made under


class EventLog:
    """Events in emission order until drained; counts every event ever emitted, by kind."""

    def __init__(self, max_pending: int = MAX_PENDING_EVENTS, recording: bool = False,
                 tenant_key: bytes | None = None) -> None:
        self._pending: deque[BlockEvent] = deque(maxlen=max_pending)
        self.recording = recording  # keep events for drain(), not only their counts
        self.counts: dict[BlockEventKind, int] = dict.fromkeys(BlockEventKind, 0)
        self.num_dropped = 0  # recorded events pushed out before anyone drained them
        self._tenant_key = tenant_key if tenant_key is not None else secrets.token_bytes(16)

    def tenant_hash(self, cache_salt: str | None) -> str | None:
        """16 hex digits naming a tenant without revealing its salt; None for unsalted requests.
        Stable for this log (replicas that must agree share a tenant_key)."""
        if cache_salt is None:
            return None
        return hmac.new(self._tenant_key, cache_salt.encode(), hashlib.sha256).hexdigest()[:16]

    def emit(self, event: BlockEvent) -> None:
        self.counts[event.kind] += 1
        if not self.recording:
            return
        if len(self._pending) == self._pending.maxlen:
            self.num_dropped += 1
        self._pending.append(event)

    def drain(self) -> tuple[BlockEvent, ...]:
        """The events since the last drain, oldest first."""
        events = tuple(self._pending)
        self._pending.clear()
        return events
