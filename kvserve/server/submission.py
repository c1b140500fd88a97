"""From a parsed request to queued sequences: the checks both endpoints share, its SamplingParams,
tokenizing and the all-or-nothing submit (and abort). Reading the outputs is streaming.py's job.
"""

import asyncio
import dataclasses
import logging
from typing import Any

from kvserve.engine.stream import SequenceInput, Submission
from kvserve.request import SamplingParams, derive_seed
from kvserve.server import protocol as P
from kvserve.server.errors import APIError
from kvserve.server.state import ServerState
from kvserve.server.tools import structured_of

MAX_STOP_STRINGS = 16
# OpenAI request fields that change the answer and that kvserve does not implement: a 400
# naming the field (ignoring them would answer something else than was asked).
REFUSED_FIELDS = {
    "functions": "use tools", "function_call": "use tool_choice",
    "audio": "audio output is not supported", "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "reasoning_effort": "this model has no reasoning modes",
}
log = logging.getLogger("kvserve.server")


def check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(404, f"the model '{model}' does not exist (this server serves "
                       f"'{state.model_name}')", param="model", code="model_not_found")


def check_unsupported(body: P._Sampling, **fields: Any) -> None:
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream: true",
                       param="stream_options")
    if body.logit_bias:  # type: ignore[attr-defined]
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    extra = body.model_extra or {}
    for name in extra:
        if name in REFUSED_FIELDS:
            raise APIError(400, f"{name} is not supported: {REFUSED_FIELDS[name]}", param=name)
    if extra:  # vLLM's behaviour: ignored, and said so
        log.warning("request fields ignored (not known to kvserve): %s",
                    ", ".join(name[:64] for name in sorted(extra)[:16]))
    for name, ok in fields.items():
        if not ok:
            raise APIError(400, f"{name} is not supported", param=name)


def cache_salt(tenant: str | None, salt: str | None) -> str | None:
    """The request's cache salt: its tenant's (its API key's), then its own cache_salt."""
    if tenant is None:
        return salt
    return tenant if salt is None else f"{tenant}/{salt}"


def sampling(body: P._Sampling, max_tokens: int | None, state: ServerState,
             **extra: Any) -> SamplingParams:
    """The request's SamplingParams; its structured outputs from its own fields unless extra
    names them (a tool choice's grammar)."""
    if extra.get("structured_outputs") is None:
        extra["structured_outputs"] = structured_of(body)
    defaults = dict(state.config.generation_defaults)  # --generation-config

    def pick(name: str, neutral: Any) -> Any:
        value = getattr(body, name)
        return value if value is not None else defaults.get(name, neutral)

    if not {"max_tokens", "max_completion_tokens"} & body.model_fields_set \
            and "max_tokens" in defaults:
        max_tokens = defaults["max_tokens"]
    limit = state.engine.max_output_tokens
    if max_tokens is None and limit is not None:
        max_tokens = limit  # "as many as allowed" under a max_output_tokens limit
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are "
                       "allowed", param="stop")
    return SamplingParams(
        n=body.n, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
        top_k=0 if pick("top_k", 0) == -1 else pick("top_k", 0), min_p=pick("min_p", 0.0),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=pick("repetition_penalty", 1.0),
        seed=body.seed, stop=tuple(stop), stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos, max_tokens=max_tokens, min_tokens=body.min_tokens,
        skip_special_tokens=body.skip_special_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output, **extra)


def check_volume(state: ServerState, num_prompts: int, params: SamplingParams) -> None:
    """The per-request limits, checked before any prompt is tokenized: sequences (prompts x n)
    and log-prob entries (n x max_tokens x (top alternatives + the chosen one) per prompt)."""
    limits = state.config
    num_seqs = num_prompts * params.n
    if num_seqs > limits.max_sequences_per_request:
        raise APIError(400, f"the request has {num_seqs} sequences ({num_prompts} prompts x n "
                       f"{params.n}); at most {limits.max_sequences_per_request} are allowed",
                       param="n" if num_prompts == 1 else "prompt")
    if params.logprobs is not None:
        tokens = params.max_tokens or state.max_new_tokens
        entries = num_seqs * tokens * (params.logprobs + 1)
        if entries > limits.max_logprob_entries:
            raise APIError(400, f"the request asks for {entries:,} log-prob entries (sequences "
                           f"x max_tokens x (top_logprobs + 1)); at most "
                           f"{limits.max_logprob_entries:,} are allowed: lower n, max_tokens or "
                           f"top_logprobs", param="logprobs")


async def submit(state: ServerState, request_id: str,
                 prompts: list[tuple[str | None, str | list[int]]], params: SamplingParams,
                 tenant: str | None, salt: str | None) -> tuple[list[SequenceInput], Submission]:
    """Check the request's volume, tokenize and check every prompt (off the event loop), check
    the queues and submit, all or nothing: no await between the queue check and the submit, so
    no other request can take the room in between."""
    check_volume(state, len(prompts), params)
    checked = []
    for _, prompt in prompts:
        checked.append(await asyncio.to_thread(state.engine.validate, prompt, params))
    seqs = []
    for i, ((text, _), ids) in enumerate(zip(prompts, checked)):
        for j in range(params.n):
            p = params
            if j > 0:  # sample 0 scores the prompt (echo); the others may reuse its blocks
                p = dataclasses.replace(
                    p, prompt_logprobs=None,
                    seed=None if p.seed is None else derive_seed(p.seed, j))
            seqs.append(SequenceInput(f"{request_id}-{i}-{j}", ids, p, text, salt, tenant))
    state.engine.check_queue(len(seqs), tenant)
    return seqs, state.engine.submit(seqs)


def abort(state: ServerState, submission: Submission) -> None:
    for request_id in submission.request_ids:
        state.engine.abort(request_id)  # a no-op for finished ones
