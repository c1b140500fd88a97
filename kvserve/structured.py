"""Structured outputs: each step, a request with a grammar may only sample tokens that keep its
text inside that grammar (a JSON schema, any JSON object, a regex, a choice of strings, a Lark
grammar). llguidance (Microsoft's Rust grammar engine, no dependencies, CPU) compiles the grammar
and computes the mask of allowed tokens; the runner applies it to the logits before sampling
(runner/sampler.py apply_token_masks) and the sampled token advances the matcher.

Why llguidance and not xgrammar: measured on this CPU for one small JSON schema over the default
model's 49,152-token vocabulary, a mask takes llguidance 44 us and xgrammar 1.8 us (both after a
0.4 s tokenizer set-up), against 7-9 ms for a decode step: either is under 1% of it.
xgrammar's package requires torch, transformers and triton at run time (triton alone is hundreds
of MB of GPU compiler) where llguidance requires nothing, so the server's core depends on
llguidance. benchmarks/bench_structured.py measures the cost per token in the engine.
No torch here.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

from kvserve.errors import InvalidRequestError
from kvserve.request import StructuredOutputs

JSON_OBJECT = '{"type": "object"}'
MAX_COMPILED = 64  # compiled matchers kept (each a few MB at most for the largest specs)
# Compiling a grammar is bounded by llguidance's own limits; these cap what one request may ask
# of its lexer and parser (its defaults are generous for a shared server).
_LIMITS = dict(max_items_in_row=2000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
               step_max_items=50_000, max_lexer_states=100_000, max_grammar_size=500_000)


def _llguidance():
    try:
        import llguidance
    except ImportError as err:  # an install without it: say what to do, once per request
        raise InvalidRequestError("structured outputs need the llguidance package "
                                  "(pip install llguidance)") from err
    return llguidance


def grammar_text(spec: StructuredOutputs) -> str:
    """llguidance's grammar for the spec (a JSON schema compiled, a regex, a Lark grammar)."""
    llg = _llguidance()
    kind = spec.kind
    try:
        if kind in ("json", "json_object"):
            schema = JSON_OBJECT if kind == "json_object" else spec.json
            try:
                json.loads(schema)
            except ValueError as err:
                raise InvalidRequestError(
                    f"{spec.source}: the JSON schema is not JSON: {err}") from None
            return llg.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False})
        if kind == "regex":
            return llg.LLMatcher.grammar_from_regex(spec.regex)
        if kind == "choice":
            return llg.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in spec.choice))
        return llg.LLMatcher.grammar_from_lark(spec.grammar)
    except ValueError as err:
        raise InvalidRequestError(f"{spec.source} ({kind}): {err}") from None


class Grammar:
    """One request's matcher: the mask of tokens it allows next, and the tokens it consumed."""

    def __init__(self, matcher, num_bytes: int):
        self.matcher = matcher
        self.num_bytes = num_bytes  # of the bit mask: ceil(vocab / 8)

    def allowed_bits(self) -> bytes:
        """Bit t (little-endian within each byte) is set when token t may come next."""
        return self.matcher.compute_bitmask()[:self.num_bytes]

    def consume(self, token_id: int) -> None:
        self.matcher.consume_token(token_id)

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (or it failed): the request stops."""
        return self.matcher.is_stopped() or self.matcher.is_error()


class GrammarCompiler:
    """One per engine: the tokenizer llguidance reads (built once, ~0.4 s for a 49k vocabulary)
    and a compiled, unused matcher for each recent spec. Compiling a large schema takes ~0.1 s
    (a 58 KB one: 0.57 s the first time, 0.09 s after); copying a compiled matcher 0.1 ms. The
    server compiles on a worker thread when it validates a request (check()), so the engine
    thread only copies: a client's big schema, or n = 256 samples of it, never stalls a step."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self._json, self.vocab_size, self._eos = tokenizer_json, vocab_size, eos_token_ids
        self._tokenizer = None
        self._lock = threading.Lock()  # the server validates on worker threads
        self._compiled: OrderedDict[StructuredOutputs, object] = OrderedDict()

    @property
    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                llg = _llguidance()
                self._tokenizer = llg.LLTokenizer(self._json, n_vocab=self.vocab_size,
                                                  eos_token=list(self._eos))
            return self._tokenizer

    def matcher(self, spec: StructuredOutputs) -> Grammar:
        """A fresh matcher for the spec: a copy of its compiled one."""
        return Grammar(self.check(spec).deep_copy(), -(-self.vocab_size // 8))

    def check(self, spec: StructuredOutputs):
        """The spec's compiled matcher (compiled now if it is not kept); InvalidRequestError
        naming the problem when the spec does not compile (a bad schema, regex or grammar)."""
        with self._lock:
            compiled = self._compiled.get(spec)
            if compiled is not None:
                self._compiled.move_to_end(spec)
                return compiled
        compiled = self._compile(spec)
        with self._lock:
            self._compiled[spec] = compiled
            while len(self._compiled) > MAX_COMPILED:
                self._compiled.popitem(last=False)
        return compiled

    def _compile(self, spec: StructuredOutputs):
        llg = _llguidance()
        try:
            matcher = llg.LLMatcher(self.tokenizer, grammar_text(spec), log_level=0,
                                    limits=llg.LLParserLimits(**_LIMITS))
        except (ValueError, RuntimeError) as err:
            raise InvalidRequestError(f"{spec.source} ({spec.kind}): {err}") from None
        if matcher.is_error():
            raise InvalidRequestError(f"{spec.source} ({spec.kind}): {matcher.get_error()}")
        return matcher
