"""The engine end to end on the tiny random-weight Llama, continued: streaming and the
detokenizer, prompt forms and ordering, and the engine's accounting (KV bytes, K/V projections
computed) with exact numbers. Fidelity and sampling are in test_engine_tiny.py."""

from __future__ import annotations

import pytest
from test_engine_tiny import PROMPTS, SHORT_GREEDY, TEXT_PROMPT, greedy_tokens

from kvserve import LLM, SamplingParams
from kvserve.engine.detokenizer import Detokenizer
from kvserve.request import Request


@pytest.fixture(scope="module")
def llm(tiny_hf_dir) -> LLM:
    return LLM(model=str(tiny_hf_dir), cache_mode="contiguous")


@pytest.fixture(scope="module")
def prompt_ids(llm) -> list[list[int]]:
    return [llm.tokenizer.encode(p) for p in PROMPTS]


# -- streaming and the detokenizer ----------------------------------------------------------------
def test_stream_concatenates_to_generate_text(llm):
    for prompt in (TEXT_PROMPT, PROMPTS[3]):
        params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
        pieces = list(llm.stream(prompt, params))
        out = llm.generate(prompt, params, use_tqdm=False)[0]
        assert "".join(pieces) == out.text
        assert len(pieces) > 1 or prompt != TEXT_PROMPT
        assert llm.last_output.token_ids == out.token_ids


class ByteTokenizer:
    """Tokens are byte strings; decode is UTF-8 with replacement, like a byte-level BPE: a
    character cut between tokens decodes to a trailing U+FFFD until its last byte arrives."""

    PIECES = {1: b"caf", 2: b"\xc3", 3: b"\xa9!", 4: b"abcST", 5: b"OPxyz", 6: b"xxSTOPyy",
              7: b" end", 8: b"\xe2\x82"}

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(self.PIECES[i] for i in ids).decode("utf-8", errors="replace")


def run_detokenizer(token_ids, params: SamplingParams, finish_at_end: bool = True):
    detok = Detokenizer(ByteTokenizer())
    r = Request("r", [1], params)
    deltas, stop = [], None
    for i, token_id in enumerate(token_ids):
        r.output_token_ids.append(token_id)
        result = detok.update(r, finish_at_end and i == len(token_ids) - 1)
        deltas.append(result.delta)
        if result.stop_string is not None:
            stop = result.stop_string
            break
    return deltas, stop, r


def test_detokenizer_holds_back_incomplete_utf8():
    deltas, _, r = run_detokenizer([1, 2, 3, 7], SamplingParams())
    assert deltas == ["caf", "", "é!", " end"] and r.output_text == "café! end"
    # Finished on a cut character: the replacement character is the final text, not withheld.
    deltas, _, r = run_detokenizer([1, 8], SamplingParams())
    assert deltas == ["caf", "\ufffd"] and r.output_text == "caf\ufffd"
    deltas, _, _ = run_detokenizer([1, 8], SamplingParams(), finish_at_end=False)
    assert deltas == ["caf", ""]


def test_detokenizer_never_emits_past_a_stop_string():
    # The stop string spans two tokens: its first half must not have gone out already.
    deltas, stop, r = run_detokenizer([4, 5, 7], SamplingParams(stop=["STOP"]),
                                      finish_at_end=False)
    assert stop == "STOP" and "".join(deltas) == "abc" == r.output_text
    assert all("S" not in d for d in deltas)
    deltas, stop, r = run_detokenizer([4, 5], SamplingParams(stop=["STOP"],
                                                             include_stop_str_in_output=True),
                                      finish_at_end=False)
    assert "".join(deltas) == "abcSTOP" == r.output_text
    # Inside one token, with text after it; the earliest of several stop strings wins.
    deltas, stop, r = run_detokenizer([1, 6, 7], SamplingParams(stop=["yy", "STOP"]),
                                      finish_at_end=False)
    assert stop == "STOP" and "".join(deltas) == "cafxx" == r.output_text
    # Before min_tokens tokens exist, a stop string is just text.
    deltas, stop, r = run_detokenizer([6, 7], SamplingParams(stop=["STOP"], min_tokens=1))
    assert stop is None and "".join(deltas) == "xxSTOPyy end" == r.output_text


# -- prompts and ordering -----------------------------------------------------------------------
def test_prompt_token_ids_and_prompt_dicts(llm, prompt_ids):
    by_text = greedy_tokens(llm, [PROMPTS[2]], SHORT_GREEDY)
    assert greedy_tokens(llm, [{"prompt_token_ids": prompt_ids[2]}], SHORT_GREEDY) == by_text
    assert greedy_tokens(llm, [{"prompt": PROMPTS[2]}], SHORT_GREEDY) == by_text
    out = llm.generate({"prompt_token_ids": prompt_ids[2]}, SHORT_GREEDY, use_tqdm=False)[0]
    assert out.prompt is None and list(out.prompt_token_ids) == prompt_ids[2]


def test_twenty_prompts_come_back_in_order_with_progress_bar(llm, capsys):
    prompts = [f"{i} " + "The KV cache keeps the keys " * (i % 4) for i in range(20)]
    # Later prompts stop sooner, so sequences finish far from input order.
    params = [SamplingParams(max_tokens=21 - i, temperature=0.0, ignore_eos=True)
              for i in range(20)]
    outs = llm.generate(prompts, params, use_tqdm=True)
    assert "20/20" in capsys.readouterr().err
    assert [o.prompt for o in outs] == prompts
    assert [list(o.prompt_token_ids) for o in outs] == [llm.tokenizer.encode(p) for p in prompts]
    assert [len(o.token_ids) for o in outs] == [21 - i for i in range(20)]
    assert not llm.engine.has_unfinished_requests() and not llm.engine.requests


# -- accounting ---------------------------------------------------------------------------------
def test_kv_bytes_per_token_and_contiguous_bytes_freed(tiny_hf_dir):
    fresh = LLM(model=str(tiny_hf_dir), cache_mode="contiguous")
    engine, spec = fresh.engine, fresh.engine.spec
    per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4
    assert per_token == 2 * 2 * 2 * 16 * 4
    assert engine.cache_snapshot().bytes_per_token == per_token
    assert engine.cache_snapshot().num_bytes_allocated == 0

    ids = fresh.tokenizer.encode(PROMPTS[1])
    engine.add_request("a", ids, SamplingParams(max_tokens=70, temperature=0.0, ignore_eos=True))
    engine.step()
    stats = engine.cache_snapshot()
    assert stats.num_bytes_used == len(ids) * per_token
    assert stats.num_bytes_allocated >= stats.num_bytes_used > 0
    while engine.has_unfinished_requests():
        engine.step()
    engine.pop_finished("a")
    stats = engine.cache_snapshot()
    assert stats.num_bytes_allocated == 0 and stats.num_bytes_used == 0
    context = len(ids) + 70 - 1  # the last sampled token is never fed
    assert context * per_token <= stats.peak_bytes_allocated <= 2 * context * per_token

    # A stream abandoned half-way frees its cache too.
    pieces = fresh.stream(PROMPTS[1], SamplingParams(max_tokens=50, temperature=0.0,
                                                     ignore_eos=True))
    next(pieces)
    assert engine.cache_snapshot().num_bytes_allocated > 0
    pieces.close()
    assert engine.cache_snapshot().num_bytes_allocated == 0
    assert not engine.has_unfinished_requests() and not engine.requests


@pytest.mark.parametrize("mode", ["none", "contiguous", "paged"])
def test_kv_projections_counted_exactly(tiny_hf_dir, mode):
    fresh = LLM(model=str(tiny_hf_dir), cache_mode=mode)
    model = fresh.engine.model
    num_layers = model.spec.num_layers
    ids = fresh.tokenizer.encode(PROMPTS[1])
    p, g = len(ids), 20
    before = model.num_kv_projections
    fresh.generate({"prompt_token_ids": ids},
                   SamplingParams(max_tokens=g, temperature=0.0, ignore_eos=True), use_tqdm=False)
    computed = model.num_kv_projections - before
    if mode == "none":  # step t refeeds the whole sequence: prompt + t generated tokens
        assert computed == sum(p + t for t in range(g)) * num_layers == 370 * 2
    else:  # each token once; the last sampled one is never fed
        assert computed == (p + g - 1) * num_layers == 28 * 2
