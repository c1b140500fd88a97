"""Building OpenAI response pieces from engine outputs: per-choice state, usage, logprobs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kvserve.engine.stream import StreamOutput
from kvserve.server import protocol as P
from kvserve.server.metrics import ServerMetrics
from kvserve.server.state import Tokenizer

Scored = tuple[float, dict[int, float]]
LOGPROB_FLOOR = -9999.0  # JSON has no -Infinity or NaN: an impossible token reports this


def finite(logprob: float) -> float:
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR  # NaN compares False too


@dataclass
class ChoiceState:
    """One of the choices of a response (sample j of prompt i), filled as outputs arrive."""

    index: int
    prompt_text: str | None
    prompt_ids: list[int]
    counts_prompt: bool  # the first sample of its prompt: its prompt counts in usage
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Scored] = field(default_factory=list)
    prompt_logprobs: tuple[Scored | None, ...] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    streamed_chars: int = 0  # completion text already sent as SSE (its logprobs' text_offset)
    echoed: bool = False  # streaming with echo: the prompt chunk has gone out
    _last: StreamOutput | None = None  # last output with tokens (inter-token latency)
    ttft_s: float | None = None  # arrival to first token, for the access log

    def add(self, out: StreamOutput, metrics: ServerMetrics | None = None) -> None:
        if metrics is not None:
            metrics.observe(out, self._last, self.counts_prompt)
        if out.token_ids:
            if self._last is None:
                self.ttft_s = out.time - out.arrival_time
            self._last = out
        self.text += out.text
        self.token_ids.extend(out.token_ids)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason
            self.error = out.error

    def prompt_text_or(self, tok: Tokenizer) -> str:
        if self.prompt_text is None:
            self.prompt_text = tok.decode(self.prompt_ids, skip_special_tokens=False)
        return self.prompt_text


def usage_of(choices: Iterable[ChoiceState], score_only: bool = False) -> P.Usage:
    """Prompts count once (not once per sample); a score-only request generated nothing."""
    choices = list(choices)
    prompt = sum(len(c.prompt_ids) for c in choices if c.counts_prompt)
    completion = 0 if score_only else sum(len(c.token_ids) for c in choices)
    cached = sum(c.num_cached_tokens for c in choices if c.counts_prompt)
    return P.Usage(prompt_tokens=prompt, completion_tokens=completion,
                   total_tokens=prompt + completion,
                   prompt_tokens_details=P.PromptTokensDetails(cached_tokens=cached))


def record_access(counts: dict | None, choices: Iterable[ChoiceState]) -> None:
    """The finished response's token counts and TTFT, for its access-log line."""
    if counts is None:
        return
    choices = list(choices)
    usage = usage_of(choices)
    ttfts = [c.ttft_s for c in choices if c.ttft_s is not None]
    counts.update(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                  cached_tokens=usage.prompt_tokens_details.cached_tokens,
                  ttft_s=min(ttfts) if ttfts else None)


def token_text(tok: Tokenizer, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tok: Tokenizer, token_ids: Sequence[int], logprobs: Sequence[Scored],
                        prompt_ids: Sequence[int] = (),
                        prompt_logprobs: Sequence[Scored | None] | None = None,
                        text_start: int = 0) -> P.CompletionLogprobs:
    """The legacy completions format: with echo the prompt's tokens come first (the very first
    has no log-prob: nothing precedes it); each top_logprobs dict holds the chosen token too."""
    out = P.CompletionLogprobs()
    offset = text_start
    entries: list[tuple[int, Scored | None]] = []
    if prompt_logprobs is not None:
        entries += list(zip(prompt_ids, prompt_logprobs))
    entries += list(zip(token_ids, logprobs))
    for token_id, scored in entries:
        text = token_text(tok, token_id)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if scored is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        chosen, top = finite(scored[0]), scored[1]
        out.token_logprobs.append(chosen)
        alternatives = {token_text(tok, t): finite(lp) for t, lp in top.items()}
        alternatives.setdefault(text, chosen)
        out.top_logprobs.append(alternatives)
    return out


def chat_logprobs(tok: Tokenizer, token_ids: Sequence[int], logprobs: Sequence[Scored],
                  top_n: int) -> P.ChatLogprobs:
    content = []
    for token_id, (chosen, top) in zip(token_ids, logprobs):
        alternatives = [P.TopLogprob(token=token_text(tok, t), logprob=finite(lp),
                                     bytes=tok.token_bytes(t))
                        for t, lp in list(top.items())[:top_n]]
        content.append(P.TokenLogprob(token=token_text(tok, token_id), logprob=finite(chosen),
                                      bytes=tok.token_bytes(token_id),
                                      top_logprobs=alternatives))
    return P.ChatLogprobs(content=content)
