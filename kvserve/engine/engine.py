"""The engine loop: requests in, one scheduled step at a time, RequestOutputs out.

step() = scheduler.schedule() -> runner.execute(plan) -> scheduler.update() -> detokenize and stop
strings -> outputs. The engine owns that loop and the validation of what enters it; it leaves
batching decisions to the scheduler and every tensor to the runner.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvserve.config import SINKS_CONTEXT_FACTOR, EngineConfig
from kvserve.engine.capacity_report import capacity_report
from kvserve.engine.detokenizer import Detokenizer
from kvserve.engine.kv_check import check_kv_format
from kvserve.engine.kv_setup import build_kv
from kvserve.engine.tier_setup import build_lower_tiers
from kvserve.errors import ConfigError, InvalidRequestError
from kvserve.kvcache.events import BlockEvent
from kvserve.kvcache.snapshot import CacheSnapshot, EventCounts, KVQuality
from kvserve.kvcache.tiers import LoadResult, TierBlock
from kvserve.model.chat_template import template_syntax_error
from kvserve.model.llama import LlamaModel
from kvserve.model.loader import load_checkpoint, model_fingerprint
from kvserve.request import (
    CompletionOutput,
    FinishReason,
    Request,
    RequestOutput,
    SamplingParams,
    check_text_length,
)
from kvserve.runner.model_runner import ModelRunner
from kvserve.scheduler.plan import StepPlan, StepResult, Tier
from kvserve.scheduler.scheduler import Scheduler
from kvserve.structured import GrammarCompiler

DEBUG = os.environ.get("KVSERVE_DEBUG") == "1"  # check block invariants after every step
log = logging.getLogger("kvserve.engine")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RequestDelta:
    """What one step added to one request: for streaming front ends."""

    request_id: str
    new_text: str
    new_token_ids: tuple[int, ...]
    finished: bool
    error: str | None = None  # the step failed for this request alone: it ended, aborted


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device '{name}' requested but CUDA is not available in this torch build")
    return torch.device(name)


def read_chat_template(path: str) -> str:
    """--chat-template: the file's Jinja text (ConfigError naming the file otherwise)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read --chat-template {path!r}: "
                          f"{getattr(err, 'strerror', None) or err}") from None
    if not text.strip():
        raise ConfigError(f"--chat-template {path!r} is empty")
    problem = template_syntax_error(text)
    if problem is not None:
        raise ConfigError(f"--chat-template {path!r} is not a valid Jinja template: {problem}")
    return text


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = TORCH_DTYPES[config.dtype]
        if config.threads is not None:  # torch's pool; the C kernels take torch's count
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)  # the stream unseeded requests sample from
        t0 = time.perf_counter()
        ckpt = load_checkpoint(config.model, config.resolved_quantization)
        self.model_name = ckpt.spec.name
        self.spec = ckpt.spec
        self.tokenizer = ckpt.tokenizer
        if config.chat_template is not None:
            self.tokenizer.chat_template = read_chat_template(config.chat_template)
        self.model = LlamaModel.from_checkpoint(ckpt, self.dtype, self.device)
        del ckpt
        self.load_time_s = time.perf_counter() - t0
        log.info("model %s loaded in %.2f s; %s; %d CPU threads", self.model_name,
                 self.load_time_s, self.model.weights_description(), torch.get_num_threads())
        context = self.spec.max_position_embeddings
        if config.cache.cache_policy == "sinks":  # a sequence may outrun the context
            self.max_model_len = config.scheduler.max_model_len or SINKS_CONTEXT_FACTOR * context
        else:
            self.max_model_len = min(config.scheduler.max_model_len or context, context)
        # Cached blocks are keyed by what made their K/V: the weights, the KV format and its
        # residual window (what earlier layers' attention read in float32).
        window = config.cache.residual_window_tokens
        model_key = "|".join((config.model or self.model_name, config.dtype,
                              config.cache.resolved_kv_cache_dtype(config.dtype))
                             + ((f"window={window}",) if window else ()))
        kv = build_kv(config.cache, self.spec, config.dtype, self.device, self.max_model_len,
                      model_key, config.scheduler.max_num_seqs,
                      config.scheduler.max_num_batched_tokens, tiers=config.offload.enabled)
        self.kv_cache_dtype = kv.kv_cache_dtype
        self.kv_bytes_per_token = kv.layout.bytes_per_token
        self.kv_quality: KVQuality | None = None  # the guardrail's measure (quantized KV)
        if kv.kv_store is not None and kv.kv_store.quantized and \
                config.cache.kv_quant_check != "off":
            self.kv_quality = check_kv_format(
                self.model, self.tokenizer, kv.kv_cache_dtype, kv.kv_store.codecs,
                config.cache.block_size, config.cache.residual_window_tokens,
                self.spec.max_position_embeddings,
                config.cache.kv_quant_check, model_fingerprint(config.model))
        self.block_manager = kv.block_manager
        if self.block_manager is not None and self.block_manager.policy.name != "full":
            log.info("KV retention: %s; max_model_len %d", self.block_manager.policy.description,
                     self.max_model_len)
        if kv.layout.groups is not None:
            log.info("KV groups: %s", kv.layout.groups.describe())
        if self.block_manager is not None:
            log.info("%s", capacity_report(
                config, self.spec, self.max_model_len, self.kv_cache_dtype, kv.budget_bytes,
                self.block_manager.pool.num_blocks, kv.layout.page_layers))
        self.runner = ModelRunner(self.model, kv.attention, self.tokenizer.eos_token_ids,
                                  kv.kv_store)
        if config.offload.enabled:
            identity = f"{model_fingerprint(config.model)}|{model_key}"
            lower, disk, redis = build_lower_tiers(config, self.model, kv.kv_store, identity)
            self.block_manager.lower, self.runner.disk, self.runner.redis = lower, disk, redis
            self.model.num_kv_projections = 0  # the probe's are no request's
            for t in lower.snapshots():
                log.info("offload: %s tier of %d blocks (%d held), %.2f GB/s; prefill %.2f "
                         "ms/token", t.name, t.capacity_blocks, t.num_blocks,
                         t.bytes_per_s / 1e9, lower.prefill.per_token_s * 1e3)
        self.scheduler = Scheduler(config.scheduler, self.max_model_len, kv.attention.retains_kv,
                                   self.tokenizer.eos_token_ids, self.block_manager)
        # multi-step plans: what one fused call per plan saves; none where the runner has none
        self.scheduler.max_steps_batch = self.runner.max_steps_batch
        if not self.scheduler.max_steps_batch:
            self.scheduler.max_steps = 1
        self.detokenizer = Detokenizer(self.tokenizer)
        self._grammars: GrammarCompiler | None = None  # built on the first structured request
        self.requests: dict[str, Request] = {}
        self.peak_kv_bytes = 0
        self.peak_blocks_used = 0  # after a step's allocations, before its finished requests free

    # -- requests in -------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            self.check_text_length(prompt)
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
            vocab = self.spec.vocab_size
            if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab
                   for t in token_ids):
                raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})")
        if not token_ids:
            raise InvalidRequestError("prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(token_ids)} tokens but the context length (max_model_len) is "
                f"{self.max_model_len}: nothing left to generate")
        return token_ids

    def check_text_length(self, text: str) -> None:
        """Refuse, without tokenizing it, a text certainly longer than the context."""
        check_text_length(text, self.max_model_len, self.tokenizer.max_token_bytes)

    def add_request(self, request_id: str, prompt: str | Sequence[int],
                    params: SamplingParams, prompt_text: str | None = None,
                    cache_salt: str | None = None, tenant: str | None = None) -> Request:
        """Validate and queue one sequence (n > 1 is expanded by the caller into n requests).
        A cache_salt confines its prefix-cache hits to blocks made under the same salt; a
        tenant is whose turn it waits for in the scheduler's round robin."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id '{request_id}' is already in use")
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise InvalidRequestError("cache_salt must be a non-empty string")
        token_ids = self.encode_prompt(prompt)
        self.check_fits(len(token_ids), params)
        text = prompt if isinstance(prompt, str) else prompt_text
        r = Request(request_id, token_ids, params, prompt=text, arrival_time=time.monotonic(),
                    cache_salt=cache_salt, tenant=tenant)
        if params.structured_outputs is not None:
            r.grammar = self.grammars.matcher(params.structured_outputs)
        if params.prompt_logprobs is not None:
            r.prompt_logprobs.append(None)  # the first token has nothing before it to score it
        self.requests[request_id] = r
        self.scheduler.add(r)
        return r

    def check_fits(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Reject up front what could never finish (past the context, bigger than the pool) and
        what the capacity limits forbid, naming the limit and its value."""
        limits = self.config.scheduler
        if limits.max_input_tokens is not None and num_prompt_tokens > limits.max_input_tokens:
            raise InvalidRequestError(
                f"prompt has {num_prompt_tokens} tokens, over the max_input_tokens limit "
                f"({limits.max_input_tokens})")
        if limits.max_output_tokens is not None and (
                params.max_tokens is None or params.max_tokens > limits.max_output_tokens):
            raise InvalidRequestError(
                f"max_tokens ({params.max_tokens}) is over the max_output_tokens limit "
                f"({limits.max_output_tokens})")
        if params.max_tokens is not None and (
                num_prompt_tokens + params.max_tokens > self.max_model_len):
            raise InvalidRequestError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({params.max_tokens}) = "
                f"{num_prompt_tokens + params.max_tokens} exceeds max_model_len "
                f"({self.max_model_len})")
        if self.block_manager is not None:
            total = num_prompt_tokens + (params.max_tokens or self.max_model_len)
            need = self.block_manager.most_blocks_held(
                min(total, self.max_model_len), self.config.scheduler.max_num_batched_tokens)
            if need > self.block_manager.pool.num_blocks:
                raise InvalidRequestError(
                    f"request needs {need} KV blocks but the whole pool has "
                    f"{self.block_manager.pool.num_blocks} (kv_cache_memory)")
        if params.structured_outputs is not None:  # a spec that does not compile: 400 now
            self.grammars.check(params.structured_outputs)

    @property
    def grammars(self) -> GrammarCompiler:
        """Structured outputs' compiler over this model's tokenizer (built on first use)."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer.backend.to_str(),
                                             self.spec.vocab_size, self.tokenizer.eos_token_ids)
        return self._grammars

    def abort_request(self, request_id: str) -> None:
        r = self.requests.pop(request_id, None)
        if r is not None and not r.status.finished:
            self.scheduler.finish(r, FinishReason.ABORT)
        self.runner.free(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        lower = self.block_manager.lower if self.block_manager is not None else None
        if lower is not None and (lower.disk is not None or lower.redis):
            lower.loaded([LoadResult(x.tier, x.key, x.ok, TierBlock(x.token_ids, x.tenant),
                                     x.num_bytes, x.seconds, x.reason, x.rate_sample)
                          for x in self.runner.poll_loads()])
        plan = self.scheduler.schedule()
        try:
            timings = self.runner.apply_transfers(plan)  # even an empty step may preempt
        except Exception:
            self._forget_unwritten(plan)
            raise
        for t in timings:  # the cost model follows the real copies
            lower.observe_transfer(t.tier, t.num_bytes, t.seconds)
        if not plan.seqs:
            if lower is not None and lower.loading:  # only reads to wait for: sleep on them
                self.runner.wait_loads(0.005)
            return []
        if plan.num_steps > 1:
            return self._multi_step(plan)
        t0 = time.perf_counter()
        result, failed = self._execute(plan)
        if all(len(s.token_ids) == 1 for s in plan.seqs):  # a decode step: its pace
            self.scheduler.observe_decode_step(time.perf_counter() - t0)
        if lower is not None and not failed and all(len(s.token_ids) > 1 for s in plan.seqs):
            # a step of prefills only: how fast this model recomputes, now
            lower.prefill.observe_many([(len(s.token_ids), s.start_position) for s in plan.seqs],
                                       time.perf_counter() - t0)
        if failed:
            plan = dataclasses.replace(
                plan, seqs=tuple(s for s in plan.seqs if s.request_id not in failed))
        return self._apply(plan, result, failed)

    def _multi_step(self, plan: StepPlan) -> list[RequestDelta]:
        """A plan of plan.num_steps greedy decode steps (scheduler._lookahead): the runner
        computes them all, then each is applied as its own step would have been (stops, stop
        strings, the prefix cache's blocks), a request's tokens after its stop dropped; one
        delta per request. If the steps raise, the plan runs as a single step instead, which
        isolates the failure to the request that raises."""
        try:
            t0 = time.perf_counter()
            results = self.runner.execute_steps(plan, self.requests)
            self.scheduler.observe_decode_step((time.perf_counter() - t0) / plan.num_steps)
        except Exception:  # noqa: BLE001 - rerun below as one step, isolated per request
            # off for good: a failure that repeats would otherwise cost every plan a try
            log.warning("a multi-step decode failed: running it as a single step, and one step "
                        "per plan from now on", exc_info=True)
            self.scheduler.max_steps = 1
            single = dataclasses.replace(plan, num_steps=1)
            result, failed = self._execute(single)
            return self._apply(dataclasses.replace(
                single, seqs=tuple(s for s in single.seqs if s.request_id not in failed)),
                result, failed)
        merged: dict[str, RequestDelta] = {}
        fed: dict[str, int] = {}
        for i, result in enumerate(results):
            running = {s.request_id for s in plan.seqs
                       if not self.requests[s.request_id].status.finished}
            if not running:
                break
            sub = plan.decode_step(i, fed, running)
            kept = StepResult(tuple(x for x in result.sampled if x.request_id in running))
            for d in self._apply(sub, kept, {}):
                m = merged.get(d.request_id)
                merged[d.request_id] = d if m is None else dataclasses.replace(
                    m, new_text=m.new_text + d.new_text,
                    new_token_ids=m.new_token_ids + d.new_token_ids, finished=d.finished)
            fed = {x.request_id: x.token_id for x in result.sampled}
        return list(merged.values())

    def _apply(self, plan: StepPlan, result: StepResult,
               failed: dict[str, str]) -> list[RequestDelta]:
        """A step's results into its requests: computed counts and tokens, stops, deltas."""
        self.peak_kv_bytes = max(self.peak_kv_bytes, self.runner.num_kv_bytes_allocated())
        if self.block_manager is not None:
            self.peak_blocks_used = max(self.peak_blocks_used,
                                        self.block_manager.pool.num_used_blocks)
            if DEBUG:
                self.block_manager.check_invariants()
        finished = {r.request_id for r in self.scheduler.update(plan, result)}
        deltas = self._fail(failed)
        for sampled in result.sampled:
            r = self.requests[sampled.request_id]
            detok = self.detokenizer.update(r, r.status.finished)
            if detok.stop_string is not None:
                # The text was cut at the stop string: that is why the request ended, even if
                # EOS or max_tokens ended it in the same step (vLLM reports it the same way).
                self.scheduler.finish(r, FinishReason.STOP, detok.stop_string)
                finished.add(r.request_id)
            deltas.append(RequestDelta(r.request_id, detok.delta, (sampled.token_id,),
                                       r.status.finished))
        for request_id in finished:
            self.runner.free(request_id)
        return deltas

    def _forget_unwritten(self, plan: StepPlan) -> None:
        """The plan's copies failed: blocks it was to fetch from a tier are indexed already
        (requests admitted in the same step share them), so they leave the index before any
        later request can hit K/V that never arrived."""
        index = self.block_manager.prefix_index if self.block_manager is not None else None
        if index is None:
            return
        for t in plan.transfers:
            if t.dst is Tier.DEVICE and t.request_id is None:
                for b in t.block_ids:
                    index.evict(b)

    def _execute(self, plan: StepPlan) -> tuple[StepResult, dict[str, str]]:
        """Run the step; if it raises, run its sequences one at a time so that only those that
        fail alone fail (each with its own error, never another request's details); the
        others' results stand. K/V writes go to each sequence's own slots, so running a
        sequence again only rewrites them."""
        try:
            return self.runner.execute(plan, self.requests), {}
        except Exception as err:  # noqa: BLE001 - isolated and reported below
            if len(plan.seqs) == 1:
                log.exception("step failed for request %s", plan.seqs[0].request_id)
                return StepResult(()), {plan.seqs[0].request_id: _error_text(err)}
            log.warning("a step of %d sequences failed (%s); retrying them one at a time",
                        len(plan.seqs), type(err).__name__)
        sampled, scores, failed = [], [], {}
        for s in plan.seqs:
            try:
                one = self.runner.execute(dataclasses.replace(plan, seqs=(s,), transfers=()),
                                          self.requests)
            except Exception as err:  # noqa: BLE001
                log.exception("step failed for request %s", s.request_id)
                failed[s.request_id] = _error_text(err)
                continue
            sampled += one.sampled
            scores += one.prompt_scores
        return StepResult(tuple(sampled), tuple(scores)), failed

    def _fail(self, failed: dict[str, str]) -> list[RequestDelta]:
        """End the requests whose step failed; their deltas carry their own error."""
        deltas = []
        for request_id, error in failed.items():
            r = self.requests[request_id]
            self.scheduler.finish(r, FinishReason.ABORT)
            self.runner.free(request_id)
            deltas.append(RequestDelta(request_id, "", (), True, error))
        return deltas

    def pop_finished(self, request_id: str) -> Request:
        """Hand a finished request to the caller and forget it."""
        return self.requests.pop(request_id)

    # -- outputs -----------------------------------------------------------------------------
    def make_output(self, request_id: str, samples: Sequence[Request]) -> RequestOutput:
        first = samples[0]
        outputs = tuple(
            CompletionOutput(
                index=i, text=r.output_text, token_ids=tuple(r.output_token_ids),
                finish_reason=r.finish_reason.value if r.finish_reason else None,
                stop_reason=r.stop_reason,
                logprobs=tuple(r.output_logprobs) if r.params.logprobs is not None else None)
            for i, r in enumerate(samples))
        return RequestOutput(
            request_id=request_id, prompt=first.prompt,
            prompt_token_ids=tuple(first.prompt_token_ids), outputs=outputs,
            finished=all(r.status.finished for r in samples),
            num_cached_tokens=first.num_cached_tokens or 0,
            prompt_logprobs=(tuple(first.prompt_logprobs)
                             if first.params.prompt_logprobs is not None else None),
            metrics={**request_metrics(first), "num_blocks": float(first.max_num_blocks),
                     "num_preemptions": float(first.num_preemptions)})

    def close(self) -> None:
        """Write what the disk tier does not hold yet (the host tier's cached blocks, then the
        pool's) and wait for every write: a restart on the same directory finds them all."""
        m = self.block_manager
        lower = m.lower if m is not None else None
        if self.runner.redis is not None:
            self.runner.redis.drain()  # its puts are already queued (write-through)
        disk = self.runner.disk
        if lower is None or disk is None:
            return
        for key, block in list(lower.host.entries.items()):
            parts = self.runner.host_blocks.blocks.get(key)
            if key not in lower.disk and parts is not None:
                disk.write(key, block.token_ids, block.tenant, parts)
                for gone, _ in lower.disk.insert(key, block):  # past disk_offload_size
                    disk.delete(gone)
        for key, cached in list(m.prefix_index.index.items()):
            if key not in lower.disk:
                parts = self.runner.kv_store.read_blocks((cached.block_id,))
                disk.write(key, cached.token_ids, cached.tenant, parts)
                for gone, _ in lower.disk.insert(key, TierBlock(cached.token_ids,
                                                                cached.tenant)):
                    disk.delete(gone)
        disk.drain()

    def evict_prefix_cache(self, to: str = "host") -> int:
        """Move every cached block that no request holds out of the device pool, down to tier
        `to` and forgotten in the tiers above it: "host" (copied there), "disk" (through the
        host, written down) or "redis" (where write-through already put it: the host copies
        are dropped and the disk's entries deleted). What a lab does to measure a fetch from
        one tier; the copies run with the next step. Returns the blocks that left the pool."""
        m = self.block_manager
        lower = m.lower if m is not None else None
        tiers = ("host",) + (("disk",) if lower is not None and lower.disk is not None else ()) \
            + (("redis",) if lower is not None and lower.redis else ())
        if lower is None or to not in tiers:
            raise ConfigError(f"evict_prefix_cache(to={to!r}): this engine's tiers are "
                              f"{', '.join(tiers) if lower is not None else 'none'}")
        n = m.evict_cached()
        if to != "host":
            lower.demote_host(drop=to == "redis")
        if to == "redis":
            lower.forget_disk()
        return n

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block of the device pool (blocks in use keep their K/V
        for their requests); the tiers below keep theirs (a cold run with tiers: a new
        cache_salt). False if prefix caching is off."""
        return self.block_manager is not None and self.block_manager.reset_prefix_index()

    def reset_counters(self) -> None:
        """Zero the peaks and the K/V projection count (a lab starts measuring from here)."""
        self.peak_kv_bytes = 0
        self.peak_blocks_used = 0
        self.model.num_kv_projections = 0

    def cache_snapshot(self, with_requests: bool = False) -> CacheSnapshot:
        """The KV cache now, as an immutable value: bytes, pool, prefix index, block events
        (and each live request's blocks when with_requests)."""
        live = [r for r in self.requests.values() if not r.status.finished]
        m = self.block_manager
        stored = 0 if not self.runner.attention.retains_kv else sum(  # released ones aside
            r.num_computed_tokens - (m.num_tokens_released(r.request_id) if m else 0)
            for r in live)
        return CacheSnapshot(
            cache_mode=self.config.cache.cache_mode, kv_cache_dtype=self.kv_cache_dtype,
            retention=m.policy.name if m is not None else "full",
            bytes_per_token=self.kv_bytes_per_token,
            num_bytes_allocated=self.runner.num_kv_bytes_allocated(),
            peak_bytes_allocated=self.peak_kv_bytes, num_tokens_stored=stored,
            num_preemptions=self.scheduler.num_preemptions,
            pool=m.pool_snapshot(self.peak_blocks_used) if m is not None else None,
            prefix=m.prefix_snapshot() if m is not None else None,
            events=m.event_counts() if m is not None else EventCounts(),
            requests=m.request_blocks(live) if m is not None and with_requests else (),
            quant_check=self.kv_quality,
            tiers=m.lower.snapshots() if m is not None and m.lower is not None else ())

    def record_kv_events(self) -> None:
        """Keep block events for drain_kv_events() from now on (until then only their counts
        are kept: an engine nobody drains holds no events)."""
        if self.block_manager is not None:
            self.block_manager.events.recording = True

    def drain_kv_events(self) -> tuple[BlockEvent, ...]:
        """Block stored / evicted / freed events recorded since the last drain, oldest first."""
        return self.block_manager.events.drain() if self.block_manager is not None else ()


def _error_text(err: Exception) -> str:
    return f"engine error: {type(err).__name__}: {err}"


def request_metrics(r: Request) -> dict[str, float]:
    """TTFT and decode speed of one request, in seconds and tokens per second."""
    m: dict[str, float] = {}
    if r.first_token_time is not None:
        m["ttft_s"] = r.first_token_time - r.arrival_time
    if r.finish_time is not None and r.first_token_time is not None:
        decode_s = r.finish_time - r.first_token_time
        m["decode_s"] = decode_s
        if len(r.output_token_ids) > 1 and decode_s > 0:
            m["decode_tokens_per_s"] = (len(r.output_token_ids) - 1) / decode_s
    return m
