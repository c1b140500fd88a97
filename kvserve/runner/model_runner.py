"""Executes a StepPlan: moves blocks, builds the step's inputs and attention metadata, runs the
model over its attention backend, samples.

The runner owns every tensor of a step and the per-request random generators (seeded from
SamplingParams.seed, so a seeded request gives the same tokens whatever else shares its batch).
It never decides who runs: that is the scheduler's plan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvserve.kernels import cpu as cpu_kernels
from kvserve.kvstore.disk import DiskTier
from kvserve.kvstore.host import HostBlockStore
from kvserve.kvstore.paged import PagedKVStore
from kvserve.kvstore.tier_worker import TierLoad
from kvserve.model.attention import AttentionBackend, AttentionMetadata
from kvserve.model.llama import LlamaModel
from kvserve.request import Request
from kvserve.runner.input_builder import InputBuilder
from kvserve.runner.sampler import Sampler, SamplingBatch, apply_token_masks
from kvserve.scheduler.plan import PromptScores, SampledToken, StepPlan, StepResult, Tier

if TYPE_CHECKING:  # redis is an optional dependency
    from kvserve.kvstore.redis_tier import RedisTier

SCORE_ROWS = 256  # prompt positions scored (log_softmax over the vocabulary) at once


@dataclass(frozen=True)
class TransferTiming:
    """One copy of cached blocks between the device pool and a lower tier (either way)."""

    tier: str
    num_bytes: int
    seconds: float


class ModelRunner:
    def __init__(self, model: LlamaModel, attention: AttentionBackend,
                 eos_token_ids: tuple[int, ...], kv_store: PagedKVStore | None = None):
        self.model = model
        self.attention = attention
        self.kv_store = kv_store  # the paged pool's tensors (None unless paged)
        self.host_blocks = HostBlockStore(pin_memory=model.device.type == "cuda")  # swapped out
        self.device = model.device
        if self.device.type == "cpu":  # no page faults per op in prefill (kernels/cpu.py)
            cpu_kernels.keep_freed_memory()
        self.eos_token_ids = eos_token_ids
        self.inputs = InputBuilder(self.device,
                                   kv_store.layout.block_size if kv_store is not None else None)
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator | None] = {}
        # swapped-out requests' residual windows (int8/int4), host copies
        self.parked_windows: dict[str, list[torch.Tensor | None]] = {}
        self.disk: DiskTier | None = None  # the prefix cache's disk tier (offload)
        self.redis: RedisTier | None = None  # ... and its shared Redis tier

    def _generator(self, r: Request) -> torch.Generator | None:
        if r.request_id not in self.generators:
            gen = None
            if r.params.seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(r.params.seed)
            self.generators[r.request_id] = gen
        return self.generators[r.request_id]

    def apply_transfers(self, plan: StepPlan) -> list[TransferTiming]:
        """Block copies in plan order (copies off the device first: the blocks they free may
        be handed to others in this same step); a swapped request's residual window (int8/int4)
        travels with its blocks. Requests preempted to recompute lose theirs first. Returns how
        long the host tier's copies took (the cost model's measurements)."""
        for request_id in plan.dropped:
            self.attention.release(request_id)
        # Redis puts read their blocks (in one batch) before anything writes the pool
        puts = [op for op in plan.tier_io if op.op == "put" and self.redis.accepting_puts()]
        if puts:
            batch = self.kv_store.read_blocks(tuple(op.block_id for op in puts))
            for i, op in enumerate(puts):
                self.redis.put(op.keys[0], op.block.token_ids, op.block.tenant,
                               {name: t[:, i:i + 1] for name, t in batch.items()})
        timings = []
        for t in plan.transfers:
            t0 = time.perf_counter()
            if t.dst is Tier.HOST and t.request_id is None:  # the prefix cache's host tier
                parts = self.kv_store.read_blocks(t.block_ids)
                self.host_blocks.keep(t.block_keys, parts)
            elif t.dst is Tier.HOST:  # a swap-out
                parts = self.kv_store.read_blocks(t.block_ids)
                self.host_blocks.put(t.block_keys, parts, owner=t.request_id)
                window = self.kv_store.take_residual(t.request_id)
                if window is not None:
                    self.parked_windows[t.request_id] = window
            elif t.request_id is None:  # a hit in the host tier
                parts = self.host_blocks.copy(t.block_keys)
                self.kv_store.write_blocks(t.block_ids, parts)
            else:  # a swap-in
                parts = self.host_blocks.take(t.block_keys)
                self.kv_store.write_blocks(t.block_ids, parts)
                window = self.parked_windows.pop(t.request_id, None)
                if window is not None:
                    self.kv_store.put_residual(t.request_id, window)
            if t.request_id is None:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                timings.append(TransferTiming(
                    Tier.HOST.value, sum(p.numel() * p.element_size() for p in parts.values()),
                    time.perf_counter() - t0))
        for op in plan.tier_io:  # after the copies, before the host forgets what they write
            if op.op == "write":
                parts = self.host_blocks.blocks.get(op.key)
                if parts is not None:
                    self.disk.write(op.key, op.block.token_ids, op.block.tenant, parts)
            elif op.op == "read":
                self.disk.read(op.key)
            elif op.op == "get":
                self.redis.get_run(list(op.keys))
            elif op.op == "delete":
                self.disk.delete(op.key)
        for key in plan.host_drops:
            self.host_blocks.drop(key)
        return timings

    def wait_loads(self, timeout_s: float) -> None:
        """Sleep until a tier read finishes (or timeout_s): a step loop with nothing to run
        but requests waiting for their blocks gives the readers the CPU instead of spinning."""
        for tier in (self.disk, self.redis):
            if tier is not None and tier.ready.wait(timeout_s):
                return

    def poll_loads(self) -> list[TierLoad]:
        """Reads from the disk and Redis tiers that finished since the last poll: good blocks
        join the host copies (their requests fetch them from there)."""
        loads = []
        for tier in (self.disk, self.redis):
            if tier is not None:
                tier.ready.clear()
                loads += tier.poll()
        for load in loads:
            if load.ok:
                self.host_blocks.blocks[load.key] = load.parts
        return loads

    def execute(self, plan: StepPlan, requests: dict[str, Request]) -> StepResult:
        """The forward pass and sampling of the plan's sequences (its transfers are
        apply_transfers', run before)."""
        step = self.inputs.build(plan)
        meta = step.meta
        sampling = [(s, sl) for s, sl in zip(plan.seqs, meta.seqs) if s.sample]
        # The last row of each sampling sequence is the one whose logits pick its next token.
        sample_rows = [sl.row_start + sl.num_new_tokens - 1 for _, sl in sampling]
        scored = self._prompt_rows(plan, meta, requests)
        rows = torch.tensor(sample_rows + [row for _, _, row_list, _ in scored for row in row_list],
                            dtype=torch.long, device=self.device)
        self.attention.prepare(meta)
        # [num_sampling + num_scored_rows, vocab]
        all_logits = self.model.forward(step.input_ids, step.positions, self.attention, meta,
                                        rows)
        logits = all_logits[:len(sample_rows)]  # [num_seqs, vocab]
        prompt_scores = self._score_prompts(all_logits[len(sample_rows):], scored, requests)
        if not sampling:
            return StepResult((), prompt_scores)
        reqs = [requests[s.request_id] for s, _ in sampling]
        masks = [(i, r.grammar.allowed_bits()) for i, r in enumerate(reqs)
                 if r.grammar is not None]
        if masks:  # structured outputs: only what keeps each text in its grammar
            logits = apply_token_masks(logits, masks)
        sbatch = SamplingBatch.build(
            [r.params for r in reqs], [r.prompt_token_ids for r in reqs],
            [r.output_token_ids for r in reqs],
            [self._generator(r) for r in reqs], self.device,
            eos_token_ids=self.eos_token_ids)
        out = self.sampler(logits, sbatch)
        token_ids = out.token_ids.tolist()
        for i, _ in masks:
            reqs[i].grammar.consume(token_ids[i])
        logprobs = out.logprob_lists([r.params.logprobs for r in reqs])
        return StepResult(tuple(SampledToken(r.request_id, tok, lp)
                                for r, tok, lp in zip(reqs, token_ids, logprobs)), prompt_scores)

    def execute_steps(self, plan: StepPlan, requests: dict[str, Request]) -> list[StepResult]:
        """plan.num_steps greedy decode steps back to back (the scheduler's lookahead gave every
        seq slots for them): step i feeds the tokens step i - 1 picked. One StepResult per
        step, every seq in each (the engine drops what follows a request's stop). The fast
        path runs them all in one C call (LlamaModel.greedy_steps); the reference is one
        execute() per step."""
        bs = self.inputs.block_size
        for s in plan.seqs:
            if bs is None or len(s.block_ids) * bs < s.start_position + plan.num_steps:
                raise RuntimeError(f"sequence {s.request_id} has no slots for "
                                   f"{plan.num_steps} decode steps")
        step = self.inputs.build(plan)
        self.attention.prepare(step.meta)
        fused = self.attention.fused_decode_steps(step.meta, plan.num_steps) \
            if self.fused_steps else None
        if fused is not None:
            tokens = self.model.greedy_steps(step.input_ids, step.positions, plan.num_steps,
                                             fused)
            if tokens is not None:
                return [StepResult(tuple(SampledToken(s.request_id, t)
                                         for s, t in zip(plan.seqs, row))) for row in tokens]
        results: list[StepResult] = []
        fed: dict[str, int] = {}
        for i in range(plan.num_steps):
            results.append(self.execute(plan.decode_step(i, fed), requests))
            fed = {x.request_id: x.token_id for x in results[-1].sampled}
        return results

    fused_steps = True  # tests switch it off to compare with one execute() per step

    @property
    def max_steps_batch(self) -> int:
        """The most sequences execute_steps runs in one fused call here, 0 if none (a bigger
        batch would gain nothing from a multi-step plan: the engine schedules it step by
        step)."""
        if self.attention.fuses_decode_steps() and self.model.fuses_decode_steps:
            return cpu_kernels.MAX_M
        return 0

    @staticmethod
    def _prompt_rows(plan: StepPlan, meta: AttentionMetadata, requests: dict[str, Request]
                     ) -> list[tuple[str, int, list[int], list[int]]]:
        """For prefill chunks of requests that asked for prompt_logprobs: (request id, index of
        the first prompt token scored, the rows whose logits score it and the next ones, the
        prompt tokens those rows predict). Row p's logits predict token p + 1."""
        scored = []
        for s, sl in zip(plan.seqs, meta.seqs):
            r = requests[s.request_id]
            if r.params.prompt_logprobs is None:
                continue
            # Positions already scored (a recompute after preemption, or cache mode "none"
            # feeding the whole sequence each step) are not scored again.
            start = max(s.start_position, len(r.prompt_logprobs) - 1)
            end = min(s.start_position + len(s.token_ids), r.num_prompt_tokens - 1)
            if end <= start:
                continue
            positions = range(start, end)
            scored.append((r.request_id, start + 1,
                           [sl.row_start + p - s.start_position for p in positions],
                           [r.prompt_token_ids[p + 1] for p in positions]))
        return scored

    @staticmethod
    def _score_prompts(logits: torch.Tensor, scored: list[tuple[str, int, list[int], list[int]]],
                       requests: dict[str, Request]) -> tuple[PromptScores, ...]:
        """logits [num_scored_rows, vocab] of the raw model (no penalties or temperature), as
        vLLM's prompt_logprobs."""
        if not scored:
            return ()
        targets = torch.tensor([t for *_, target in scored for t in target], dtype=torch.long,
                               device=logits.device)
        k = max(requests[request_id].params.prompt_logprobs for request_id, *_ in scored)
        chosen, top_values, top_ids = [], [], []
        for lo in range(0, logits.shape[0], SCORE_ROWS):  # bounded memory for long prompts
            part = torch.log_softmax(logits[lo:lo + SCORE_ROWS].float(), dim=-1)  # [rows, vocab]
            chosen += part.gather(-1, targets[lo:lo + SCORE_ROWS].unsqueeze(-1)).squeeze(-1)\
                .tolist()
            if k:
                values, ids = part.topk(k, dim=-1)
                top_values += values.tolist()
                top_ids += ids.tolist()
            else:
                top_values += [[] for _ in range(part.shape[0])]
                top_ids += [[] for _ in range(part.shape[0])]
        out, row = [], 0
        for request_id, first, row_list, _ in scored:
            num = requests[request_id].params.prompt_logprobs
            entries = []
            for _ in row_list:
                entries.append((chosen[row], dict(zip(top_ids[row][:num], top_values[row][:num],
                                                      strict=True))))
                row += 1
            out.append(PromptScores(request_id, first, tuple(entries)))
        return tuple(out)

    def free(self, request_id: str) -> None:
        """Forget what the runner keeps for a request that ended: K/V its backend holds per
        sequence, host copies of its swapped-out blocks, its random generator."""
        self.attention.release(request_id)
        self.host_blocks.release_owner(request_id)
        self.parked_windows.pop(request_id, None)
        self.generators.pop(request_id, None)

    def num_kv_bytes_allocated(self) -> int:
        return self.attention.num_bytes_allocated()
