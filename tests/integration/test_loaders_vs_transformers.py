"""The loaders and the test fixtures against transformers, which reads the same files with its own
code: the tiny GGUF is a file transformers understands as llama.cpp's (same tensors after its own
un-permutation), the tiny Hugging Face folder tokenizes alike, a SentencePiece ("llama") GGUF
vocabulary tokenizes alike, and (slow) every tensor of the embedded SmolLM2 GGUF matches."""

from __future__ import annotations

import os

import fixtures
import gguf
import pytest
import torch

from kvserve.model.gguf import load_gguf
from kvserve.model.loader import default_model_path
from kvserve.model.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = ["Hello world", " The KV cache keeps keys.", "héllo 日本語 😀 zz", "a  b   c",
         "\n\nnew\tline", "numbers 12345 and 3.14", "", " ", "Привет", "I'm sure",
         "<|im_start|>user\nhi<|im_end|>", "<s>x</s>", "<unk> token", "  7"]


def _hf_gguf_state(path) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_tiny_gguf_tensors_match_transformers(qtype, tiny_gguf_path, tiny_gguf_quant_paths):
    path = tiny_gguf_path if qtype == "F32" else tiny_gguf_quant_paths[qtype]
    ours = load_gguf(str(path)).tensors
    theirs = _hf_gguf_state(path)
    theirs.pop("lm_head.weight")  # transformers materializes the tied copy
    assert set(theirs) == set(ours)
    for name, tensor in ours.items():
        assert torch.equal(theirs[name], tensor), name


def test_tiny_hf_folder_tokenizer_matches_transformers(tiny_hf_dir):
    ours = Tokenizer.from_hf_folder(str(tiny_hf_dir))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tiny_hf_dir))
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path):
    path = fixtures.write_spm_gguf(tmp_path / "spm.gguf")
    ours = Tokenizer.from_gguf(gguf.GGUFReader(str(path)))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    assert ours.add_bos and ours.bos_token_id == theirs.bos_token_id == 1
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        for skip in (True, False):
            assert ours.decode(ids, skip) == theirs.decode(ids, skip_special_tokens=skip), text


@pytest.mark.slow
def test_embedded_gguf_tensors_match_transformers():
    path = default_model_path()
    ours = load_gguf(path).tensors
    theirs = _hf_gguf_state(path)
    theirs.pop("lm_head.weight")
    assert set(theirs) == set(ours)
    for name, tensor in ours.items():
        assert torch.equal(theirs[name], tensor), name
