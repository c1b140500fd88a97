"""POST /v1/chat/completions: checks a chat request, renders its messages with the model's chat
template, submits the prompt (n samples) and answers with JSON or SSE chunks. Routing is app.py's.
"""

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from kvserve.engine.stream import SequenceInput, StreamOutput, Submission
from kvserve.errors import InvalidRequestError
from kvserve.server import protocol as P
from kvserve.server.errors import APIError, param_of
from kvserve.server.responses import ChoiceState, chat_logprobs, usage_of
from kvserve.server.state import ServerState
from kvserve.server.streaming import chunk, collect, json_response, stream, usage_options
from kvserve.server.submission import (
    cache_salt,
    check_model,
    check_unsupported,
    sampling,
    submit,
)


async def create_chat_completion(state: ServerState, body: P.ChatCompletionRequest,
                                 raw: Request, tenant: str | None):
    _check(state, body)
    try:
        prompt_ids = await asyncio.to_thread(chat_prompt, state, body)
    except InvalidRequestError as err:
        raise APIError(400, str(err), param="messages") from None
    request_id = P.new_id("chatcmpl")
    seqs, submission = await _submit(state, body, request_id, prompt_ids, tenant)
    choices = {s.request_id: ChoiceState(i, None, s.token_ids, i == 0)
               for i, s in enumerate(seqs)}
    answer = _Chat(state, body, request_id, choices)
    if not body.stream:
        if not await collect(state, raw, submission, choices):
            return Response(status_code=499)
        return await json_response(answer.response)
    return stream(state, submission, choices, answer.roles(), answer.render,
                  answer.usage_chunk)


def _check(state: ServerState, body: P.ChatCompletionRequest) -> None:
    check_model(state, body.model)
    check_unsupported(body)
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, name)
        if value is not None and value > state.max_new_tokens:
            raise APIError(400, f"{name} ({value}) is over this server's limit "
                           f"({state.max_new_tokens}: max_model_len - 1 or max_output_tokens)",
                           param=name)


def chat_prompt(state: ServerState, body: P.ChatCompletionRequest) -> list[int]:
    messages = []
    for m in body.messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        messages.append({"role": m.role, "content": content or ""})
    # cheap first: no template rendering or tokenizing of text that cannot fit the context
    state.engine.check_text_length("".join(m["content"] for m in messages))
    tok = state.tokenizer
    if body.continue_final_message:
        if body.add_generation_prompt:
            raise APIError(400, "continue_final_message needs add_generation_prompt false",
                           param="continue_final_message")
        if messages[-1]["role"] != "assistant":
            raise APIError(400, "continue_final_message needs a final assistant message",
                           param="messages")
    text = tok.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)
    if body.continue_final_message:  # end the prompt where the final message's text ends
        final = messages[-1]["content"]
        cut = text.rfind(final) if final else -1
        if cut >= 0:
            text = text[:cut + len(final)]
    return tok.encode(text, add_special_tokens=False)


async def _submit(state: ServerState, body: P.ChatCompletionRequest, request_id: str,
                  prompt_ids: list[int],
                  tenant: str | None) -> tuple[list[SequenceInput], Submission]:
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    params = sampling(body, max_tokens, state,
                      logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    try:
        return await submit(state, request_id, [(None, prompt_ids)], params, tenant,
                            cache_salt(tenant, body.cache_salt))
    except InvalidRequestError as err:  # the chat endpoint has no "prompt": name its field
        param = param_of(str(err))
        raise APIError(400, str(err), param="messages" if param == "prompt" else param,
                       code="context_length_exceeded" if "max_model_len" in str(err)
                       else None) from None


class _Chat:
    """One chat response under way: its choices as JSON, or as SSE chunks."""

    def __init__(self, state: ServerState, body: P.ChatCompletionRequest, request_id: str,
                 choices: dict[str, ChoiceState]):
        self.body, self.request_id, self.choices = body, request_id, choices
        self.model, self.tok = state.model_name, state.tokenizer
        self.created = P.now_s()
        self.top_n = body.top_logprobs or 0
        self.include_usage, self.continuous = usage_options(body)

    def response(self) -> P.ChatCompletionResponse:
        body, tok = self.body, self.tok
        return P.ChatCompletionResponse(
            id=self.request_id, created=self.created, model=self.model,
            choices=[P.ChatChoice(index=c.index, message=P.AssistantMessage(content=c.text),
                                  logprobs=chat_logprobs(tok, c.token_ids, c.logprobs,
                                                         self.top_n)
                                  if body.logprobs else None,
                                  finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                     for c in self.choices.values()],
            usage=usage_of(self.choices.values()))

    def chunk(self, choice_list: list[dict[str, Any]],
              usage: P.Usage | None = None) -> dict[str, Any]:
        if usage is None and self.continuous:
            usage = usage_of(self.choices.values())
        return chunk(self.request_id, "chat.completion.chunk", self.created, self.model,
                     self.include_usage, choice_list, usage)

    def roles(self) -> list[dict[str, Any]]:
        """The first chunk of each choice: its role, no content yet."""
        return [self.chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])
                for c in self.choices.values()]

    def render(self, c: ChoiceState, out: StreamOutput) -> list[dict[str, Any]]:
        lp = None
        if self.body.logprobs and out.logprobs is not None:
            lp = chat_logprobs(self.tok, out.token_ids, out.logprobs, self.top_n).model_dump()
        if not (out.text or out.finished or lp is not None):
            return []
        return [self.chunk([{"index": c.index,
                             "delta": {"content": out.text} if out.text else {},
                             "logprobs": lp,
                             "finish_reason": out.finish_reason if out.finished else None,
                             "stop_reason": out.stop_reason if out.finished else None}])]

    def usage_chunk(self) -> dict[str, Any] | None:
        return self.chunk([], usage_of(self.choices.values())) if self.include_usage else None

