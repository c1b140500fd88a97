"""Who may still queue: the waiting-queue limits of the async front end (all tenants together,
and each tenant alone), counted from the engine's published stats plus what was submitted since,
with a Retry-After estimated from the recent finish rate. Runs on the event loop; no engine
state is touched here.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

from kvserve.engine.stream import EngineStats, QueueFullError
from kvserve.errors import InvalidRequestError

RECENT_FINISHES = 64


class Admission:
    def __init__(self, max_queue: int | None = None, max_queue_per_tenant: int | None = None):
        self.max_queue = max_queue
        self.max_queue_per_tenant = max_queue_per_tenant
        self._pending: Counter[str | None] = Counter()  # submitted, not yet in the scheduler
        self._lock = threading.Lock()  # the loop adds, the engine thread takes away
        self._recent_finishes: list[float] = []

    def check(self, num_new: int, tenant: str | None, stats: EngineStats) -> None:
        """Raise QueueFullError (429) when num_new more waiting sequences would pass a limit,
        InvalidRequestError when they never could."""
        for limit, name, waiting in (
                (self.max_queue, "max_queue", stats.num_waiting + self.num_pending_total()),
                (self.max_queue_per_tenant, "max_queue_per_tenant",
                 dict(stats.waiting_by_tenant).get(tenant, 0) + self.num_pending(tenant))):
            if limit is None:
                continue
            if num_new > limit:
                raise InvalidRequestError(
                    f"the request has {num_new} sequences (prompts x n) but at most {name} "
                    f"({limit}) may wait")
            if waiting + num_new > limit:
                whose = "" if name == "max_queue" else "your "
                raise QueueFullError(
                    f"{whose}waiting queue is full ({waiting} waiting, {name} {limit}); retry "
                    f"later", self.retry_after_s(waiting + num_new))

    def num_pending(self, tenant: str | None) -> int:
        with self._lock:
            return self._pending[tenant]

    def num_pending_total(self) -> int:
        with self._lock:
            return sum(self._pending.values())

    def submitted(self, tenant: str | None, num: int) -> None:
        with self._lock:
            self._pending[tenant] += num

    def taken(self, tenant: str | None) -> None:
        """One submitted sequence reached the scheduler (or was refused on the way)."""
        with self._lock:
            self._pending[tenant] -= 1
            if self._pending[tenant] <= 0:
                del self._pending[tenant]

    def finished(self, now: float) -> None:
        self._recent_finishes = [*self._recent_finishes[-(RECENT_FINISHES - 1):], now]

    def retry_after_s(self, waiting: int) -> int:
        """Seconds until about `waiting` requests have finished at the recent finish rate."""
        now = time.monotonic()
        recent = [t for t in self._recent_finishes if now - t < 60.0]
        if len(recent) < 2 or recent[-1] <= recent[0]:
            return 1
        rate = (len(recent) - 1) / (recent[-1] - recent[0])
        return max(1, min(60, round(waiting / rate)))
