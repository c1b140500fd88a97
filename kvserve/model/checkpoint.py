"""What a loader hands to the model builder: the model's shape, its weights and its tokenizer.

Loaders (gguf.py, hf.py) produce a Checkpoint; llama.py builds the transformer from it. Weight names
follow Hugging Face's Llama naming so both loaders meet in one place:
  model.embed_tokens.weight                      [vocab, hidden]
  model.layers.{i}.input_layernorm.weight        [hidden]
  model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
      q: [heads * head_dim, hidden], k/v: [kv_heads * head_dim, hidden], o: [hidden, q]
  model.layers.{i}.post_attention_layernorm.weight   [hidden]
  model.layers.{i}.mlp.{gate,up,down}_proj.weight    gate/up: [inter, hidden], down: [hidden, inter]
  model.norm.weight                              [hidden]
  lm_head.weight                                 [vocab, hidden] (absent when embeddings are tied)
Q/K rows are in Hugging Face order (rotate-half RoPE): GGUF's llama.cpp permutation is undone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.config import ModelSpec
from kvserve.kernels.qweight import QuantWeight
from kvserve.model.tokenizer import Tokenizer


@dataclass
class Checkpoint:
    spec: ModelSpec
    # float32 CPU tensors, dequantized, in Hugging Face names and layout (see module docstring);
    # matrices kept in a GGUF block format are QuantWeights (same names, same [n, k] shapes)
    tensors: dict[str, torch.Tensor | QuantWeight]
    tokenizer: Tokenizer
    source: str  # the file or folder it came from
    source_format: str  # "gguf" or "hf"
