"""Every way a model path can be wrong gives one ModelLoadError whose single line names the
problem: missing, truncated, not a model, wrong architecture, unsupported type, missing tensors."""

from __future__ import annotations

import json
import shutil
import struct

import fixtures
import gguf
import pytest
from safetensors.torch import load_file, save_file

from kvserve.errors import ModelLoadError
from kvserve.model.gguf import load_gguf
from kvserve.model.hf import load_hf_folder
from kvserve.model.loader import load_checkpoint


def _error(model: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_checkpoint(model)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def _copy_hf(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_paths(tmp_path):
    assert "model path" in _error(str(tmp_path / "nope.gguf"))
    assert "not found" in _error(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="not found"):
        load_gguf(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelLoadError, match="not found"):
        load_hf_folder(str(tmp_path / "nope"))


def test_neither_gguf_nor_hf_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert "neither a GGUF file nor a Hugging Face model folder" in _error(
        str(tmp_path / "notes.txt"))
    (tmp_path / "empty").mkdir()
    assert "neither" in _error(str(tmp_path / "empty"))


@pytest.mark.parametrize("fraction", [0.5, 0.02])
def test_truncated_gguf(tmp_path, tiny_gguf_path, fraction):
    data = tiny_gguf_path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * fraction)])
    message = _error(str(cut))
    assert "not a valid GGUF file or is truncated" in message or "truncated" in message, message


def test_garbage_named_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    assert "not a valid GGUF file" in _error(str(bad))


def test_gguf_magic_without_extension_is_detected(tmp_path, tiny_gguf_path):
    plain = tmp_path / "model.bin"
    shutil.copy(tiny_gguf_path, plain)
    assert load_checkpoint(str(plain)).source_format == "gguf"


def test_wrong_architecture_gguf(tmp_path):
    path = fixtures.write_wrong_arch_gguf(tmp_path / "gpt2.gguf")
    assert _error(str(path)) == "unsupported architecture 'gpt2' (supported: llama family)"


def test_unsupported_quantization_type(tmp_path, tiny_hf_dir):
    path = fixtures.write_tiny_gguf(tmp_path / "mxfp4.gguf", tiny_hf_dir, qtype="MXFP4")
    message = _error(str(path))
    assert "unsupported quantization type MXFP4" in message and "tensor '" in message
    assert "Q4_1" in message  # lists what is supported


def test_unknown_tensor_type_id(tmp_path, tiny_gguf_path):
    # Patch the first tensor's type id to one no gguf version knows.
    reader = gguf.GGUFReader(str(tiny_gguf_path))
    field = reader.tensors[0].field
    offset = field.offset + sum(part.nbytes for part in field.parts[:4])
    data = bytearray(tiny_gguf_path.read_bytes())
    assert struct.unpack_from("<I", data, offset)[0] == reader.tensors[0].tensor_type
    struct.pack_into("<I", data, offset, 99)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(bytes(data))
    assert "unsupported quantization type" in _error(str(fake))


def test_missing_gguf_tensor(tmp_path, tiny_hf_dir):
    path = fixtures.write_tiny_gguf(tmp_path / "gap.gguf", tiny_hf_dir,
                                    drop=("blk.1.ffn_down.weight",))
    assert "missing tensor(s): blk.1.ffn_down.weight" in _error(str(path))


def test_hf_wrong_architecture(tmp_path, tiny_hf_dir):
    folder = _copy_hf(tiny_hf_dir, tmp_path / "gpt2")
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (folder / "config.json").write_text(json.dumps(config))
    assert "unsupported architecture 'GPT2LMHeadModel' (supported: LlamaForCausalLM, " \
        "MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Phi3ForCausalLM, " \
        "Gemma2ForCausalLM, Gemma3ForCausalLM)" in _error(
            str(folder))


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "attention/MLP biases are not supported (beyond Qwen2's Q/K/V)"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu' for llama (supported: silu)"),
    ({"partial_rotary_factor": 0.75}, "partial rotary embeddings"),
    ({"sliding_window": -3}, "sliding_window must be a positive integer, got -3"),
    ({"sliding_window": 8, "layer_types": ["sliding_attention"]},
     "layer_types must name 'sliding_attention' or 'full_attention' for each of the 2 layers"),
])
def test_hf_unsupported_or_bad_architecture_details(tmp_path, tiny_hf_dir, change, message):
    folder = _copy_hf(tiny_hf_dir, tmp_path / "x")
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    assert message in _error(str(folder))


def test_hf_missing_pieces(tmp_path, tiny_hf_dir):
    folder = _copy_hf(tiny_hf_dir, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    del config["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(config))
    assert "config.json is missing 'num_hidden_layers'" in _error(str(folder))

    folder = _copy_hf(tiny_hf_dir, tmp_path / "t")
    (folder / "tokenizer.json").unlink()
    assert "no tokenizer.json" in _error(str(folder))

    folder = _copy_hf(tiny_hf_dir, tmp_path / "w")
    (folder / "model.safetensors").unlink()
    assert "no *.safetensors" in _error(str(folder))


def test_hf_missing_tensor_and_truncated_safetensors(tmp_path, tiny_hf_dir):
    folder = _copy_hf(tiny_hf_dir, tmp_path / "gap")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    assert "missing tensor(s): model.layers.1.mlp.up_proj.weight" in _error(str(folder))

    folder = _copy_hf(tiny_hf_dir, tmp_path / "cut")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated safetensors" in _error(str(folder))


def test_hf_sharded_safetensors_load(tmp_path, tiny_hf_dir):
    folder = _copy_hf(tiny_hf_dir, tmp_path / "sharded")
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    for i, part in enumerate((names[:half], names[half:])):
        shard = folder / f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(shard))
    assert set(load_checkpoint(str(folder)).tensors) == set(tensors)


def test_hf_bfloat16_weights_become_float32(tmp_path, tiny_hf_dir):
    folder = _copy_hf(tiny_hf_dir, tmp_path / "bf16")
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({n: t.bfloat16() for n, t in tensors.items()}, str(folder / "model.safetensors"))
    loaded = load_checkpoint(str(folder)).tensors
    assert all(t.dtype.is_floating_point and t.dtype.itemsize == 4 for t in loaded.values())
