"""The attention math for one sequence: a plain reference and the SDPA fast path it is tested
against. Where K/V come from is the backends' business (dense.py, paged.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor:
    """Bool [num_queries, num_keys]: query i sits at key position num_keys - num_queries + i."""
    q_pos = torch.arange(num_keys - num_queries, num_keys, device=device).unsqueeze(1)
    return torch.arange(num_keys, device=device).unsqueeze(0) <= q_pos


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal GQA attention for one sequence, computed in float32.

    q [n, num_heads, d]; k, v [L, num_kv_heads, d] with the n queries at positions [L - n, L).
    """
    n, num_heads, d = q.shape
    group = num_heads // k.shape[1]
    k = k.repeat_interleave(group, dim=1).float()  # [L, num_heads, d]
    v = v.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k) / d ** 0.5  # [num_heads, n, L]
    scores = scores.masked_fill(~causal_mask(n, k.shape[0], q.device), float("-inf"))
    out = torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)
    return out.to(q.dtype)


PREFILL_CHUNK_QUERIES = 256


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same as attention_reference, fast: q [n, num_heads, d]; k, v [num_kv_heads, L, d]
    (head-major: the layout the caches keep). Each KV head's query group is folded into one
    batch entry so K/V heads are read as they are, never repeated.

    A whole prompt goes to torch's fused causal SDPA (flash on CPU with 4-D inputs: about 2x the
    chunked matmuls below, measured here). Queries after cached tokens (chunked prefill, resumed
    or prefix-hit prompts) need a bottom-right causal mask: on CPU they run in query chunks that
    multiply only their causal prefix (SDPA with an explicit mask was several times slower);
    on CUDA SDPA takes the mask.
    """
    n, num_heads, d = q.shape
    num_kv, length = k.shape[0], k.shape[1]
    group = num_heads // num_kv
    qg = q.reshape(n, num_kv, group, d).permute(1, 2, 0, 3)  # [num_kv, group, n, d]
    if n == 1:
        # Decode: one query sees every key, no mask. Three plain ops beat SDPA's dispatch here.
        qg = qg.reshape(num_kv, group, d)
        scores = torch.bmm(qg, k.transpose(1, 2)) * d ** -0.5  # [num_kv, group, L]
        out = torch.bmm(scores.softmax(-1), v)  # [num_kv, group, d]
        return out.reshape(num_heads, 1, d).transpose(0, 1)
    if n == length:
        # A whole prompt from position 0: plain causal attention, which torch's fused kernels
        # (flash on CPU, given 4-D inputs) do fastest. [1, heads, n, d] x [1, kv_heads, L, d].
        out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0),
                                             v.unsqueeze(0), is_causal=True, enable_gqa=True)
        return out[0].transpose(0, 1)  # [n, num_heads, d]
    if q.device.type == "cuda":
        mask = causal_mask(n, length, q.device)  # [n, L]
        out = F.scaled_dot_product_attention(qg, k.unsqueeze(1), v.unsqueeze(1), attn_mask=mask)
    else:
        # Queries after a cached prefix: is_causal would align them to key 0, so mask by hand.
        out = _chunked_causal(qg, k.unsqueeze(1), v.unsqueeze(1), length - n)
    return out.permute(2, 0, 1, 3).reshape(n, num_heads, d)  # [n, num_heads, d]


def _chunked_causal(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    num_cached: int) -> torch.Tensor:
    """qg [num_kv, group, n, d] at positions [num_cached, num_cached + n); k, v [num_kv, 1, L, d].
    Query rows [start, end) see keys [0, num_cached + end) only: the causal triangle is skipped,
    and only the last (end - start) key columns need masking (the keys before them are visible
    to every row of the chunk)."""
    n, d = qg.shape[2], qg.shape[3]
    qg = qg * d ** -0.5  # scale the queries once instead of every score
    out = torch.empty_like(qg)
    for start in range(0, n, PREFILL_CHUNK_QUERIES):
        end = min(n, start + PREFILL_CHUNK_QUERIES)
        num_keys = num_cached + end
        # [num_kv, group, end - start, num_keys]
        scores = torch.matmul(qg[:, :, start:end], k[:, :, :num_keys].transpose(-1, -2))
        diagonal = scores[..., num_cached + start:]  # [.., end - start, end - start]
        diagonal.masked_fill_(~causal_mask(end - start, end - start, qg.device), float("-inf"))
        out[:, :, start:end] = torch.matmul(scores.softmax(-1), v[:, :, :num_keys])
    return out
