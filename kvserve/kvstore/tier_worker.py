"""A tier's worker thread (disk, Redis): jobs run one at a time in submission order, off the
step loop; finished reads are collected by poll() as TierLoads. A failing job never stops the
thread: the reads it owed are answered "failed"."""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

import torch

log = logging.getLogger("kvserve.offload")


@dataclass(frozen=True)
class TierLoad:
    """A read finished: the block is in `parts` (ok), or its entry was refused (reason)."""

    tier: str
    key: bytes
    ok: bool
    token_ids: tuple[int, ...] = ()
    tenant: str | None = None
    parts: dict[str, torch.Tensor] | None = None
    num_bytes: int = 0
    seconds: float = 0.0
    reason: str = ""
    # (bytes, seconds) of one whole read for the cost model (a Redis run's first answer carries
    # its round trip's; the others none)
    rate_sample: tuple[int, float] | None = None


class TierWorker:
    """One worker thread running a tier's jobs in submission order; finished reads are
    collected by poll() (a subclass's handle() puts TierLoads in self._done)."""

    name = ""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self.ready = threading.Event()  # set when a read finishes (the step loop may sleep)
        self._thread = threading.Thread(target=self._run, name=f"kvserve-{self.name}",
                                        daemon=True)
        self._thread.start()

    def poll(self) -> list[TierLoad]:
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def drain(self, timeout_s: float = 30.0) -> None:
        """Wait until every job submitted so far has run (tests, shutdown)."""
        marker = threading.Event()
        self._jobs.put(("mark", marker, None))
        marker.wait(timeout_s)

    def close(self) -> None:
        self.drain()
        self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job[0] == "mark":
                job[1].set()
                continue
            try:
                self.handle(*job)
            except Exception as err:  # noqa: BLE001 - the worker must outlive any one job
                log.warning("%s tier: %s failed (%s)", self.name, job[0], err)
                for key in self.keys_answered_by(job):
                    self._done.put(TierLoad(self.name, key, False, reason=f"failed: {err}"))
            if not self._done.empty():
                self.ready.set()

    def keys_answered_by(self, job) -> list[bytes]:
        """The keys a job owes an answer for (reads), should it fail."""
        return []

    def handle(self, op: str, arg, parts) -> None:
        raise NotImplementedError
