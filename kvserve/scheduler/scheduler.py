"""Continuous-batching FCFS scheduler: which requests run each step and how many tokens each feeds.

One rule covers prefill, chunked prefill, decode and resume: a request feeds tokens
[num_computed_tokens, num_tokens), cut to what is left of the step's token budget. Running requests
are served first (oldest first), then waiting ones are admitted while budget, sequence slots and
blocks last: first come first served within a tenant (preempted ones first), the waiting tenant
with the fewest running requests first (queues.py), and when every slot is taken a tenant with
nothing running gets one back from the tenant holding the most; the request whose turn it is is
never skipped, so nothing starves. When a
running request needs a block and none is free, the newest running request is preempted: by
recompute (its blocks are freed and it is requeued at the front with its generated tokens) or by
swap (its blocks are copied to host memory and freed, then copied back on resume).
With prefix caching, an admitted request starts from the cached blocks its tokens begin with (the
block manager's match_prefix), and one whose next uncached block a running request is prefilling
right now waits a step to share it. With no cache (retains_kv False) every step refeeds whole
sequences and nothing is chunked.
Token-level stops are decided here; stop strings need text, so the engine decides those.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter

from kvserve.config import SchedulerConfig
from kvserve.kvcache.block_manager import BlockManager
from kvserve.request import FinishReason, Request, RequestStatus
from kvserve.scheduler.plan import (
    BlockTransfer,
    ScheduledSeq,
    StepPlan,
    StepResult,
    Tier,
    TransferKey,
    swap_keys,
)
from kvserve.scheduler.queues import WaitingQueue

_FINISH_STATUS = {
    FinishReason.STOP: RequestStatus.FINISHED_STOPPED,
    FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH,
    FinishReason.ABORT: RequestStatus.FINISHED_ABORTED,
}


# A multi-step plan runs at most this long (at the last decode steps' pace): a request that
# arrives meanwhile is admitted after it.
MULTI_STEP_MAX_S = 0.1


def _greedy_only(r: Request) -> bool:
    """r's next token is the argmax of the raw logits and nothing else reads them."""
    return r.params.greedy and r.grammar is None and r.params.plain(len(r.output_token_ids))


class Scheduler:
    def __init__(self, config: SchedulerConfig, max_model_len: int, retains_kv: bool,
                 eos_token_ids: tuple[int, ...], block_manager: BlockManager | None = None):
        self.config = config
        self.max_model_len = max_model_len
        self.retains_kv = retains_kv
        self.eos_token_ids = frozenset(eos_token_ids)
        self.blocks = block_manager  # None: K/V memory is not managed in blocks
        self.waiting = WaitingQueue()  # O(1) by id; round robin between tenants
        # Waiting requests set aside while their blocks load from a tier below the host (disk,
        # Redis): the requests behind them are admitted meanwhile; they go back to the front
        # of their tenant's queue once their reads are in.
        self.loading: dict[str, Request] = {}
        self.running: list[Request] = []
        self.swapped: dict[str, tuple[str, ...]] = {}  # request id -> its blocks' host keys
        self.num_preemptions = 0  # all of them, fair-share ones included
        self._dropped: list[str] = []  # preempted to recompute since the last plan
        self.num_fair_share_preemptions = 0
        # decode steps a plan may run back to back (config.num_scheduler_steps; the engine sets
        # 1 when its runner cannot take them in one call)
        self.max_steps = config.num_scheduler_steps
        self.decode_step_s: float | None = None  # a decode step's wall time, smoothed
        self.max_steps_batch = 1 << 30  # the most sequences a multi-step plan may have

    def observe_decode_step(self, seconds: float) -> None:
        """The wall time of one decode step just run (of a multi-step plan: its share)."""
        prev = self.decode_step_s
        self.decode_step_s = seconds if prev is None else 0.7 * prev + 0.3 * seconds

    def add(self, request: Request) -> None:
        self.waiting.add(request)
        if self.blocks is not None and self.retains_kv:
            self.blocks.must_wait(request)  # blocks on disk start loading now (prefetch)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.loading)

    def _return_loaded(self) -> None:
        # newest first: each goes in front of the last, so they keep their order
        for request_id, r in reversed(list(self.loading.items())):
            if not self.blocks.must_wait(r):
                del self.loading[request_id]
                self.waiting.push_front(r)

    # -- planning ----------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens if self.retains_kv else None
        seqs: list[ScheduledSeq] = []
        transfers: list[BlockTransfer] = []  # swap-outs (running loop) before swap-ins
        if self.loading:
            self._return_loaded()
        self._preempt_for_fair_share(transfers)
        preempted = False
        for r in list(self.running):
            if r not in self.running:  # preempted earlier in this loop
                continue
            num_new = self._num_new_tokens(r, budget)
            if num_new == 0:
                continue
            while not self._allocate(r, num_new):
                victim = self.running[-1]
                self._preempt(victim, transfers)
                preempted = True
                if victim is r:
                    break
            if r not in self.running:
                continue
            seqs.append(self._scheduled(r, num_new))
            budget = None if budget is None else budget - num_new
        num_running = len(seqs)
        # Admit only when nobody had to be preempted: a request just pushed out must not lose
        # its blocks to one that arrived after it.
        while (not preempted and self.waiting and len(self.running) < self.config.max_num_seqs
               and (budget is None or budget > 0)):
            r = self.waiting.peek(Counter(x.tenant for x in self.running))
            if self._over_long_limit(r):
                break  # FCFS: the head waits for a long request to finish; none jumps it
            if r.request_id in self.swapped:
                num_new = self._num_new_tokens(r, budget)
                if not self._swap_in(r, num_new, transfers):
                    break
            else:
                if self.blocks is not None and self.blocks.must_wait(r):
                    self.waiting.remove(r.request_id)  # its blocks are loading: the next goes
                    self.loading[r.request_id] = r
                    continue
                if self._prefix_in_flight(r):
                    break  # its prefix is being computed right now: wait a step and share it
                num_new = self._admit_with_prefix(r, budget)
                if num_new is None:
                    break
            self.waiting.pop(r)
            r.status = RequestStatus.RUNNING
            self.running.append(r)
            seqs.append(self._scheduled(r, num_new))
            budget = None if budget is None else budget - num_new
        # a request admitted now delivers its first token after this step alone
        num_steps = self._lookahead(seqs) if len(seqs) == num_running else 1
        if num_steps > 1:  # the tables with the lookahead's blocks
            seqs = [dataclasses.replace(s, block_ids=tuple(self.blocks.block_ids(s.request_id)))
                    for s in seqs]
        dropped, self._dropped = tuple(self._dropped), []
        transfers, host_drops, tier_io = self._with_tier_ops(transfers)
        return StepPlan(tuple(seqs), transfers, dropped, host_drops, tier_io, num_steps)

    def _lookahead(self, seqs: list[ScheduledSeq]) -> int:
        """How many decode steps this plan runs back to back (multi-step scheduling; 1: this
        one only). More than one only when every running request feeds its last token after a
        first one already delivered, and picks the next greedily with nothing else reading its
        logits (logprobs, penalties, min_tokens pending, a grammar), no request waits or was
        admitted by this plan, and the batch is one the runner fuses (max_steps_batch): then
        the steps are exactly the single steps they replace, and nobody is admitted later for
        them. Capped by each request's max_tokens and the context length, by MULTI_STEP_MAX_S
        of steps at the measured pace (observe_decode_step), so that a request arriving
        meanwhile waits little longer than one step (a large batch's long steps run one at a
        time: their Python share is small anyway), and by the blocks the lookahead can take:
        only free blocks that hold no cached prefix (the prefix cache and the lower tiers see
        what single steps would), never by preempting. Tokens sampled past a request's stop
        (EOS, a stop string) are dropped by the engine; their slots go with its blocks."""
        k = self.max_steps
        if self.decode_step_s is None:
            return 1  # the first decode step is timed alone
        k = min(k, max(1, int(MULTI_STEP_MAX_S / max(self.decode_step_s, 1e-6))))
        if (k <= 1 or self.blocks is None or not self.retains_kv or self.waiting
                or self.loading or not seqs or len(seqs) != len(self.running)
                or len(seqs) > self.max_steps_batch):
            return 1
        by_id = {r.request_id: r for r in self.running}
        reqs = [by_id[s.request_id] for s in seqs]
        for s, r in zip(seqs, reqs):
            if len(s.token_ids) != 1 or not s.sample or not r.output_token_ids \
                    or not _greedy_only(r):
                return 1
            left = self.max_model_len - r.num_tokens  # new tokens before the context is full
            if r.params.max_tokens is not None:
                left = min(left, r.params.max_tokens - len(r.output_token_ids))
            k = min(k, left)
        blocks = self.blocks

        def need(k: int) -> int:  # blocks the requests' tables lack for k steps
            return sum(blocks.num_new_blocks(r.request_id, r.num_computed_tokens + k)
                       for r in reqs)

        free = blocks.uncached_free_blocks(need(k))
        while k > 1 and need(k) > free:
            k -= 1
        if k <= 1:
            return 1
        for r in reqs:
            blocks.allocate_slots(r.request_id, r.num_computed_tokens + k)
            r.max_num_blocks = max(r.max_num_blocks, blocks.num_blocks_held(r.request_id))
        return k

    def _with_tier_ops(self, transfers: list[BlockTransfer]) -> tuple[
            tuple[BlockTransfer, ...], tuple[TransferKey, ...], tuple]:
        """The plan's copies with the lower tiers' (evicted cached blocks copied down, hits
        there fetched up): every copy off the device before any copy onto it, since a block
        read here may be written in the same plan."""
        ops = self.blocks.take_tier_ops() if self.blocks is not None else None
        if ops is None:
            return tuple(transfers), (), ()
        reads, writes = [], []
        if ops.offloads:
            ids, keys = zip(*ops.offloads)
            reads.append(BlockTransfer(Tier.DEVICE, Tier.HOST, ids, keys))
        reads += [t for t in transfers if t.src is Tier.DEVICE]
        writes += [t for t in transfers if t.dst is Tier.DEVICE]
        if ops.fetches:
            ids, keys = zip(*ops.fetches)
            writes.append(BlockTransfer(Tier.HOST, Tier.DEVICE, ids, keys))
        return tuple(reads + writes), ops.drops, ops.disk_ops + ops.redis_ops

    def _preempt_for_fair_share(self, transfers: list[BlockTransfer]) -> None:
        """Every running slot taken, and a tenant waits with nothing running: take one slot
        back from the tenant holding the most, by preempting its newest running request as
        memory pressure would (recompute or swap), so no tenant is locked out for as long as
        another's burst lasts. Beyond that first slot, fairness comes from admission order
        (the fewest running first) as slots free up, never from preempting more: a tenant
        keeps the streams it runs. At most one a step; with one tenant, or K/V not in blocks
        (the unpaged modes never preempt), never."""
        if (self.blocks is None or len(self.running) < self.config.max_num_seqs
                or not self.waiting):
            return
        running = Counter(r.tenant for r in self.running)
        if all(running.get(t, 0) > 0 for t in self.waiting.tenants()):
            return
        donor, held = running.most_common(1)[0]
        if held < 2:
            return
        victim = next(r for r in reversed(self.running) if r.tenant == donor)
        self._preempt(victim, transfers)
        self.num_fair_share_preemptions += 1

    def is_long(self, r: Request) -> bool:
        max_tokens = r.params.max_tokens or self.max_model_len
        return r.num_prompt_tokens + max_tokens > self.config.long_context_threshold

    def _over_long_limit(self, r: Request) -> bool:
        limit = self.config.max_long_requests
        if limit is None or not self.is_long(r):
            return False
        return sum(self.is_long(x) for x in self.running) >= limit

    def _num_new_tokens(self, r: Request, budget: int | None) -> int:
        remaining = r.num_tokens - r.num_computed_tokens
        return remaining if budget is None else min(remaining, budget)

    def _admit_with_prefix(self, r: Request, budget: int | None) -> int | None:
        """Give a fresh (or recomputing) request its cached prefix and blocks for the rest of
        this step's tokens; the tokens it feeds, or None (holding nothing) if blocks are short."""
        matched = (self.blocks is not None and self.retains_kv and r.num_computed_tokens == 0
                   and r.params.prompt_logprobs is None)
        if matched:
            r.num_computed_tokens = self.blocks.match_prefix(r)
        num_new = self._num_new_tokens(r, budget)
        if not self._allocate(r, num_new):
            if self.blocks is not None:
                self.blocks.free(r.request_id)  # give back the prefix hits
            r.num_computed_tokens = 0
            return None
        if matched:
            self.blocks.record_admission(r, r.num_computed_tokens)
            if r.num_cached_tokens is None:
                r.num_cached_tokens = r.num_computed_tokens
        return num_new

    def _prefix_in_flight(self, r: Request) -> bool:
        """Whether a running request is prefilling the first block of r's prompt that is not
        cached yet (n > 1 samples of one prompt, or the same system prompt sent twice at once):
        r then waits so it can reuse those blocks instead of computing its own copy."""
        if (self.blocks is None or self.blocks.prefix_index is None or not self.retains_kv
                or r.params.prompt_logprobs is not None):
            return False
        key = self.blocks.next_uncached_key(r)
        if key is None:
            return False
        bs = self.blocks.block_size
        return any(key in x.block_keys[x.num_computed_tokens // bs:] for x in self.running
                   if x.num_computed_tokens < x.num_prompt_tokens)

    def _allocate(self, r: Request, num_new: int) -> bool:
        if self.blocks is None:
            return True
        return self.blocks.allocate_slots(r.request_id, r.num_computed_tokens + num_new)

    def _scheduled(self, r: Request, num_new: int) -> ScheduledSeq:
        # [0, num_computed) cached | [num_computed, num_computed + num_new) fed this step
        start = r.num_computed_tokens
        token_ids = tuple(r.token_ids_between(start, start + num_new))
        block_ids = tuple(self.blocks.block_ids(r.request_id)) if self.blocks else ()
        groups = self.blocks.group_block_ids(r.request_id) if self.blocks else ()
        if self.blocks is not None:  # pool blocks it holds now, every table's
            r.max_num_blocks = max(r.max_num_blocks, self.blocks.num_blocks_held(r.request_id))
        # Only a chunk that reaches the last known token produces the next one.
        return ScheduledSeq(r.request_id, token_ids, start, start + num_new == r.num_tokens,
                            block_ids, groups)

    def _preempt(self, r: Request, transfers: list[BlockTransfer]) -> None:
        self.running.remove(r)
        r.status = RequestStatus.WAITING
        r.num_preemptions += 1
        self.num_preemptions += 1
        if self.config.preemption_mode == "swap" and r.num_computed_tokens > 0:
            block_ids = self.blocks.free(r.request_id, swap=True)
            keys = swap_keys(r.request_id, len(block_ids))
            transfers.append(BlockTransfer(Tier.DEVICE, Tier.HOST, tuple(block_ids), keys,
                                           r.request_id))
            self.swapped[r.request_id] = keys
            self.blocks.park(len(keys))
        else:
            self.blocks.free(r.request_id)
            r.num_computed_tokens = 0  # recompute: its K/V will be rebuilt from its tokens
            self._dropped.append(r.request_id)
        self.waiting.push_front(r)

    def _swap_in(self, r: Request, num_new: int, transfers: list[BlockTransfer]) -> bool:
        """Bring a swapped request back with room for this step's tokens, or leave it out: a
        waiting request never holds device blocks."""
        keys = self.swapped[r.request_id]
        num_held = len(keys)
        need = self.blocks.blocks_to_resume(r.request_id, r.num_computed_tokens + num_new)
        if not self.blocks.pool.can_allocate(need):
            return False
        block_ids = self.blocks.allocate_blocks(num_held)
        self.blocks.adopt(r.request_id, block_ids)
        del self.swapped[r.request_id]
        self.blocks.unpark(num_held)
        transfers.append(BlockTransfer(Tier.HOST, Tier.DEVICE, tuple(block_ids), keys,
                                       r.request_id))
        return self._allocate(r, num_new)  # the rest is free: checked above

    # -- results -----------------------------------------------------------------------------
    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Advance computed counts, apply sampled tokens; returns requests finished this step."""
        by_id = {r.request_id: r for r in self.running}
        for s in plan.seqs:
            r = by_id[s.request_id]
            r.num_computed_tokens = (s.start_position + len(s.token_ids)) if self.retains_kv else 0
            if self.blocks is not None:
                self.blocks.cache_full_blocks(r)
                self.blocks.release_unread(r)  # a window policy's blocks no layer reads
        for scores in result.prompt_scores:
            r = by_id[scores.request_id]
            have = len(r.prompt_logprobs)
            if scores.first <= have < scores.first + len(scores.entries):
                r.prompt_logprobs.extend(scores.entries[have - scores.first:])
        now = time.monotonic()
        finished = []
        for sampled in result.sampled:
            r = by_id[sampled.request_id]
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
        if r.grammar is not None and r.grammar.finished:  # nothing more the grammar allows
            return FinishReason.STOP, None
        if p.max_tokens is not None and num_out >= p.max_tokens:
            return FinishReason.LENGTH, None
        if r.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH, None
        return None

    def finish(self, r: Request, reason: FinishReason,
               stop_reason: str | int | None = None) -> None:
        """Move a request out of the queues for good (stop, length or abort); free its blocks."""
        if r.status is RequestStatus.RUNNING:
            self.running.remove(r)  # by identity (Request compares by identity), few running
        elif not self.waiting.remove(r.request_id):
            self.loading.pop(r.request_id, None)
        parked = self.swapped.pop(r.request_id, None)
        if parked is not None:
            self.blocks.unpark(len(parked))
        if self.blocks is not None:
            self.blocks.free(r.request_id)
        r.status = _FINISH_STATUS[reason]
        r.finish_reason = reason
        r.stop_reason = stop_reason
        r.finish_time = time.monotonic()

    def find(self, request_id: str) -> Request | None:
        for r in self.running:
            if r.request_id == request_id:
                return r
        return next((r for r in self.waiting if r.request_id == request_id),
                    self.loading.get(request_id))
