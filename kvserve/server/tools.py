"""Structured outputs and tool calls on the wire: a request's response_format, structured_outputs
or guided_* fields become the engine's StructuredOutputs; its tools and tool_choice become the
prompt's tool list, a grammar where the choice forces a call, and the parsing of the text into
OpenAI tool calls (streamed as tool-call deltas).

How calls are asked for and read:
- tool_choice a named function: the text is constrained to that function's arguments (its JSON
  schema); the answer is one call of it.
- "required": the text is constrained to a JSON array of one or more {"name", "arguments"}
  objects (one at most with parallel_tool_calls false), each name one of the tools.
- "auto" (the default with tools): nothing is constrained; the text is read as Hermes-style
  calls, <tool_call>{"name": ..., "arguments": {...}}</tool_call>, the format Qwen, Hermes
  and SmolLM-family templates teach (vLLM's "hermes" parser); anything else is content.
- "none": the tools are shown to the model, nothing is parsed.
A model whose chat template takes `tools` gets them there; for one whose template does not (the
default model's), kvserve puts them in the system message with the call format above.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from kvserve.errors import InvalidRequestError
from kvserve.request import StructuredOutputs
from kvserve.server import protocol as P
from kvserve.server.errors import APIError

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
OPEN_TAG = "<tool_call>"


def structured_of(body: P._Sampling) -> StructuredOutputs | None:
    """The request's own constraint: response_format, structured_outputs or a guided_* field
    (one at most); None when it asks for none (or response_format text)."""
    sources = []
    rf = body.response_format
    if rf is not None and rf.type != "text":
        if rf.type == "json_object":
            sources.append(("response_format", dict(json_object=True)))
        else:
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise APIError(400, "response_format json_schema needs json_schema.schema",
                               param="response_format")
            sources.append(("response_format", dict(json=rf.json_schema.schema_)))
    so = body.structured_outputs
    if so is not None:
        spec = {k: v for k, v in dict(json=so.json_, regex=so.regex, choice=so.choice,
                                      grammar=so.grammar, json_object=so.json_object).items()
                if v not in (None, False)}
        sources.append(("structured_outputs", spec))
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"),
                      ("guided_choice", "choice"), ("guided_grammar", "grammar")):
        value = getattr(body, name)
        if value is not None:
            sources.append((name, {key: value}))
    if not sources:
        return None
    if len(sources) > 1:
        names = ", ".join(n for n, _ in sources)
        raise APIError(400, f"give one structured-output field, not several ({names})",
                       param=sources[1][0])
    name, spec = sources[0]
    try:
        return StructuredOutputs(**spec, source=name)
    except InvalidRequestError as err:
        raise APIError(400, str(err), param=name) from None


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request's tools mean for its prompt, its grammar and its answer."""

    mode: str  # none | auto | required | named
    tools: tuple[dict[str, Any], ...]  # OpenAI tool dicts, for the template
    names: tuple[str, ...]
    name: str | None = None  # the named function
    parallel: bool = True

    @property
    def parses(self) -> bool:
        return self.mode != "none"

    @cached_property
    def grammar(self) -> StructuredOutputs | None:
        """The constraint a forced choice puts on the text (None under auto and none)."""
        if self.mode == "named":
            return StructuredOutputs(json=self._parameters(self.name), source="tools")
        if self.mode != "required":
            return None
        calls = [{"type": "object", "properties": {"name": {"const": n},
                                                   "arguments": self._parameters(n)},
                  "required": ["name", "arguments"], "additionalProperties": False}
                 for n in self.names]
        array: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        if not self.parallel:
            array["maxItems"] = 1
        return StructuredOutputs(json=array, source="tools")

    def _parameters(self, name: str) -> dict[str, Any]:
        fn = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        return fn.get("parameters") or {"type": "object"}


def tool_plan(body: P.ChatCompletionRequest) -> ToolPlan | None:
    """None without tools; 400 for a choice that names no tool, or tools with another
    structured-output field."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    names = tuple(t.function.name for t in body.tools)
    if len(set(names)) != len(names):
        raise APIError(400, "tools have the same function name twice", param="tools")
    tools = tuple(t.model_dump(by_alias=True, exclude_none=True) for t in body.tools)
    if isinstance(choice, P.NamedTool):
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice names '{choice.function.name}', which is not one "
                           f"of the tools ({', '.join(names)})", param="tool_choice")
        plan = ToolPlan("named", tools, names, choice.function.name, body.parallel_tool_calls)
    else:
        plan = ToolPlan(choice or "auto", tools, names, None, body.parallel_tool_calls)
    if plan.grammar is not None and structured_of(body) is not None:
        raise APIError(400, f"tool_choice {plan.mode} constrains the text already: drop "
                       "response_format / structured_outputs", param="tool_choice")
    return plan


def tools_system_text(tools: tuple[dict[str, Any], ...]) -> str:
    """The tools and the call format, for a model whose template has no tools (Hermes')."""
    listing = "\n".join(json.dumps(t, separators=(",", ":")) for t in tools)
    return ("You may call one or more functions to answer. The functions, as JSON signatures, "
            f"are in <tools></tools>:\n<tools>\n{listing}\n</tools>\nTo call a function, answer "
            "with a JSON object of its name and arguments in <tool_call></tool_call> tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
            "</tool_call>")


def template_messages(body: P.ChatCompletionRequest, plan: ToolPlan | None,
                      template_takes_tools: bool) -> list[dict[str, Any]]:
    """The messages as the chat template reads them: text content; for a template without
    tools, the tool list in the system message, earlier calls as <tool_call> text and tool
    results as tool messages' content."""
    messages = []
    for m in body.messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        msg: dict[str, Any] = {"role": m.role, "content": content or ""}
        if m.tool_calls:
            calls = [{"id": c.id, "type": "function",
                      "function": {"name": c.function.name,
                                   "arguments": _loads_or_text(c.function.arguments)}}
                     for c in m.tool_calls]
            if template_takes_tools:
                msg["tool_calls"] = calls
            else:
                msg["content"] = (msg["content"] + "".join(
                    f"{OPEN_TAG}\n" + json.dumps({"name": c["function"]["name"],
                                                  "arguments": c["function"]["arguments"]})
                    + "\n</tool_call>" for c in calls)).strip()
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            msg["name"] = m.name
        messages.append(msg)
    if plan is not None and not template_takes_tools:
        text = tools_system_text(plan.tools)
        if messages and messages[0]["role"] in ("system", "developer"):
            messages[0] = dict(messages[0], content=f"{messages[0]['content']}\n\n{text}")
        else:
            messages.insert(0, {"role": "system", "content": text})
    return messages


def _loads_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_calls(plan: ToolPlan, text: str) -> tuple[str | None, list[P.ToolCall]]:
    """(content, tool calls) read from a finished text. A text that does not parse (cut short
    by max_tokens, or free text under auto) is content, with no calls."""
    if plan.mode == "named":
        if _json_or_none(text) is None:
            return text, []
        return None, [P.ToolCall(id=new_call_id(), function=P.ToolCallFunction(
            name=plan.name, arguments=text))]
    if plan.mode == "required":
        calls = _json_or_none(text)
        if not isinstance(calls, list):
            return text, []
        return None, [_call(c) for c in calls if _is_call(c, plan.names)]
    if plan.mode == "auto":
        found = []
        for match in TOOL_CALL.finditer(text):
            c = _json_or_none(match.group(1))
            if _is_call(c, plan.names):
                found.append(_call(c))
        if found:
            rest = TOOL_CALL.sub("", text).strip()
            return rest or None, found
    return text, []


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _is_call(c: Any, names: tuple[str, ...]) -> bool:
    return isinstance(c, dict) and c.get("name") in names and isinstance(
        c.get("arguments", {}), (dict, str))


def _call(c: dict[str, Any]) -> P.ToolCall:
    args = c.get("arguments", {})
    return P.ToolCall(id=new_call_id(), function=P.ToolCallFunction(
        name=c["name"], arguments=args if isinstance(args, str) else json.dumps(args)))


class ToolStream:
    """One streamed choice's text as tool-call deltas. Named: the call's id and name first,
    then each text delta as an arguments fragment. Required: held, then one delta per call at
    the end. Auto: streamed as content unless it begins with <tool_call>, then held and parsed
    at the end."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.held = ""
        self.started = False  # named: the call's head went out
        self.content = plan.mode in ("auto", "none")  # content unless the text looks like a call
        self.decided = plan.mode == "none"

    def feed(self, text: str, finished: bool) -> list[dict[str, Any]]:
        """The delta dicts (content or tool_calls) to send for this text."""
        plan = self.plan
        if plan.mode == "named":
            out = []
            if not self.started:
                self.started = True
                out.append({"tool_calls": [{"index": 0, "id": new_call_id(), "type": "function",
                                            "function": {"name": plan.name, "arguments": ""}}]})
            if text:
                out.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
            return out
        if self.content:  # auto, streaming content or not decided yet
            if self.decided:
                return [{"content": text}] if text else []
            self.held += text
            head = self.held.lstrip()
            if head.startswith(OPEN_TAG):  # a call: held to the end
                self.decided, self.content = True, False
            elif finished or not OPEN_TAG.startswith(head):
                self.decided = True
                held, self.held = self.held, ""
                return [{"content": held}] if held else []
        else:
            self.held += text
        if not finished:
            return []
        content, calls = parse_calls(plan, self.held)
        if not calls:
            return [{"content": content}] if content else []
        out = [{"tool_calls": [{"index": i, "id": c.id, "type": "function",
                                "function": {"name": c.function.name,
                                             "arguments": c.function.arguments}}]}
               for i, c in enumerate(calls)]
        return ([{"content": content}] if content else []) + out
