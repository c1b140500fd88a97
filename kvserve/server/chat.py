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
from kvserve.server.tools import ToolPlan, ToolStream, parse_calls, template_messages, tool_plan


async def create_chat_completion(state: ServerState, body: P.ChatCompletionRequest,
                                 raw: Request, tenant: str | None):
    _check(state, body)
    plan = tool_plan(body)
    try:
        prompt_ids = await asyncio.to_thread(chat_prompt, state, body, plan)
    except InvalidRequestError as err:
        raise APIError(400, str(err), param="messages") from None
    request_id = P.new_id("chatcmpl")
    seqs, submission = await _submit(state, body, request_id, prompt_ids, tenant, plan)
    choices = {s.request_id: ChoiceState(i, None, s.token_ids, i == 0)
               for i, s in enumerate(seqs)}
    answer = _Chat(state, body, request_id, choices, plan)
    if not body.stream:
        if not await collect(state, raw, submission, choices):
            return Response(status_code=499)
        return await json_response(answer.response)
    return stream(state, submission, choices, answer.roles(), answer.render,
                  answer.usage_chunk, access_counts(raw))


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


def chat_prompt(state: ServerState, body: P.ChatCompletionRequest,
                plan: ToolPlan | None = None) -> list[int]:
    tok = state.tokenizer
    takes_tools = "tools" in (tok.chat_template or "")
    messages = template_messages(body, plan, takes_tools)
    # cheap first: no template rendering or tokenizing of text that cannot fit the context
    state.engine.check_text_length("".join(str(m["content"]) for m in messages))
    if body.continue_final_message:
        if body.add_generation_prompt:
            raise APIError(400, "continue_final_message needs add_generation_prompt false",
                           param="continue_final_message")
        if messages[-1]["role"] != "assistant":
            raise APIError(400, "continue_final_message needs a final assistant message",
                           param="messages")
    kwargs = {"tools": list(plan.tools)} if plan is not None and takes_tools else {}
    text = tok.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt,
                                   **kwargs)
    if body.continue_final_message:  # end the prompt where the final message's text ends
        final = messages[-1]["content"]
        cut = text.rfind(final) if final else -1
        if cut >= 0:
            text = text[:cut + len(final)]
    return tok.encode(text, add_special_tokens=False)


async def _submit(state: ServerState, body: P.ChatCompletionRequest, request_id: str,
                  prompt_ids: list[int], tenant: str | None,
                  plan: ToolPlan | None) -> tuple[list[SequenceInput], Submission]:
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    params = sampling(body, max_tokens, state,
                      logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                      structured_outputs=plan.grammar if plan is not None else None)
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
                 choices: dict[str, ChoiceState], plan: ToolPlan | None):
        self.body, self.request_id, self.choices = body, request_id, choices
        self.plan = plan if plan is not None and plan.parses else None
        self.tool_streams = {c.index: ToolStream(self.plan) for c in choices.values()} \
            if self.plan is not None else {}
        self.model, self.tok = state.model_name, state.tokenizer
        self.created = P.now_s()
        self.top_n = body.top_logprobs or 0
        self.include_usage, self.continuous = usage_options(body)

    def response(self) -> P.ChatCompletionResponse:
        body, tok = self.body, self.tok
        return P.ChatCompletionResponse(
            id=self.request_id, created=self.created, model=self.model,
            choices=[P.ChatChoice(index=c.index, message=self._message(c),
                                  logprobs=chat_logprobs(tok, c.token_ids, c.logprobs,
                                                         self.top_n)
                                  if body.logprobs else None,
                                  finish_reason=self._finish_reason(c),
                                  stop_reason=c.stop_reason)
                     for c in self.choices.values()],
            usage=usage_of(self.choices.values()))

    def _message(self, c: ChoiceState) -> P.AssistantMessage:
        if self.plan is None:
            return P.AssistantMessage(content=c.text)
        content, calls = parse_calls(self.plan, c.text)
        return P.AssistantMessage(content=content, tool_calls=calls or None)

    def _finish_reason(self, c: ChoiceState) -> str | None:
        """"tool_calls" when a required or auto call was made (OpenAI keeps "stop" for a named
        tool_choice)."""
        if (self.plan is not None and c.finish_reason == "stop"
                and self.plan.mode in ("required", "auto") and parse_calls(self.plan, c.text)[1]):
            return "tool_calls"
        return c.finish_reason

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
        if c.index in self.tool_streams:
            deltas = self.tool_streams[c.index].feed(out.text, out.finished)
        else:
            deltas = [{"content": out.text}] if out.text else []
        if not (deltas or out.finished or lp is not None):
            return []
        deltas = deltas or [{}]
        reason = self._finish_reason(c) if out.finished else None
        return [self.chunk([{"index": c.index, "delta": delta,
                             "logprobs": lp if i == 0 else None,
                             "finish_reason": reason if i == len(deltas) - 1 else None,
                             "stop_reason": out.stop_reason if out.finished
                             and i == len(deltas) - 1 else None}])
                for i, delta in enumerate(deltas)]

    def usage_chunk(self) -> dict[str, Any] | None:
        return self.chunk([], usage_of(self.choices.values())) if self.include_usage else None

