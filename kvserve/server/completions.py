"""POST /v1/completions: checks a completion request, submits its prompts (n samples each) and
answers with one JSON response or SSE chunks, echo and logprobs included. Routing is app.py's.
"""

import dataclasses
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from kvserve.engine.stream import StreamOutput
from kvserve.request import SamplingParams
from kvserve.server import protocol as P
from kvserve.server.errors import APIError
from kvserve.server.responses import ChoiceState, completion_logprobs, usage_of
from kvserve.server.state import ServerState
from kvserve.server.streaming import (
    access_counts,
    chunk,
    collect,
    json_response,
    stream,
    usage_options,
)
from kvserve.server.submission import (
    cache_salt,
    check_model,
    check_unsupported,
    sampling,
    submit,
)


async def create_completion(state: ServerState, body: P.CompletionRequest, raw: Request,
                            tenant: str | None):
    check_model(state, body.model)
    check_unsupported(body, suffix=not body.suffix,
                      best_of=body.best_of is None or body.best_of == body.n)
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens must be at least 1 (0 is only allowed with echo, to "
                       "score the prompt)", param="max_tokens")
    prompts = completion_prompts(body.prompt)
    params = _params(state, body)
    request_id = P.new_id("cmpl")
    seqs, submission = await submit(state, request_id, prompts, params, tenant,
                                    cache_salt(tenant, body.cache_salt))
    choices = {s.request_id: ChoiceState(index, prompts[index // params.n][0], s.token_ids,
                                         index % params.n == 0)
               for index, s in enumerate(seqs)}
    answer = _Completion(state, body, request_id, choices)
    if not body.stream:
        if not await collect(state, raw, submission, choices):
            return Response(status_code=499)  # nobody is left to read it
        return await json_response(answer.response)
    return stream(state, submission, choices, [], answer.render, answer.usage_chunk,
                  access_counts(raw))


def completion_prompts(prompt: Any) -> list[tuple[str | None, Any]]:
    """(text or None, what to tokenize) per prompt of a completion request."""
    if isinstance(prompt, str):
        return [(prompt, prompt)]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [(None, list(prompt))]
    if all(isinstance(p, str) for p in prompt):
        return [(p, p) for p in prompt]
    return [(None, list(p)) for p in prompt]


def _params(state: ServerState, body: P.CompletionRequest) -> SamplingParams:
    """max_tokens 0 (with echo) scores the prompt only: one token is made and dropped."""
    score_only = body.max_tokens == 0
    want_prompt_logprobs = body.echo and body.logprobs is not None
    params = sampling(body, 1 if score_only else body.max_tokens, state,
                      logprobs=body.logprobs,
                      prompt_logprobs=body.logprobs if want_prompt_logprobs else None)
    if score_only:  # nothing asked of the dropped token may fail the request
        params = dataclasses.replace(params, min_tokens=0)
    return params


class _Completion:
    """One completion response under way: its choices as JSON, or as SSE chunks."""

    def __init__(self, state: ServerState, body: P.CompletionRequest, request_id: str,
                 choices: dict[str, ChoiceState]):
        self.body, self.request_id, self.choices = body, request_id, choices
        self.model, self.tok = state.model_name, state.tokenizer
        self.created = P.now_s()
        self.score_only = body.max_tokens == 0
        self.include_usage, self.continuous = usage_options(body)

    def usage(self) -> P.Usage:
        return usage_of(self.choices.values(), self.score_only)

    def choice(self, c: ChoiceState) -> P.CompletionChoice:
        body, tok = self.body, self.tok
        text = (c.prompt_text_or(tok) if body.echo else "") + ("" if self.score_only else c.text)
        logprobs = None
        if body.logprobs is not None:
            out_ids, out_lps = ([], []) if self.score_only else (c.token_ids, c.logprobs)
            logprobs = completion_logprobs(tok, out_ids, out_lps, c.prompt_ids,
                                           c.prompt_logprobs if body.echo else None)
        return P.CompletionChoice(index=c.index, text=text, logprobs=logprobs,
                                  finish_reason=c.finish_reason, stop_reason=c.stop_reason)

    def response(self) -> P.CompletionResponse:
        return P.CompletionResponse(
            id=self.request_id, created=self.created, model=self.model,
            choices=[self.choice(c) for c in self.choices.values()], usage=self.usage())

    def chunk(self, c: ChoiceState, text: str, logprobs: P.CompletionLogprobs | None,
              out: StreamOutput | None = None) -> dict[str, Any]:
        finished = out is not None and out.finished
        return chunk(self.request_id, "text_completion", self.created, self.model,
                     self.include_usage, [{
                         "index": c.index, "text": text,
                         "logprobs": logprobs.model_dump() if logprobs is not None else None,
                         "finish_reason": out.finish_reason if finished else None,
                         "stop_reason": out.stop_reason if finished else None}],
                     self.usage() if self.continuous else None)

    def render(self, c: ChoiceState, out: StreamOutput) -> list[dict[str, Any]]:
        body, tok = self.body, self.tok
        payloads = []
        if body.echo and not c.echoed:  # the prompt is scored once prefill is done
            c.echoed = True
            lp = None
            if body.logprobs is not None:
                lp = completion_logprobs(tok, [], [], c.prompt_ids, c.prompt_logprobs)
            echo = c.prompt_text_or(tok)
            c.streamed_chars += len(echo)
            payloads.append(self.chunk(c, echo, lp))
        text = "" if self.score_only else out.text
        lp = None
        if body.logprobs is not None and not self.score_only:
            lp = completion_logprobs(tok, out.token_ids, out.logprobs or (),
                                     text_start=c.streamed_chars)
        if text or out.finished or lp is not None:
            c.streamed_chars += len(text)
            payloads.append(self.chunk(c, text, lp, out))
        return payloads

    def usage_chunk(self) -> dict[str, Any] | None:
        return chunk(self.request_id, "text_completion", self.created, self.model, True, [],
                     self.usage()) if self.include_usage else None
