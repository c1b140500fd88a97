"""Renders a model's own jinja2 chat template the way Hugging Face does (sandboxed, trim_blocks,
lstrip_blocks, loopcontrols, raise_exception / tojson / strftime_now), with one-line errors.

Which template and which BOS/EOS strings to use is the tokenizer's business.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvserve.errors import InvalidRequestError


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    """Compiled the way Hugging Face does (sandboxed, trim_blocks, lstrip_blocks, loopcontrols)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def template_syntax_error(source: str) -> str | None:
    """Why a template does not compile (None: it does)."""
    try:
        _compile_template(source)
    except jinja2.exceptions.TemplateSyntaxError as err:
        return f"line {err.lineno}: {err.message}"
    return None


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content} objects")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise InvalidRequestError(f"messages[{i}] must be an object with a string 'role'")
        if not isinstance(msg.get("content"), str):
            raise InvalidRequestError(f"messages[{i}].content must be a string")


def render_chat_template(template: str, messages: Any, *, add_generation_prompt: bool = True,
                         **variables: Any) -> str:
    """`messages` (a list of {role, content} with string content) -> the prompt string."""
    _check_messages(messages)
    try:
        compiled = _compile_template(template)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise InvalidRequestError(f"the model's chat template is invalid: {err}") from None
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **variables)
    except (jinja2.exceptions.TemplateError, TypeError, ValueError, KeyError, IndexError) as err:
        raise InvalidRequestError(f"chat template rejected the messages: {err}") from None
