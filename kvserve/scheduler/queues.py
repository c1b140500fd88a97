"""The waiting requests: who is admitted next. No torch.

One queue per tenant, first come first served inside it; a preempted request goes back to the
front of its own tenant's queue. Between tenants, the next admission goes to the waiting tenant
with the fewest requests running (ties: whoever waited longest for a turn, round robin), so one
tenant's burst cannot starve another's requests; when every slot is taken, the scheduler gives a
tenant with nothing running a slot of the tenant holding the most (scheduler.py). With one
tenant (no API keys) this is plain FCFS with preempted requests first. Every operation is O(1) in
the number of waiting requests: they are indexed by id, never searched for or compared by value.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping

from kvserve.request import Request


class WaitingQueue:
    def __init__(self) -> None:
        # tenant -> its requests in admission order; the dict's order is the round-robin turn
        self._tenants: OrderedDict[str | None, OrderedDict[str, Request]] = OrderedDict()
        self._where: dict[str, str | None] = {}  # request id -> its tenant

    def __len__(self) -> int:
        return len(self._where)

    def __bool__(self) -> bool:
        return bool(self._where)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._where

    def __iter__(self) -> Iterator[Request]:
        """Every waiting request, tenant by tenant, for reporting and checks."""
        for queue in self._tenants.values():
            yield from queue.values()

    def add(self, r: Request) -> None:
        """A new request joins the back of its tenant's queue."""
        self._tenants.setdefault(r.tenant, OrderedDict())[r.request_id] = r
        self._where[r.request_id] = r.tenant

    def push_front(self, r: Request) -> None:
        """A preempted request goes before every other request of its tenant (preemption takes
        the newest running first, so the oldest of several ends up in front)."""
        queue = self._tenants.setdefault(r.tenant, OrderedDict())
        queue[r.request_id] = r
        queue.move_to_end(r.request_id, last=False)
        self._where[r.request_id] = r.tenant

    def tenants(self) -> Iterator[str | None]:
        return iter(self._tenants)

    def peek(self, num_running: Mapping[str | None, int] | None = None) -> Request | None:
        """The request to admit next (not removed): the head of the queue of the waiting tenant
        with the fewest running requests, the earliest in turn among equals."""
        best, best_running = None, None
        for tenant, queue in self._tenants.items():
            running = num_running.get(tenant, 0) if num_running else 0
            if best_running is None or running < best_running:
                best, best_running = queue, running
        return None if best is None else next(iter(best.values()))

    def pop(self, r: Request) -> None:
        """Remove the request peek() gave, after admitting it; its tenant's turn passes."""
        self.remove(r.request_id)
        if r.tenant in self._tenants:
            self._tenants.move_to_end(r.tenant)

    def remove(self, request_id: str) -> bool:
        """Drop a request wherever it waits (an abort); False if it is not waiting."""
        if request_id not in self._where:
            return False
        tenant = self._where.pop(request_id)
        queue = self._tenants[tenant]
        del queue[request_id]
        if not queue:
            del self._tenants[tenant]  # an emptied queue keeps no turn
        return True

    def counts_by_tenant(self) -> dict[str | None, int]:
        """Requests waiting per tenant."""
        return {tenant: len(queue) for tenant, queue in self._tenants.items()}
