"""The waiting requests: who is admitted next. No torch.

Preempted requests resume first, in the order they had been running. New requests wait in one
queue per tenant, first come first served inside a queue, and the queues take turns: after a
tenant's request is admitted, the next admission is offered to the next tenant with a request
waiting (round robin), so one tenant's burst cannot starve another's requests. With one tenant
(no API keys) this is plain FCFS. Every operation is O(1): requests are indexed by id, never
searched for or compared by value.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from kvserve.request import Request


class WaitingQueue:
    def __init__(self) -> None:
        self._resume: OrderedDict[str, Request] = OrderedDict()  # preempted, resume order
        # tenant -> its requests in arrival order; the dict's order is the round-robin turn
        self._tenants: OrderedDict[str | None, OrderedDict[str, Request]] = OrderedDict()
        self._where: dict[str, str | None] = {}  # request id -> its tenant (not resuming)

    def __len__(self) -> int:
        return len(self._resume) + len(self._where)

    def __bool__(self) -> bool:
        return bool(self._resume or self._where)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._resume or request_id in self._where

    def __iter__(self) -> Iterator[Request]:
        """Every waiting request (resuming ones first), for reporting and checks."""
        yield from self._resume.values()
        for queue in self._tenants.values():
            yield from queue.values()

    def add(self, r: Request) -> None:
        """A new request joins the back of its tenant's queue."""
        self._tenants.setdefault(r.tenant, OrderedDict())[r.request_id] = r
        self._where[r.request_id] = r.tenant

    def push_front(self, r: Request) -> None:
        """A preempted request: it resumes before every new request and every earlier-preempted
        one (preemption takes the newest running first, so the oldest ends up in front)."""
        self._resume[r.request_id] = r
        self._resume.move_to_end(r.request_id, last=False)

    def peek(self) -> Request | None:
        """The request to admit next (not removed)."""
        if self._resume:
            return next(iter(self._resume.values()))
        for queue in self._tenants.values():
            return next(iter(queue.values()))
        return None

    def pop(self, r: Request) -> None:
        """Remove the request peek() gave, after admitting it; its tenant's turn passes."""
        if self._resume.pop(r.request_id, None) is not None:
            return
        tenant = self._where.pop(r.request_id)
        queue = self._tenants[tenant]
        del queue[r.request_id]
        if queue:
            self._tenants.move_to_end(tenant)
        else:
            del self._tenants[tenant]

    def remove(self, request_id: str) -> bool:
        """Drop a request wherever it waits (an abort); False if it is not waiting."""
        if self._resume.pop(request_id, None) is not None:
            return True
        if request_id not in self._where:
            return False
        tenant = self._where.pop(request_id)
        queue = self._tenants[tenant]
        del queue[request_id]
        if not queue:
            del self._tenants[tenant]  # an emptied queue keeps no turn
        return True

    def counts_by_tenant(self) -> dict[str | None, int]:
        """Requests waiting per tenant, resuming ones included."""
        counts = {tenant: len(queue) for tenant, queue in self._tenants.items()}
        for r in self._resume.values():
            counts[r.tenant] = counts.get(r.tenant, 0) + 1
        return counts
