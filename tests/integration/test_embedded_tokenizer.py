"""Our tokenizer from the embedded SmolLM2 GGUF against transformers' AutoTokenizer loaded from
the same file: ids, decoding, special tokens and the chat template.

One known, deliberate difference: transformers' GGUF loader has no entry for llama.cpp's
"smollm" pre-tokenizer and falls back to plain GPT-2 splitting; we split digits one by one first,
as llama.cpp does for "smollm" (and as SmolLM2's own tokenizer.json does). The two differ only
on a run of whitespace before a digit ("  1": we give "ĠĠ","1", transformers "Ġ","Ġ","1").
Those strings are checked against transformers' tokenizer with the digit split restored.
"""

from __future__ import annotations

import copy
import os

import pytest
from gguf import GGUFReader
from tokenizers import pre_tokenizers

from kvserve.model.loader import default_model_path
from kvserve.model.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world", "The KV cache", " leading space", "trailing space ", "  two leading spaces",
    "tabs\tand\nnewlines\n\n\n", "unicode: héllo wörld ñ 日本語 中文 한국어",
    "emoji 😀🚀👍🏽 and flags 🇫🇷", "digits 1234567890 3.14159 1e-5 0x1F",
    "def f(x):\n    return x**2  # comment\n", "<|im_start|>user\nhi<|im_end|>\n", "<|im_start|>",
    "<|endoftext|>text<|im_end|>", "<repo_name>foo<file_sep>bar<gh_stars>",
    "I'm you're it's we've they'll he'd", "ALL CAPS SHOUTING!!!",
    "mixed—dashes – “quotes” ‘single’",
    "   ", "\n", "", "a" * 50, "https://example.com/path?q=1&r=2#frag",
    '{"json": [1, 2, {"k": null}]}', "Ω≈ç√∫˜µ≤≥÷", "\u200b zero width", "\r\nwindows\r\n",
    "Привет мир", "مرحبا بالعالم", "price: $100.00 (50% off)", "<|im_start |> not special",
    "SELECT * FROM t WHERE a=1;", "naïve café résumé", "a\u0301 combining", "\x00\x01 control",
    "Die Hauptstadt von Frankreich ist Paris.", "    indented\n        more",
]
# whitespace runs before digits: where transformers' GGUF tokenizer drops the digit split
DIGIT_AFTER_SPACES = ["  1", "x = [1,  2,   3]", "\t\t4", "a\n  3", "year   2024"]
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another, in 日本語 please."}],
]


@pytest.fixture(scope="module")
def path() -> str:
    return default_model_path()


@pytest.fixture(scope="module")
def ours(path) -> Tokenizer:
    return Tokenizer.from_gguf(GGUFReader(path))


@pytest.fixture(scope="module")
def hf(path):
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                      gguf_file=os.path.basename(path))


@pytest.fixture(scope="module")
def hf_digit_split(hf):
    """transformers' tokenizer with SmolLM2's own pre-tokenizer (digits split first) restored."""
    fixed = copy.deepcopy(hf)
    fixed.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return fixed


def _assert_same(ours: Tokenizer, hf, text: str) -> None:
    ids = ours.encode(text)
    assert ids == hf.encode(text), text
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
            ids, skip_special_tokens=skip), text
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)


def test_encode_decode_match_transformers(ours, hf):
    assert len(TEXTS) >= 30
    for text in TEXTS:
        _assert_same(ours, hf, text)


def test_whitespace_before_digits_follows_smollm_split(ours, hf, hf_digit_split):
    for text in TEXTS + DIGIT_AFTER_SPACES:
        _assert_same(ours, hf_digit_split, text)
    assert hf.convert_ids_to_tokens(hf.encode("  1")) == ["Ġ", "Ġ", "1"]  # the known difference
    assert ours.convert_ids_to_tokens(ours.encode("  1")) == ["ĠĠ", "1"]


def test_special_ids_match_transformers(ours, hf):
    assert ours.vocab_size == len(hf) == 49152
    assert ours.bos_token_id == hf.bos_token_id == 1
    assert ours.eos_token_ids == (hf.eos_token_id,) == (2,)
    assert ours.add_bos is False
    assert ours.encode("hi") == hf.encode("hi")  # no BOS added by either


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, hf, generation_prompt):
    for messages in CONVERSATIONS:
        want = hf.apply_chat_template(messages, tokenize=False,
                                      add_generation_prompt=generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == want
        assert ours.encode(want) == hf.encode(want)
