"""FCFS scheduler: admits waiting requests up to max_num_seqs and plans every running one's tokens.

One rule covers prefill and decode: a request feeds its tokens [num_computed_tokens, num_tokens).
With a cache that keeps K/V, num_computed_tokens advances to num_tokens after each step; with no
cache it stays 0, so every step refeeds the whole sequence. Token-level stops (EOS, stop ids,
max_tokens, context length) are decided here; stop strings need text, so the engine decides those.
Block budgets, chunked prefill and preemption arrive with the paged cache.
"""

from __future__ import annotations

import time
from collections import deque

from kvserve.config import SchedulerConfig
from kvserve.request import FinishReason, Request, RequestStatus
from kvserve.scheduler.plan import ScheduledSeq, StepPlan, StepResult

_FINISH_STATUS = {
    FinishReason.STOP: RequestStatus.FINISHED_STOPPED,
    FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH,
    FinishReason.ABORT: RequestStatus.FINISHED_ABORTED,
}


class Scheduler:
    def __init__(self, config: SchedulerConfig, max_model_len: int, retains_kv: bool,
                 eos_token_ids: tuple[int, ...]):
        self.config = config
        self.max_model_len = max_model_len
        self.retains_kv = retains_kv
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
        seqs = []
        for r in self.running:
            # [0, num_computed) cached | [num_computed, num_tokens) fed this step
            start = r.num_computed_tokens
            seqs.append(ScheduledSeq(r.request_id, tuple(r.all_token_ids[start:]), start))
        return StepPlan(tuple(seqs))

    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Apply sampled tokens; returns the requests that finished this step (already removed)."""
        by_id = {r.request_id: r for r in self.running}
        now = time.monotonic()
        finished = []
        for sampled in result.sampled:
            r = by_id[sampled.request_id]
            r.num_computed_tokens = r.num_tokens if self.retains_kv else 0
            r.output_token_ids.append(sampled.token_id)
            if sampled.logprobs is not None:
                r.output_logprobs.append(sampled.logprobs)
            if r.first_token_time is None:
                r.first_token_time = now
            reason = self._token_stop(r, sampled.token_id)
            if reason is not None:
                self.finish(r, reason[0], reason[1])
                finished.append(r)
        return finished

    def _token_stop(self, r: Request, token_id: int) -> tuple[FinishReason, int | None] | None:
        p = r.params
        num_out = len(r.output_token_ids)
        if num_out >= p.min_tokens:
            if token_id in p.stop_token_ids:
                return FinishReason.STOP, token_id
            if not p.ignore_eos and token_id in self.eos_token_ids:
                return FinishReason.STOP, None
        if p.max_tokens is not None and num_out >= p.max_tokens:
            return FinishReason.LENGTH, None
        if r.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH, None
        return None

    def finish(self, r: Request, reason: FinishReason,
               stop_reason: str | int | None = None) -> None:
        """Move a request out of the queues for good (stop, length or abort)."""
        if r in self.running:
            self.running.remove(r)
        elif r in self.waiting:
            self.waiting.remove(r)
        r.status = _FINISH_STATUS[reason]
        r.finish_reason = reason
        r.stop_reason = stop_reason
        r.finish_time = time.monotonic()

    def find(self, request_id: str) -> Request | None:
        for r in (*self.running, *self.waiting):
            if r.request_id == request_id:
                return r
        return None
