"""The Llama-family transformer (Llama 2/3, SmolLM, Mistral, Qwen2/2.5, Qwen3, Phi-3): flat batches,
any attention backend; sliding-window layers are the attention backends' (ModelSpec.window).

Weights are fused where one read serves several outputs (Q|K|V, gate|up) because decode is bound by
reading weights. The model owns its weights only; K/V storage belongs to the backend passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.config import ModelSpec
from kvserve.kernels import cpu as cpu_kernels
from kvserve.kernels import qweight
from kvserve.kernels.qweight import QuantWeight
from kvserve.model.attention import AttentionBackend, AttentionMetadata
from kvserve.model.attention.ops import softcap_
from kvserve.model.checkpoint import Checkpoint
from kvserve.model.layers import RotaryEmbedding, apply_rope, gated, linear, rms_norm


def activation_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Activations are float32 on CPU whatever the weight dtype: CPUs without native bf16/fp16
    arithmetic would only widen them op by op. On CUDA they follow the weights."""
    return torch.float32 if device.type == "cpu" else dtype


Weight = torch.Tensor | QuantWeight  # a matrix: a tensor, or kept in a GGUF block format


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: Weight  # [q_size + 2 * kv_size, hidden]
    o: Weight  # [hidden, q_size]
    post_norm: torch.Tensor  # [hidden]
    gate_up: Weight  # [2 * intermediate, hidden]
    down: Weight  # [hidden, intermediate]
    qkv_bias: torch.Tensor | None = None  # [q_size + 2 * kv_size] (Qwen2)
    q_norm: torch.Tensor | None = None  # [head_dim], over each query head before RoPE (Qwen3)
    k_norm: torch.Tensor | None = None  # [head_dim], over each key head
    attn_out_norm: torch.Tensor | None = None  # [hidden], on the attention's output (Gemma 2)
    mlp_out_norm: torch.Tensor | None = None  # [hidden], on the MLP's output (Gemma 2)


def _nbytes(x: Weight) -> int:
    return x.nbytes() if isinstance(x, QuantWeight) else x.numel() * x.element_size()


class LlamaModel:
    def __init__(self, spec: ModelSpec, layers: list[LayerWeights], embed: Weight,
                 norm: torch.Tensor, lm_head: Weight, dtype: torch.dtype,
                 device: torch.device):
        self.spec = spec
        self.layers = layers
        self.embed = embed  # [vocab, hidden]
        self.norm = norm  # [hidden]
        self.lm_head = lm_head  # [vocab, hidden]; the same tensor as embed when tied
        self.dtype = dtype  # weights and (by default) the KV cache
        self.act_dtype = activation_dtype(dtype, device)
        self.device = device
        self.rope = RotaryEmbedding(spec.head_dim, spec.max_position_embeddings, spec.rope_theta,
                                    spec.rope_scaling, self.act_dtype, device,
                                    spec.rope_linear_factor)
        # Gemma 3: the sliding layers' own RoPE base
        self.rope_local = None if spec.local_rope_theta is None else RotaryEmbedding(
            spec.head_dim, spec.max_position_embeddings, spec.local_rope_theta, None,
            self.act_dtype, device)
        # The fused C decode layer (kernels/gemv.c) serves decode-sized CPU batches when built;
        # the PyTorch layer below is the reference it is tested against, and serves the rest.
        # Each layer's matrices as the fused C calls see them (kernels/cpu.py WeightRef).
        # (Q/K/V biases and per-head Q/K norms have no C twin: those models run PyTorch's.)
        fast = (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
                and cpu_kernels.available() and not spec.attention_bias and not spec.qk_norm
                and spec.local_rope_theta is None
                and not spec.sandwich_norms and spec.hidden_act == "silu"
                and spec.plain_attention and spec.embed_scale is None)
        self._refs = [tuple(cpu_kernels.weight_ref(x) for x in (lw.qkv, lw.o, lw.gate_up, lw.down))
                      for lw in layers] if fast else []
        self.use_fast_decode = fast and all(r is not None for refs in self._refs for r in refs)
        # The same, every layer in one C array, for decode steps run in one call
        self._layer_refs = cpu_kernels.layer_refs(
            [(lw.input_norm, lw.post_norm, *refs) for lw, refs in zip(layers, self._refs)]
        ) if self.use_fast_decode else None
        self._lm_head_ref = cpu_kernels.weight_ref(lm_head) if self.use_fast_decode else None
        # ... and the embedding, for several decode steps in one call (greedy_steps)
        self._embed_ref = cpu_kernels.weight_ref(embed) if self.use_fast_decode else None
        # K/V projections computed (one per token per layer): the work the cache exists to save.
        self.num_kv_projections = 0

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, dtype: torch.dtype,
                        device: torch.device) -> LlamaModel:
        t = ckpt.tensors

        act = activation_dtype(dtype, device)

        def dense(x: Weight) -> torch.Tensor:
            return x.dequantize(torch.float32) if isinstance(x, QuantWeight) else x

        def w(name: str) -> Weight:
            if isinstance(t[name], QuantWeight) and device.type == "cpu":
                return t[name]  # multiplied as stored (kernels/qweight.py)
            return dense(t[name]).to(dtype=dtype, device=device).contiguous()

        def norm(name: str) -> torch.Tensor:
            return t[name].to(dtype=act, device=device).contiguous()

        def cat(*names: str) -> Weight:
            parts = [t[n] for n in names]
            if device.type == "cpu" and all(isinstance(x, QuantWeight) for x in parts):
                return qweight.cat(parts)  # layouts that differ are widened to one, exactly
            return torch.cat([dense(x) for x in parts]).to(dtype=dtype, device=device) \
                .contiguous()

        def optional(name: str) -> torch.Tensor | None:
            return norm(name) if name in t else None

        layers = []
        for i in range(ckpt.spec.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            bias = None
            if ckpt.spec.attention_bias:
                bias = torch.cat([t[a + x + "_proj.bias"] for x in "qkv"]).to(
                    dtype=act, device=device)
            sandwich = ckpt.spec.sandwich_norms  # Gemma 2 names its four norms so
            layers.append(LayerWeights(
                qkv_bias=bias, q_norm=optional(a + "q_norm.weight"),
                k_norm=optional(a + "k_norm.weight"),
                attn_out_norm=norm(p + "post_attention_layernorm.weight") if sandwich else None,
                mlp_out_norm=norm(p + "post_feedforward_layernorm.weight") if sandwich else None,
                input_norm=norm(p + "input_layernorm.weight"),
                qkv=cat(p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                        p + "self_attn.v_proj.weight"),
                o=w(p + "self_attn.o_proj.weight"),
                post_norm=norm(p + ("pre_feedforward_layernorm.weight" if sandwich
                                    else "post_attention_layernorm.weight")),
                gate_up=cat(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                down=w(p + "mlp.down_proj.weight"),
            ))
        embed = w("model.embed_tokens.weight")
        lm_head = embed if "lm_head.weight" not in t else w("lm_head.weight")
        return cls(ckpt.spec, layers, embed, norm("model.norm.weight"), lm_head, dtype, device)

    def num_weight_bytes_per_token(self) -> int:
        """Bytes of weights a decode step reads: every layer, the final norm and the LM head
        (the embedding row gather is negligible and not counted)."""
        tensors = [x for lw in self.layers for x in vars(lw).values() if x is not None] + \
            [self.norm, self.lm_head]
        return sum(_nbytes(x) for x in tensors)

    def weights_description(self) -> str:
        """Which path multiplies the weights and the bytes it reads per decode token, e.g.
        'weights quantized (120 q4, 1 q8 matrices), 96.6 MB/token'."""
        mats = [x for lw in self.layers for x in (lw.qkv, lw.o, lw.gate_up, lw.down)]
        mats.append(self.lm_head)
        counts: dict[str, int] = {}
        for x in mats:
            kind = x.format if isinstance(x, QuantWeight) else str(x.dtype).removeprefix("torch.")
            counts[kind] = counts.get(kind, 0) + 1
        kinds = ", ".join(f"{n} {k}" for k, n in counts.items())
        how = "quantized" if self.weights_as_stored else "dequantized"
        return (f"weights {how} ({kinds} matrices), "
                f"{self.num_weight_bytes_per_token() / 1e6:.1f} MB/token")

    @property
    def weights_as_stored(self) -> bool:
        """Whether matrices are multiplied quantized (--quantization gguf, int8 or int4)."""
        return isinstance(self.layers[0].qkv, QuantWeight) if self.layers else False

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[num_tokens] -> [num_tokens, hidden] in the activation dtype (a fresh tensor)."""
        if isinstance(self.embed, QuantWeight):  # the rows, dequantized in C where it runs
            h = cpu_kernels.dequantize_rows(self.embed, input_ids).to(self.act_dtype)
        else:
            h = self.embed[input_ids].to(self.act_dtype)
        if self.spec.embed_scale is not None:  # Gemma: times sqrt(hidden), in the weights' dtype
            h = h * torch.tensor(self.spec.embed_scale, dtype=self.dtype).to(h.dtype)
        return h

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: AttentionBackend, meta: AttentionMetadata,
                logits_rows: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [num_tokens]; meta: the step's attention metadata (prepared by
        attn); logits_rows [num_seqs] picks the rows to score. Returns float32 logits
        [num_seqs, vocab]."""
        s = self.spec
        h = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        # [num_tokens, head_dim] each; computed when past the tables (attention sinks)
        cos, sin = self.rope.tables(positions, meta.max_context_len > self.rope.num_positions)
        if self.use_fast_decode and cpu_kernels.fast_path_ok(h):
            with cpu_kernels.decode_threads():
                step, logits = attn.fused_decode(meta), None
                if step is not None:  # every layer in one C call, K/V written and attended there
                    # and, when every row samples in order (a decode step), the logits too
                    every_row = self._lm_head_ref is not None and torch.equal(
                        logits_rows, torch.arange(h.shape[0]))
                    logits = cpu_kernels.decode_layers_(
                        h, self._layer_refs, s.rms_norm_eps, cos, sin, s.num_heads,
                        s.num_kv_heads, s.head_dim, step, self.norm if every_row else None,
                        self._lm_head_ref if every_row else None)
                else:
                    for i, lw in enumerate(self.layers):
                        h = self._layer_fast(i, lw, h, cos, sin, attn, meta)
                if logits is None:
                    logits = self._logits(h, logits_rows)
        else:
            local = None if self.rope_local is None else self.rope_local.tables(
                positions, meta.max_context_len > self.rope_local.num_positions)
            for i, lw in enumerate(self.layers):
                c, si = (cos, sin) if local is None or s.window(i) is None else local
                h = self._layer_reference(i, lw, h, c, si, attn, meta)
            logits = self._logits(h, logits_rows)
        self.num_kv_projections += input_ids.shape[0] * s.num_layers
        return logits

    @property
    def fuses_decode_steps(self) -> bool:
        """Whether greedy_steps can run here (batches up to kernels/cpu.py MAX_M rows)."""
        return self._embed_ref is not None and self._lm_head_ref is not None

    @torch.inference_mode()
    def greedy_steps(self, input_ids: torch.Tensor, positions: torch.Tensor, num_steps: int,
                     step: cpu_kernels.PagedDecode) -> list[list[int]] | None:
        """num_steps greedy decode steps back to back, one token per sequence each (input_ids,
        positions [batch]: the first step's; step: its store, tables covering every step's
        slot and scratch for the last), each step's argmax fed to the next, all in one C call
        (kernels/cpu.py decode_steps). Returns each step's tokens, or None when that call
        cannot take the batch. The reference is forward() and the sampler's greedy pick, step
        by step (ModelRunner.execute_steps)."""
        s, batch = self.spec, input_ids.shape[0]
        if (not self.fuses_decode_steps or batch > cpu_kernels.MAX_M
                or step.max_context + num_steps - 1 > self.rope.num_positions):
            return None
        with cpu_kernels.decode_threads():
            tokens = cpu_kernels.decode_steps(
                self._embed_ref, input_ids, positions, num_steps, self._layer_refs,
                s.rms_norm_eps, self.rope.cos, self.rope.sin, s.num_heads, s.num_kv_heads,
                s.head_dim, step, self.norm, self._lm_head_ref)
        self.num_kv_projections += batch * s.num_layers * num_steps
        return tokens.tolist()

    def _logits(self, h: torch.Tensor, logits_rows: torch.Tensor) -> torch.Tensor:
        # Only the rows that sample need the final norm and the (large) LM head.
        x = rms_norm(h[logits_rows], self.norm, self.spec.rms_norm_eps)
        return softcap_(linear(x, self.lm_head).float(), self.spec.final_softcap)

    def _layer_reference(self, i: int, lw: LayerWeights, h: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, attn: AttentionBackend,
                         meta: AttentionMetadata) -> torch.Tensor:
        s = self.spec
        num_tokens = h.shape[0]
        x = rms_norm(h, lw.input_norm, s.rms_norm_eps)
        qkv = linear(x, lw.qkv)  # [num_tokens, q_size + 2 * kv_size]
        if lw.qkv_bias is not None:
            qkv = qkv + lw.qkv_bias
        if lw.q_norm is not None:  # per head, before RoPE
            heads = qkv[:, :s.q_size + s.kv_size].view(num_tokens, -1, s.head_dim)
            qkv = torch.cat((
                rms_norm(heads[:, :s.num_heads], lw.q_norm, s.rms_norm_eps).flatten(1),
                rms_norm(heads[:, s.num_heads:], lw.k_norm, s.rms_norm_eps).flatten(1),
                qkv[:, s.q_size + s.kv_size:]), dim=-1)
        # Q and K heads sit side by side in qkv: rotate them in one pass, then split.
        qk = apply_rope(qkv[:, :s.q_size + s.kv_size].view(num_tokens, -1, s.head_dim),
                        cos.unsqueeze(1), sin.unsqueeze(1))  # [num_tokens, heads + kv_heads, d]
        q, k = qk[:, :s.num_heads], qk[:, s.num_heads:]
        v = qkv[:, s.q_size + s.kv_size:].view(num_tokens, s.num_kv_heads, s.head_dim)
        o = attn.forward(i, q, k, v, meta)  # [num_tokens, num_heads, head_dim]
        a = linear(o.reshape(num_tokens, s.q_size), lw.o)
        if lw.attn_out_norm is not None:
            a = rms_norm(a, lw.attn_out_norm, s.rms_norm_eps)
        h = h + a
        x = rms_norm(h, lw.post_norm, s.rms_norm_eps)
        m = linear(gated(linear(x, lw.gate_up), s.hidden_act), lw.down)
        if lw.mlp_out_norm is not None:
            m = rms_norm(m, lw.mlp_out_norm, s.rms_norm_eps)
        return h + m

    def _layer_fast(self, i: int, lw: LayerWeights, h: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, attn: AttentionBackend,
                    meta: AttentionMetadata) -> torch.Tensor:
        """The same layer in two C calls around attention (decode-sized float32 CPU batches)."""
        s = self.spec
        num_tokens = h.shape[0]
        wqkv, wo, wgate_up, wdown = self._refs[i]
        # h is updated in place: it is this forward's own tensor (the embedding gather's copy).
        qkv = cpu_kernels.layer_pre(h, lw.input_norm, s.rms_norm_eps, wqkv, cos, sin,
                                    s.num_heads + s.num_kv_heads, s.head_dim)
        q = qkv[:, :s.q_size].view(num_tokens, s.num_heads, s.head_dim)
        k = qkv[:, s.q_size:s.q_size + s.kv_size].view(num_tokens, s.num_kv_heads, s.head_dim)
        v = qkv[:, s.q_size + s.kv_size:].view(num_tokens, s.num_kv_heads, s.head_dim)
        o = attn.forward(i, q, k, v, meta).reshape(num_tokens, s.q_size).contiguous()
        cpu_kernels.layer_post_(h, o, wo, lw.post_norm, s.rms_norm_eps, wgate_up, wdown)
        return h
