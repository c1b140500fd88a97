"""Requests and what they produce: SamplingParams, Request, RequestStatus, RequestOutput.

No torch here: the scheduler and block bookkeeping read these without a model. Sampling itself
(the tensors) lives in runner/sampler.py.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from dataclasses import dataclass, field

from kvserve.errors import InvalidRequestError

# Bounds that catch absurd values early with a clear message (vLLM accepts any finite value for
# some of these; a user who types temperature=1e9 almost certainly made a mistake).
MAX_TEMPERATURE = 100.0
MAX_PENALTY = 100.0
MAX_N = 128
MAX_LOGPROBS = 20
MAX_TOKEN_ID = 2**31 - 1  # bounds top_k and token ids: they become int64 tensors
# Each id is checked every step, by every sample: a client must not make that cost unbounded.
MAX_STOP_TOKEN_IDS = 64
# Below this a temperature is greedy (vLLM's _SAMPLING_EPS): logits / 1e-38 overflow to inf, and
# the softmax of inf is NaN.
SAMPLING_EPS = 1e-5


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


# A grammar is compiled for each request that asks for one: bound what a client can make the
# compiler chew on (vLLM and llguidance leave it unbounded).
MAX_GRAMMAR_BYTES = 64 * 1024
MAX_CHOICES = 256


@dataclass(frozen=True)
class StructuredOutputs:
    """Constrain the generated text, as vLLM's StructuredOutputsParams: exactly one of a JSON
    schema (a dict or its JSON text), any JSON object (json_object), a regular expression, a list
    of strings to choose from, or a Lark grammar. kvserve/structured.py compiles it."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    # where it came from, named first in a compile error ("response_format", "tool_choice")
    source: str = field(default="structured outputs", compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):
            try:
                object.__setattr__(self, "json", _json_text(self.json))
            except (TypeError, ValueError) as err:
                raise InvalidRequestError(f"the JSON schema is not JSON: {err}") from None
        if self.choice is not None:
            _check(isinstance(self.choice, (list, tuple)) and len(self.choice) > 0
                   and all(isinstance(c, str) and c for c in self.choice),
                   "choice must be a list of non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))
            _check(len(self.choice) <= MAX_CHOICES,
                   f"choice has {len(self.choice)} strings; at most {MAX_CHOICES} are allowed")
        kinds = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object else []
        _check(len(kinds) == 1, "structured outputs take exactly one of json, json_object, "
               f"regex, choice and grammar, got {len(kinds)}" + (f" ({', '.join(kinds)})"
                                                                    if kinds else ""))
        for name in ("json", "regex", "grammar"):
            value = getattr(self, name)
            _check(value is None or isinstance(value, str), f"{name} must be a string")
        size = sum(len(str(getattr(self, k) or "")) for k in ("json", "regex", "grammar")) + \
            sum(map(len, self.choice or ()))
        _check(size <= MAX_GRAMMAR_BYTES, f"the structured-output spec has {size:,} characters; "
               f"at most {MAX_GRAMMAR_BYTES:,} are allowed")

    @property
    def kind(self) -> str:
        return next(k for k in ("json", "json_object", "regex", "choice", "grammar")
                    if getattr(self, k) not in (None, False))


def _json_text(value: dict) -> str:
    return json.dumps(value, allow_nan=False)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop; names and defaults follow vLLM's SamplingParams."""

    n: int = 1
    temperature: float = 1.0  # 0.0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    logprobs: int | None = None  # number of top alternatives to return per generated token
    # Log-probs of the prompt's own tokens (and this many top alternatives) as the model scores
    # them: what echo + logprobs and loglikelihood tools need. Such a request takes no prefix
    # cache hits (a cached position was never scored).
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Constrain the text to a JSON schema, a regex, a choice or a grammar (kvserve/structured.py)
    structured_outputs: StructuredOutputs | None = None

    def __post_init__(self) -> None:
        # Accept a single string / list for stop and a list for stop_token_ids, like vLLM.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.stop_token_ids is None:
            object.__setattr__(self, "stop_token_ids", ())
        else:
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:
        _check(_is_int(self.n) and 1 <= self.n <= MAX_N, f"n must be an integer in [1, {MAX_N}], "
               f"got {self.n!r}")
        _check(_is_num(self.temperature) and 0.0 <= self.temperature <= MAX_TEMPERATURE,
               f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}")
        _check(_is_num(self.top_p) and 0.0 < self.top_p <= 1.0,
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(_is_int(self.top_k) and 0 <= self.top_k <= MAX_TOKEN_ID,
               f"top_k must be a non-negative integer (0 or -1 disables), got {self.top_k!r}")
        _check(_is_num(self.min_p) and 0.0 <= self.min_p <= 1.0,
               f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_num(value) and -2.0 <= value <= 2.0,
                   f"{name} must be in [-2, 2], got {value!r}")
        _check(_is_num(self.repetition_penalty) and 0.0 < self.repetition_penalty <= MAX_PENALTY,
               f"repetition_penalty must be in (0, {MAX_PENALTY:g}], "
               f"got {self.repetition_penalty!r}")
        _check(self.seed is None or _is_int(self.seed), f"seed must be an integer, got "
               f"{self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop),
               "stop must be a list of non-empty strings")
        _check(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
               f"stop_token_ids has {len(self.stop_token_ids)} ids; at most "
               f"{MAX_STOP_TOKEN_IDS} are allowed")
        _check(all(_is_int(t) and 0 <= t <= MAX_TOKEN_ID for t in self.stop_token_ids),
               f"stop_token_ids must be integers in [0, {MAX_TOKEN_ID}]")
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
               f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0,
               f"min_tokens must be a non-negative integer, got {self.min_tokens!r}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
               f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        _check(self.logprobs is None or (_is_int(self.logprobs)
                                         and 0 <= self.logprobs <= MAX_LOGPROBS),
               f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        _check(self.structured_outputs is None
               or isinstance(self.structured_outputs, StructuredOutputs),
               "structured_outputs must be a StructuredOutputs")
        _check(self.structured_outputs is None or self.min_tokens == 0,
               "min_tokens cannot be combined with structured outputs (the grammar decides "
               "where the text may end)")
        _check(self.prompt_logprobs is None or (_is_int(self.prompt_logprobs)
                                                and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
               f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], "
               f"got {self.prompt_logprobs!r}")

    @property
    def greedy(self) -> bool:
        """Temperature 0, or so close to it that dividing by it would overflow."""
        return self.temperature < SAMPLING_EPS

    def plain(self, num_output: int) -> bool:
        """Nothing but top-k/p, min-p and temperature acts on the logits after num_output
        tokens: no penalty, no min_tokens mask pending, no logprobs (the sampler's fast path;
        greedy too, the scheduler's multi-step plans)."""
        return (self.repetition_penalty == 1.0 and self.frequency_penalty == 0.0
                and self.presence_penalty == 0.0 and self.logprobs is None
                and num_output >= self.min_tokens)


def derive_seed(seed: int, sample_index: int) -> int:
    """The seed of sample i of a seeded request with n > 1: sample 0 keeps the user's seed."""
    if sample_index == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"


class RequestStatus(enum.IntEnum):
    """Ordered: every status past RUNNING is finished."""

    WAITING = 0
    RUNNING = 1
    FINISHED_STOPPED = 2
    FINISHED_LENGTH = 3
    FINISHED_ABORTED = 4

    @property
    def finished(self) -> bool:
        return self > RequestStatus.RUNNING


@dataclass(eq=False)
class Request:
    """One sequence being generated. Owns its tokens and how many of them have K/V computed.
    Compared by identity: queues find requests by id, never by comparing every field."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    # Top-`logprobs` alternatives per generated token: [(chosen_logprob, {token_id: logprob})].
    output_logprobs: list[tuple[float, dict[int, float]]] = field(default_factory=list)
    # With params.prompt_logprobs: entry i scores prompt token i (entry 0 is None: nothing
    # precedes it); filled as prefill chunks run.
    prompt_logprobs: list[tuple[float, dict[int, float]] | None] = field(default_factory=list)
    # [0, num_computed_tokens) have K/V in the cache; the rest is fed in the next step.
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    output_text: str = ""
    num_preemptions: int = 0
    max_num_blocks: int = 0  # most KV blocks it held at once (paged cache)
    num_emitted_chars: int = 0  # output_text[:num_emitted_chars] has gone out as stream deltas
    # Incremental detokenization (engine/detokenizer.py): output_text has the text of output
    # tokens [0, read); the next step decodes tokens [prefix, read) again as left context.
    detok_prefix_offset: int = 0
    detok_read_offset: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    # Prefix caching: the tenant whose cached blocks this request may reuse (None: the shared
    # space), the chained keys of its full blocks so far (block i covers tokens
    # [i * block_size, (i + 1) * block_size)), and the prompt tokens its first admission found
    # cached (None until admitted).
    cache_salt: str | None = None
    # Fair scheduling: whose turn this request waits for (the server's API-key tenant); None:
    # the shared default. Independent of cache_salt, which a client may choose.
    tenant: str | None = None
    block_keys: list[bytes] = field(default_factory=list)
    num_cached_tokens: int | None = None
    # Structured outputs: the request's grammar matcher (kvserve/structured.py Grammar), which
    # masks its logits each step and consumes each sampled token
    grammar: object | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without copying the whole sequence (the
        scheduler asks every step, usually for one decode token at the end)."""
        num_prompt = len(self.prompt_token_ids)
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt:end - num_prompt]
        return self.prompt_token_ids[start:end] + self.output_token_ids[:max(0, end - num_prompt)]


@dataclass(frozen=True)
class CompletionOutput:
    """One of the n samples of a prompt."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: tuple[tuple[float, dict[int, float]], ...] | None = None


PromptLogprobs = tuple[tuple[float, dict[int, float]] | None, ...]


@dataclass(frozen=True)
class RequestOutput:
    """What generate() returns per prompt. `.text`/`.token_ids`/`.finish_reason` are the first
    sample's, for the common n == 1 case; `.outputs` holds all n."""

    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    outputs: tuple[CompletionOutput, ...]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    prompt_logprobs: PromptLogprobs | None = None  # with SamplingParams.prompt_logprobs

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


def check_text_length(text: str, max_model_len: int, max_token_bytes: int) -> None:
    """Refuse, without tokenizing it, a text certainly longer than the context: no token spans
    more than max_token_bytes bytes of text, so a text of more than max_model_len times that
    many bytes has more tokens than fit (InvalidRequestError)."""
    limit = max_model_len * max_token_bytes
    if 4 * len(text) <= limit:  # UTF-8 takes at most 4 bytes a character: no need to count
        return
    if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
        raise InvalidRequestError(
            f"prompt has more than {limit:,} bytes of text, certainly more tokens than the "
            f"context length (max_model_len) of {max_model_len}")
