"""Incremental detokenization and stop strings: token ids in, stable text deltas out.

Text that ends in an incomplete UTF-8 character (a byte-level BPE token can split one) is held back
until the next token completes it. A stop string (looked for once min_tokens tokens exist) ends
the request; the text is cut before it (or after it with include_stop_str_in_output), and no
delta ever shows text past the cut.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvserve.model.tokenizer import Tokenizer
from kvserve.request import Request

_REPLACEMENT = "\ufffd"


@dataclass
class DetokenizeResult:
    delta: str
    stop_string: str | None  # the stop string found this step, if any


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def update(self, r: Request, finished: bool) -> DetokenizeResult:
        """Recompute r.output_text from its tokens; return what is new for streaming.

        r.output_text: [0, num_emitted_chars) sent as deltas | [num_emitted_chars, len) held back
        because it could still be the start of a stop string.
        """
        p = r.params
        text = self.tokenizer.decode(r.output_token_ids, skip_special_tokens=p.skip_special_tokens)
        if not finished and text.endswith(_REPLACEMENT):
            text = text.rstrip(_REPLACEMENT)  # wait for the rest of the character
        previous = r.output_text
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
        sent = previous[:r.num_emitted_chars]
        if not text.startswith(sent):
            # A later token changed how earlier bytes decode (rare): never retract sent text.
            text = sent + text[len(sent):] if len(text) > len(sent) else sent
        r.output_text = text
        hold = 0
        if p.stop and not p.include_stop_str_in_output and not finished and stop_string is None:
            hold = _longest(p.stop) - 1  # a stop string's first chars must never go out
        emit_to = max(r.num_emitted_chars, len(text) - hold)
        delta = text[r.num_emitted_chars:emit_to]
        r.num_emitted_chars = emit_to
        return DetokenizeResult(delta, stop_string)


def _longest(stops: tuple[str, ...]) -> int:
    return max(len(s) for s in stops)


def _first_stop(text: str, stops: tuple[str, ...], search_from: int) -> tuple[int, str] | None:
    best = None
    for s in stops:
        index = text.find(s, search_from)
        if index != -1 and (best is None or index < best[0]):
            best = (index, s)
    return best
