"""argparse flags derived from the engine settings declared in config.py: one flag per setting,
its help, choices and default read off the declaration. No torch."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import Any

from kvserve.config import EngineSetting, engine_settings, parse_memory
from kvserve.errors import KVServeError


def _type(s: EngineSetting) -> Callable[[str], Any]:
    convert: Callable[[str], Any] = {"int": int, "size": _size}.get(s.kind, str)
    if s.normalize is None:
        return convert
    normalize = s.normalize

    def parse(text: str) -> Any:
        try:
            return normalize(text)
        except KVServeError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = s.name  # argparse names the type in its error line
    return parse


def _size(text: str) -> str:
    try:
        parse_memory(text)
    except KVServeError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _help(s: EngineSetting) -> str:
    shown = "on" if s.default is True else "off" if s.default is False else s.default
    text = s.help if s.default is None else f"{s.help} (default: {shown})"
    return text.replace("%", "%%")  # argparse formats help with %


def add_setting_flags(group: argparse._ActionsContainer,
                      names: Iterable[str] | None = None) -> None:
    """Add the flags of the named settings (default: every engine setting with a flag)."""
    wanted = None if names is None else set(names)
    for s in engine_settings():
        if (wanted is None and not s.flag) or (wanted is not None and s.name not in wanted):
            continue
        if s.kind == "bool":
            group.add_argument(s.flag_name, default=s.default, help=_help(s),
                               action=argparse.BooleanOptionalAction)
        else:
            group.add_argument(s.flag_name, default=s.default, type=_type(s), choices=s.choices,
                               help=_help(s))


def setting_values(args: argparse.Namespace) -> dict[str, Any]:
    """The engine settings that the parsed args carry, as LLM(...) / EngineConfig.create
    keywords."""
    return {s.name: getattr(args, s.name) for s in engine_settings() if hasattr(args, s.name)}
