"""Tokenizer on the tiny model's vocabulary: both file forms tokenize alike, special tokens stay
whole, BOS/EOS bookkeeping, chat templates rendered in the sandbox, and clear errors."""

from __future__ import annotations

import json
import shutil

import fixtures
import gguf
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import processors

from kvserve.errors import InvalidRequestError, ModelLoadError
from kvserve.model.tokenizer import Tokenizer

TEXTS = [
    "The KV cache keeps keys and values.", " leading space", "two  spaces   three",
    "tabs\tand\nnewlines\n\n", "digits 1234567890 and 3.14", "  42 after spaces",
    "unicode héllo 日本語 😀 Привет", "code: def f(x):\n    return x * 2\n",
    "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>", "never seen: qzxv ☃", "", " ",
]
CHAT = [{"role": "user", "content": "What is a prefix cache?"}]


@pytest.fixture(scope="module")
def hf_tok(tiny_hf_dir) -> Tokenizer:
    return Tokenizer.from_hf_folder(str(tiny_hf_dir))


@pytest.fixture(scope="module")
def gguf_tok(tiny_gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf.GGUFReader(str(tiny_gguf_path)))


def test_both_forms_tokenize_identically(hf_tok, gguf_tok):
    for text in TEXTS:
        ids = hf_tok.encode(text)
        assert gguf_tok.encode(text) == ids, text
        for skip in (True, False):
            assert gguf_tok.decode(ids, skip) == hf_tok.decode(ids, skip), text
        assert hf_tok.decode(ids, skip_special_tokens=False) == text


def test_attributes(hf_tok, gguf_tok):
    for tok in (hf_tok, gguf_tok):
        assert tok.bos_token_id == 1 and not tok.add_bos
        assert tok.vocab_size == fixtures.TINY_VOCAB_SIZE
        assert tok.chat_template == fixtures.CHAT_TEMPLATE
    assert gguf_tok.eos_token_ids == (2,)
    assert hf_tok.eos_token_ids == (2, 0)  # + generation_config.json's extra eos


def test_special_tokens_are_single_ids_and_skipped_on_decode(gguf_tok):
    ids = gguf_tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert gguf_tok.convert_ids_to_tokens(ids[:1]) == ["<|im_start|>"]
    assert gguf_tok.decode(ids) == "user\nhi"
    assert gguf_tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    assert gguf_tok.convert_ids_to_tokens(gguf_tok.encode(" cache")) == ["Ġcache"]


def test_digits_are_split_one_by_one(gguf_tok):
    assert gguf_tok.convert_ids_to_tokens(gguf_tok.encode("2024")) == ["2", "0", "2", "4"]


def test_bos_is_prepended_only_with_special_tokens(gguf_tok):
    tok = Tokenizer(gguf_tok.backend, bos_token_id=1, eos_token_ids=(2,), add_bos=True,
                    chat_template=None)
    plain = gguf_tok.encode("hello")
    assert tok.encode("hello") == [1, *plain]
    assert tok.encode("hello", add_special_tokens=False) == plain


def test_chat_template_renders(gguf_tok):
    assert gguf_tok.apply_chat_template(CHAT) == (
        "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n"
        "<|im_start|>user\nWhat is a prefix cache?<|im_end|>\n<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be brief."}, *CHAT]
    assert gguf_tok.apply_chat_template(with_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is a prefix cache?<|im_end|>\n")


@pytest.mark.parametrize("messages,match", [
    ("hi", "non-empty list"),
    ([], "non-empty list"),
    (["hi"], r"messages\[0\] must be an object"),
    ([{"content": "hi"}], r"messages\[0\] must be an object with a string 'role'"),
    ([{"role": "user", "content": None}], r"messages\[0\]\.content must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text"}]}],
     r"messages\[1\]\.content must be a string"),
])
def test_malformed_messages(gguf_tok, messages, match):
    with pytest.raises(InvalidRequestError, match=match):
        gguf_tok.apply_chat_template(messages)


def _with_template(tok: Tokenizer, template: str | None) -> Tokenizer:
    return Tokenizer(tok.backend, bos_token_id=1, eos_token_ids=(2,), add_bos=False,
                     chat_template=template)


def test_no_template_and_template_errors(gguf_tok):
    with pytest.raises(InvalidRequestError, match="no chat template"):
        _with_template(gguf_tok, None).apply_chat_template(CHAT)
    strict = _with_template(gguf_tok, "{% if messages[0]['role'] != 'system' %}"
                                      "{{ raise_exception('first message must be system') }}"
                                      "{% endif %}")
    with pytest.raises(InvalidRequestError, match="first message must be system"):
        strict.apply_chat_template(CHAT)
    broken = _with_template(gguf_tok, "{% for m in messages %}{{ m }")
    with pytest.raises(InvalidRequestError, match="chat template is invalid"):
        broken.apply_chat_template(CHAT)
    sandboxed = _with_template(gguf_tok, "{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidRequestError, match="chat template rejected"):
        sandboxed.apply_chat_template(CHAT)


def test_template_helpers_like_hugging_face(gguf_tok):
    tok = _with_template(gguf_tok, (
        "{{ bos_token }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m | tojson }}{% endfor %}{{ eos_token }}"))
    out = tok.apply_chat_template([{"role": "user", "content": "é"}, *CHAT])
    assert out == '<|im_start|>{"role": "user", "content": "é"}<|im_end|>'


def test_unsupported_gguf_tokenizer_model():
    with pytest.raises(ModelLoadError, match="unsupported tokenizer model 'bert' in GGUF"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


def test_from_plain_metadata_dict():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.tokens": ["<s>", "a", "b", "ab"], "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.token_type": [3, 1, 1, 1], "tokenizer.ggml.bos_token_id": 0}
    tok = Tokenizer.from_gguf(meta)
    assert tok.encode("<s>abab") == [0, 3, 3] and tok.eos_token_ids == ()
    ended = Tokenizer.from_gguf({**meta, "tokenizer.ggml.eos_token_id": 1,
                                 "tokenizer.ggml.eot_token_id": 2})
    assert ended.eos_token_ids == (1, 2)  # end-of-turn ends generation too


def test_out_of_vocabulary_id(gguf_tok):
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        gguf_tok.convert_ids_to_tokens([10_000])


def test_hf_bos_from_post_processor_and_chat_template_file(tmp_path, tiny_hf_dir):
    folder = tmp_path / "bos"
    shutil.copytree(tiny_hf_dir, folder)
    backend = Backend.from_file(str(folder / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    backend.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["add_bos_token"]
    config["clean_up_tokenization_spaces"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    tok = Tokenizer.from_hf_folder(str(folder))
    assert tok.add_bos and tok.encode("hi")[0] == 1 and tok.encode("hi").count(1) == 1
    assert tok.apply_chat_template(CHAT) == CHAT[0]["content"]
    assert tok.decode(tok.encode("end .")) == "end."
