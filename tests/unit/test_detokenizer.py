"""The incremental detokenizer against whole-output decoding: fed one token at a time, it must end
with exactly tokenizer.decode(all tokens), stream deltas that add up to that text, and (stop
strings included) emit the very deltas the former decode-everything-every-step version did, while
decoding only a few tokens per step. Byte-level BPE (the tiny test vocabulary and, when installed,
SmolLM2's, which split emojis and CJK characters across tokens) and a SentencePiece vocabulary
with byte fallback (leading spaces, whose decoding depends on the token before)."""

from __future__ import annotations

import random

import pytest
from gguf import GGUFReader

from kvserve.engine.detokenizer import Detokenizer, DetokenizeResult
from kvserve.errors import ModelLoadError
from kvserve.model.loader import default_model_path
from kvserve.model.tokenizer import Tokenizer
from kvserve.request import Request, SamplingParams

_REPLACEMENT = "\ufffd"
TEXT_PIECES = ["The", " KV", " cache", " keeps", " keys", "!", " 42", "\n", "  ", " héllo",
               " wörld", " 日本語", " 中文", "😀", "🚀", "👍🏽", " 🇫🇷", " naïve", " café", "Привет",
               " مرحبا", "\t", "<|im_end|>", "<|im_start|>", " <|endoftext|>", "x", " I'm"]
STOPS = [(), ("e",), ("ke",), ("KV", "日"), ("\n", "cache k"), ("😀",), ("é",)]


class FullDecodeDetokenizer:
    """The former implementation, kept as the reference: decodes the whole output every step."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def update(self, r: Request, finished: bool) -> DetokenizeResult:
        p = r.params
        text = self.tokenizer.decode(r.output_token_ids, skip_special_tokens=p.skip_special_tokens)
        if not finished and text.endswith(_REPLACEMENT):
            text = text.rstrip(_REPLACEMENT)
        previous, stop_string = r.output_text, None
        if p.stop and len(r.output_token_ids) > p.min_tokens:
            search_from = max(0, len(previous) - max(map(len, p.stop)) + 1)
            hits = [(i, s) for s in p.stop if (i := text.find(s, search_from)) != -1]
            if hits:
                index, stop_string = min(hits, key=lambda h: h[0])
                text = text[:index + len(stop_string)] if p.include_stop_str_in_output \
                    else text[:index]
        sent = previous[:r.num_emitted_chars]
        if not text.startswith(sent):
            text = sent + text[len(sent):] if len(text) > len(sent) else sent
        r.output_text = text
        hold = 0
        if p.stop and not p.include_stop_str_in_output and not finished and stop_string is None:
            hold = max(map(len, p.stop)) - 1
        emit_to = max(r.num_emitted_chars, len(text) - hold)
        delta = text[r.num_emitted_chars:emit_to]
        r.num_emitted_chars = emit_to
        return DetokenizeResult(delta, stop_string)


def feed(detok, token_ids, params: SamplingParams, finish: bool = True):
    """Appends the tokens one by one as the engine does; stops at a stop string."""
    r = Request("r", [0], params)
    steps = []
    for i, token_id in enumerate(token_ids):
        r.output_token_ids.append(token_id)
        result = detok.update(r, finish and i == len(token_ids) - 1)
        steps.append((result.delta, result.stop_string))
        if result.stop_string is not None:
            break
    return r, steps


@pytest.fixture(scope="module")
def tiny_tok(tiny_hf_dir) -> Tokenizer:
    return Tokenizer.from_hf_folder(str(tiny_hf_dir))


@pytest.fixture(scope="module")
def smollm_tok() -> Tokenizer:
    try:
        path = default_model_path()
    except ModelLoadError as err:
        pytest.skip(str(err))
    return Tokenizer.from_gguf(GGUFReader(path))


def spm_tokenizer() -> Tokenizer:
    """A small SentencePiece BPE vocabulary ("llama" GGUF) with byte fallback: non-ASCII text is
    spelled in <0xNN> tokens, and the decoder strips the output's first leading space."""
    pieces = ["▁", "a", "b", "c", "e", "h", "t", ".", "!", "▁a", "▁b", "▁t", "th", "▁th", "▁the",
              "ab", "▁ab", "bc", "▁c", "ee"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    return Tokenizer.from_gguf({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2})


def random_sequences(tok: Tokenizer, rng: random.Random, count: int, *, raw_ids: bool):
    """Encoded random text (characters split across tokens at their byte boundaries) and, with
    raw_ids, arbitrary ids too: stray bytes, characters never completed, special tokens."""
    specials = [i for i in range(tok.vocab_size)
                if tok.decode([i], skip_special_tokens=True) == ""
                and tok.decode([i], skip_special_tokens=False) != ""]
    assert specials
    for k in range(count):
        ids = tok.encode("".join(rng.choices(TEXT_PIECES, k=rng.randint(1, 12))),
                         add_special_tokens=False)
        for _ in range(rng.randint(0, 2)):
            ids.insert(rng.randint(0, len(ids)), rng.choice(specials))
        if raw_ids and k % 2:
            ids = [rng.randrange(tok.vocab_size) if rng.random() < 0.5 else i
                   for i in ids + [rng.randrange(tok.vocab_size) for _ in range(8)]]
        yield ids


def check_against_full_decode(tok: Tokenizer, sequences, rng: random.Random) -> int:
    """Returns how many sequences had a character split across tokens."""
    split = 0
    for ids in sequences:
        for skip in (True, False):
            expected = tok.decode(ids, skip_special_tokens=skip)
            r, steps = feed(Detokenizer(tok), ids, SamplingParams(skip_special_tokens=skip))
            assert r.output_text == expected, ids
            assert "".join(d for d, _ in steps) == expected, ids
            split += any(_REPLACEMENT in tok.decode(ids[:i], skip_special_tokens=skip)
                         and _REPLACEMENT not in expected for i in range(len(ids)))
            # Same deltas and stop strings as decoding everything every step.
            params = SamplingParams(skip_special_tokens=skip, stop=rng.choice(STOPS),
                                    include_stop_str_in_output=rng.random() < 0.3,
                                    min_tokens=rng.choice([0, 0, 1, 3]))
            finish = rng.random() < 0.7
            r, steps = feed(Detokenizer(tok), ids, params, finish)
            ref, ref_steps = feed(FullDecodeDetokenizer(tok), ids, params, finish)
            assert steps == ref_steps and r.output_text == ref.output_text, (ids, params)
            assert "".join(d for d, _ in steps) == r.output_text[:r.num_emitted_chars]
    return split


def test_matches_full_decode_tiny_vocabulary(tiny_tok):
    rng = random.Random(0)
    split = check_against_full_decode(
        tiny_tok, random_sequences(tiny_tok, rng, 300, raw_ids=True), rng)
    assert split > 20  # the cases that need held-back text were exercised


def test_matches_full_decode_smollm2(smollm_tok):
    rng = random.Random(1)
    split = check_against_full_decode(
        smollm_tok, random_sequences(smollm_tok, rng, 200, raw_ids=True), rng)
    assert split > 20
    # SmolLM2 splits "😀" after its third byte: the space goes out at once, the emoji with its
    # last byte.
    ids = smollm_tok.encode(" 😀 ok", add_special_tokens=False)
    assert smollm_tok.convert_ids_to_tokens(ids) == ["ĠðŁĺ", "Ģ", "Ġok"]
    r, steps = feed(Detokenizer(smollm_tok), ids, SamplingParams(), finish=False)
    assert [d for d, _ in steps] == [" ", "😀", " ok"] and r.output_text == " 😀 ok"


def test_sentencepiece_leading_spaces_and_byte_fallback():
    tok = spm_tokenizer()
    ids = tok.encode("the ab c. é!", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids)[:3] == ["▁the", "▁ab", "▁c"]
    assert tok.decode(ids[1:2]) == "ab"  # alone, a token's leading space is dropped
    rng = random.Random(2)
    alphabet = ["a", "b", "c", "e", "h", "t", " ", "  ", ".", "!", "é", "日", "😀", "the"]
    texts = ["".join(rng.choices(alphabet, k=rng.randint(1, 15))) for _ in range(300)]
    split = 0
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        # Special tokens between characters only: one inside a byte-fallback run turns the whole
        # run into U+FFFD, which no streaming detokenizer (nor the former one) can take back.
        for _ in range(rng.randint(0, 2)):
            at = rng.choice([i for i in range(len(ids) + 1)
                             if not tok.decode(ids[:i]).endswith(_REPLACEMENT)])
            ids.insert(at, rng.choice([1, 2]))
        split += check_against_full_decode(tok, [ids], rng)
    assert split > 20


def test_decodes_a_bounded_window_per_step(tiny_tok):
    calls: list[int] = []

    class Recording:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return tiny_tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tiny_tok.encode("".join(TEXT_PIECES) * 8, add_special_tokens=False)[:300]
    assert len(ids) == 300
    r, steps = feed(Detokenizer(Recording()), ids, SamplingParams(stop=["never"]))
    assert r.output_text == tiny_tok.decode(ids) and "".join(d for d, _ in steps) == r.output_text
    assert max(calls) <= 10 and len(calls) <= 2 * len(ids)


def test_update_without_a_new_token_changes_nothing(tiny_tok):
    # A preempted request is recomputed with its output tokens kept: a step may bring no token.
    ids = tiny_tok.encode(" naïve 日本語 ok", add_special_tokens=False)
    cut = next(i for i in range(1, len(ids)) if tiny_tok.decode(ids[:i]).endswith(_REPLACEMENT))
    for tokens in (ids, ids[:cut]):  # the second ends in the middle of a character
        detok = Detokenizer(tiny_tok)
        r = Request("r", [0], SamplingParams(stop=["zz"]))
        pieces = []
        for token_id in tokens:
            r.output_token_ids.append(token_id)
            pieces.append(detok.update(r, False).delta)
            state = (r.output_text, r.num_emitted_chars)
            assert detok.update(r, False).delta == ""
            assert (r.output_text, r.num_emitted_chars) == state
        assert not r.output_text.endswith(_REPLACEMENT)
        pieces.append(detok.update(r, True).delta)  # finished: held-back text goes out
        expected = tiny_tok.decode(tokens)
        assert "".join(pieces) == r.output_text == expected
        assert expected.endswith(_REPLACEMENT) == (tokens != ids)
        assert detok.update(r, True).delta == "" and r.output_text == expected
