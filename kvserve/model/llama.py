"""The Llama-family transformer (Llama 2/3, SmolLM, Mistral): flat batches, any attention backend.

Weights are fused where one read serves several outputs (Q|K|V, gate|up) because decode is bound by
reading weights. The model owns its weights only; K/V storage belongs to the backend passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.config import ModelSpec
from kvserve.model.attention import AttentionBackend
from kvserve.model.checkpoint import Checkpoint
from kvserve.model.layers import RotaryEmbedding, apply_rope, linear, rms_norm, swiglu


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [q_size + 2 * kv_size, hidden]
    o: torch.Tensor  # [hidden, q_size]
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]


class LlamaModel:
    def __init__(self, spec: ModelSpec, layers: list[LayerWeights], embed: torch.Tensor,
                 norm: torch.Tensor, lm_head: torch.Tensor, dtype: torch.dtype,
                 device: torch.device):
        self.spec = spec
        self.layers = layers
        self.embed = embed  # [vocab, hidden]
        self.norm = norm  # [hidden]
        self.lm_head = lm_head  # [vocab, hidden]; the same tensor as embed when tied
        self.dtype = dtype
        self.device = device
        self.rope = RotaryEmbedding(spec.head_dim, spec.max_position_embeddings, spec.rope_theta,
                                    spec.rope_scaling, dtype, device)
        # K/V projections computed (one per token per layer): the work the cache exists to save.
        self.num_kv_projections = 0

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, dtype: torch.dtype,
                        device: torch.device) -> LlamaModel:
        t = ckpt.tensors

        def w(name: str) -> torch.Tensor:
            return t[name].to(dtype=dtype, device=device).contiguous()

        def cat(*names: str) -> torch.Tensor:
            return torch.cat([t[n] for n in names]).to(dtype=dtype, device=device).contiguous()

        layers = []
        for i in range(ckpt.spec.num_layers):
            p = f"model.layers.{i}."
            layers.append(LayerWeights(
                input_norm=w(p + "input_layernorm.weight"),
                qkv=cat(p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                        p + "self_attn.v_proj.weight"),
                o=w(p + "self_attn.o_proj.weight"),
                post_norm=w(p + "post_attention_layernorm.weight"),
                gate_up=cat(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                down=w(p + "mlp.down_proj.weight"),
            ))
        embed = w("model.embed_tokens.weight")
        lm_head = embed if "lm_head.weight" not in t else w("lm_head.weight")
        return cls(ckpt.spec, layers, embed, w("model.norm.weight"), lm_head, dtype, device)

    def num_weight_bytes_per_token(self) -> int:
        """Bytes of weights a decode step reads: every layer, the final norm and the LM head
        (the embedding row gather is negligible and not counted)."""
        tensors = [x for lw in self.layers for x in vars(lw).values()] + [self.norm, self.lm_head]
        return sum(x.numel() * x.element_size() for x in tensors)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: AttentionBackend, logits_rows: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [num_tokens]; logits_rows [num_seqs] picks the rows to score.
        Returns float32 logits [num_seqs, vocab]."""
        s = self.spec
        num_tokens = input_ids.shape[0]
        h = self.embed[input_ids]  # [num_tokens, hidden]
        cos, sin = self.rope.tables(positions)
        for i, lw in enumerate(self.layers):
            x = rms_norm(h, lw.input_norm, s.rms_norm_eps)
            qkv = linear(x, lw.qkv)  # [num_tokens, q_size + 2 * kv_size]
            q = qkv[:, :s.q_size].view(num_tokens, s.num_heads, s.head_dim)
            k = qkv[:, s.q_size:s.q_size + s.kv_size].view(num_tokens, s.num_kv_heads, s.head_dim)
            v = qkv[:, s.q_size + s.kv_size:].view(num_tokens, s.num_kv_heads, s.head_dim)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            o = attn.forward(i, q, k, v)  # [num_tokens, num_heads, head_dim]
            h = h + linear(o.reshape(num_tokens, s.q_size), lw.o)
            x = rms_norm(h, lw.post_norm, s.rms_norm_eps)
            h = h + linear(swiglu(linear(x, lw.gate_up)), lw.down)
        self.num_kv_projections += num_tokens * s.num_layers
        # Only the rows that sample need the final norm and the (large) LM head.
        x = rms_norm(h[logits_rows], self.norm, s.rms_norm_eps)
        return linear(x, self.lm_head).float()
