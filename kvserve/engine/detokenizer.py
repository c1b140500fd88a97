"""Incremental detokenization and stop strings: token ids in, stable text deltas out.

A step decodes a few tokens, never the whole output (the vLLM/TGI scheme): the tokens from
r.detok_prefix_offset on, without and with those added since r.detok_read_offset; the new text is
what the second decode has past the first. The tokens before read_offset are left context, so a
token whose text depends on the one before it (SentencePiece's leading space, a byte-level BPE
token that completes a character) decodes as it does in the whole output. An incomplete UTF-8
character at the end (a byte-level BPE token can split one) is held back until the next token
completes it, and the window does not move past it till then. A stop string (looked for once
min_tokens tokens exist) ends the request; the text is cut before it (or after it with
include_stop_str_in_output), and no delta ever shows text past the cut.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvserve.model.tokenizer import Tokenizer
from kvserve.request import Request

_REPLACEMENT = "\ufffd"
_MAX_WINDOW = 12  # tokens decoded per step past which the window is moved on anyway


@dataclass
class DetokenizeResult:
    delta: str
    stop_string: str | None  # the stop string found this step, if any


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def update(self, r: Request, finished: bool) -> DetokenizeResult:
        """Extend r.output_text with the text of its new tokens; return what is new for streaming.

        r.output_text: [0, num_emitted_chars) sent as deltas | [num_emitted_chars, len) held back
        because it could still be the start of a stop string.
        """
        p = r.params
        previous = r.output_text
        text, redone = self._extend(r, finished)
        stop_string = None
        if p.stop and len(r.output_token_ids) > p.min_tokens:
            # Stop strings count once min_tokens tokens exist (as in vLLM); only the tail can
            # hold one that was not there before.
            search_from = max(0, len(previous) - _longest(p.stop) + 1)
            hit = _first_stop(text, p.stop, search_from)
            if hit is not None:
                index, stop_string = hit
                text = text[:index + len(stop_string)] if p.include_stop_str_in_output \
                    else text[:index]
        sent = r.num_emitted_chars
        if len(text) < sent or (redone and text[:sent] != previous[:sent]):
            # A later token changed how earlier text decodes (rare), or a stop string that only
            # now counts (min_tokens) lies in sent text: never retract what went out.
            text = previous[:sent] + text[sent:] if len(text) > sent else previous[:sent]
        r.output_text = text
        if finished or stop_string is not None:
            # Whatever was held back went out with the text: a repeated call adds nothing.
            r.detok_prefix_offset = r.detok_read_offset = len(r.output_token_ids)
        hold = 0
        if p.stop and not p.include_stop_str_in_output and not finished and stop_string is None:
            hold = _longest(p.stop) - 1  # a stop string's first chars must never go out
        emit_to = max(sent, len(text) - hold)
        delta = text[sent:emit_to]
        r.num_emitted_chars = emit_to
        return DetokenizeResult(delta, stop_string)

    def _extend(self, r: Request, finished: bool) -> tuple[str, bool]:
        """r.output_text with the new tokens' text (less a trailing incomplete character unless
        finished), and whether text before them was redone; moves the offsets on.

        Invariant: r.output_text ends with the text of tokens [prefix, read) decoded together,
        less its trailing U+FFFD (a character still waiting for bytes never goes in), and every
        character before that belongs to tokens before prefix.
        """
        ids = r.output_token_ids
        n = len(ids)
        read = min(r.detok_read_offset, n)
        start = min(r.detok_prefix_offset, read)
        skip = r.params.skip_special_tokens
        before = self.tokenizer.decode(ids[start:read], skip_special_tokens=skip) \
            if read > start else ""
        if n == read:  # no new token (a recomputed request): only a finish can add text
            return (r.output_text + before[len(before.rstrip(_REPLACEMENT)):]
                    if finished else r.output_text), False
        window = self.tokenizer.decode(ids[start:], skip_special_tokens=skip)
        settled = before.rstrip(_REPLACEMENT)  # the window's text already in r.output_text
        new = window if finished else window.rstrip(_REPLACEMENT)
        previous = r.output_text
        if new.startswith(settled):
            r.detok_read_offset = n
            if not before.endswith(_REPLACEMENT) and len(window) > len(before):
                # The tokens up to read end on a whole character and the new ones add text: they
                # are left context enough for the next step.
                r.detok_prefix_offset = read
            elif n - start > _MAX_WINDOW:
                # Only undecodable bytes (or tokens without text) for a while: move on if the
                # tokens before read decode the same without the new ones (their U+FFFD final).
                tail = self.tokenizer.decode(ids[read:], skip_special_tokens=skip)
                if window == before + tail and (tail or not before.endswith(_REPLACEMENT)):
                    r.detok_prefix_offset = read
                    return previous + before[len(settled):] + new[len(before):], False
            if n - start <= 4 * _MAX_WINDOW:
                return previous + new[len(settled):], False
        elif not finished and n - start <= _MAX_WINDOW:
            # The new tokens changed how the window's earlier text decodes (SentencePiece's byte
            # fallback makes a whole run of byte tokens U+FFFD until its last character is
            # complete): wait for the next token.
            return previous, False
        # Undecodable for too long: the window's text goes in as it is now (U+FFFD included), and
        # its last token stays as left context if it decodes alone as it does in the window.
        last = self.tokenizer.decode(ids[n - 1:], skip_special_tokens=skip)
        keep = bool(last) and window.endswith(last) and not last.endswith(_REPLACEMENT)
        r.detok_prefix_offset, r.detok_read_offset = (n - 1 if keep else n), n
        return previous[:max(0, len(previous) - len(settled))] + window, True


def _longest(stops: tuple[str, ...]) -> int:
    return max(len(s) for s in stops)


def _first_stop(text: str, stops: tuple[str, ...], search_from: int) -> tuple[int, str] | None:
    best = None
    for s in stops:
        index = text.find(s, search_from)
        if index != -1 and (best is None or index < best[0]):
            best = (index, s)
    return best
