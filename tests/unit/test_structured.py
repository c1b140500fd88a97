"""Structured outputs below the server: the bit-mask unpacking against its one-token-at-a-time
definition, masked logits, the spec's own checks, and the engine on the tiny model: a regex, a
choice and a JSON schema hold for greedy and sampled text, n > 1 samples each keep their own
matcher, the request stops when the grammar is complete even with ignore_eos, and a spec that
does not compile is an InvalidRequestError before anything is queued."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.errors import InvalidRequestError
from kvserve.request import MAX_GRAMMAR_BYTES, StructuredOutputs
from kvserve.runner.sampler import apply_token_masks, reference_token_mask, token_mask_rows


@pytest.mark.parametrize("vocab", [1, 7, 8, 61, 200, 203])
def test_mask_rows_equal_their_definition(vocab):
    rng = np.random.default_rng(vocab)
    masks = [
        (i, rng.integers(0, 256, size=-(-min(vocab, 190) // 8), dtype=np.uint8).tobytes())
        for i in range(3)
    ]
    rows = token_mask_rows(masks, vocab)
    assert rows.shape == (3, vocab) and rows.dtype == bool
    for (_, m), row in zip(masks, rows):
        assert row.tolist() == reference_token_mask(m, vocab)  # past the bits: not allowed


def test_masked_rows_get_minus_inf_and_the_rest_stay():
    logits = torch.randn(4, 20)
    mask = bytes([0b00000101, 0, 0b10000000])  # tokens 0, 2 and 23 (past the vocab)
    out = apply_token_masks(logits, [(1, mask), (3, bytes([0xFF, 0xFF, 0xFF]))])
    assert torch.equal(out[[0, 2]], logits[[0, 2]]) and torch.equal(out[3], logits[3])
    assert torch.isfinite(out[1]).tolist() == [t in (0, 2) for t in range(20)]
    assert torch.equal(out[1, [0, 2]], logits[1, [0, 2]])


def test_specs_are_checked():
    assert StructuredOutputs(json={"type": "object"}).json == '{"type": "object"}'
    assert StructuredOutputs(choice=["a", "b"]).choice == ("a", "b")
    for bad, match in [
        (dict(), "exactly one"),
        (dict(regex="a", choice=["b"]), "exactly one"),
        (dict(choice=[]), "choice"),
        (dict(choice=["a", ""]), "choice"),
        (dict(regex="a" * (MAX_GRAMMAR_BYTES + 1)), "at most"),
        (dict(json={"x": float("nan")}), "not JSON"),
    ]:
        with pytest.raises(InvalidRequestError, match=match):
            StructuredOutputs(**bad)
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured_outputs=StructuredOutputs(regex="a+"))


@pytest.fixture(scope="module")
def llm(tiny_hf_dir) -> LLM:
    return LLM(model=str(tiny_hf_dir), block_size=4, max_num_seqs=8)


def _texts(llm, spec, n=1, temperature=0.0, **kw):
    params = SamplingParams(
        n=n, max_tokens=40, temperature=temperature, seed=7, structured_outputs=spec, **kw
    )
    return [
        c
        for o in llm.generate(["the cache", "a block of"], params, use_tqdm=False)
        for c in o.outputs
    ]


def test_regex_choice_and_schema_hold_greedy_and_sampled(llm):
    for temperature in (0.0, 1.0):
        for c in _texts(
            llm, StructuredOutputs(regex=r"[0-9]{3}-[a-z]{2}"), temperature=temperature
        ):
            assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", c.text) and c.finish_reason == "stop"
        for c in _texts(
            llm, StructuredOutputs(choice=["alpha", "beta gamma"]), n=3, temperature=temperature
        ):
            assert c.text in ("alpha", "beta gamma")
        schema = {
            "type": "object",
            "properties": {
                "k": {"enum": ["x", "y"]},
                "n": {"type": "integer", "minimum": 0, "maximum": 99},
            },
            "required": ["k", "n"],
            "additionalProperties": False,
        }
        for c in _texts(llm, StructuredOutputs(json=schema), temperature=temperature):
            value = json.loads(c.text)
            assert value["k"] in ("x", "y") and 0 <= value["n"] <= 99


def test_unconstrained_text_differs(llm):
    free = (
        llm.generate(["the cache"], SamplingParams(max_tokens=10, temperature=0.0), use_tqdm=False)[
            0
        ]
        .outputs[0]
        .text
    )
    assert not re.fullmatch(r"[0-9]{3}-[a-z]{2}", free)


def test_a_complete_grammar_stops_even_with_ignore_eos(llm):
    (c, _) = _texts(llm, StructuredOutputs(choice=["done"]), ignore_eos=True)
    assert c.text == "done" and c.finish_reason == "stop" and len(c.token_ids) < 40


@pytest.mark.parametrize(
    "spec",
    [
        StructuredOutputs(regex="(unclosed"),
        StructuredOutputs(json={"type": "nope"}),
        StructuredOutputs(grammar="start: undefined_rule"),
    ],
)
def test_a_spec_that_does_not_compile_is_refused_before_queueing(llm, spec):
    engine = llm.engine
    with pytest.raises(InvalidRequestError, match="structured outputs"):
        engine.add_request("bad", "the cache", SamplingParams(structured_outputs=spec))
    assert "bad" not in engine.requests and not engine.has_unfinished_requests()


def test_a_spec_compiles_once_and_the_engine_thread_only_copies(llm, monkeypatch):
    """Validation compiles (the server does it on a worker thread); adding the request, and
    each of its n samples, copies the compiled matcher: a big schema never stalls a step."""
    grammars = llm.engine.grammars
    calls = []
    compile_ = grammars._compile
    monkeypatch.setattr(grammars, "_compile", lambda spec: calls.append(spec) or compile_(spec))
    spec = StructuredOutputs(regex=r"[0-9]{2}-compiled-once")
    params = SamplingParams(n=4, max_tokens=20, temperature=1.0, structured_outputs=spec)
    llm.engine.check_fits(3, params)  # what validate() runs
    outs = llm.generate(["the cache"], params, use_tqdm=False)[0].outputs
    assert len(calls) == 1 and len(outs) == 4
    assert all(re.fullmatch(r"[0-9]{2}-compiled-once", o.text) for o in outs)
