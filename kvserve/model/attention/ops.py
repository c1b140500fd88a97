"""The attention math for one sequence: a plain reference and the SDPA fast path it is tested
against. Where K/V come from is the backends' business (dense.py, paged.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(num_queries: int, num_keys: int, device: torch.device,
                window: int | None = None) -> torch.Tensor:
    """Bool [num_queries, num_keys]: query i sits at key position num_keys - num_queries + i and
    sees the keys at or before it; with a sliding window W, only the last W of them (keys
    p - W + 1 .. p, as transformers' sliding_window)."""
    q_pos = torch.arange(num_keys - num_queries, num_keys, device=device).unsqueeze(1)
    keys = torch.arange(num_keys, device=device).unsqueeze(0)
    visible = keys <= q_pos
    return visible if window is None else visible & (keys > q_pos - window)


def softcap_(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma 2's tanh soft-capping, in place: cap * tanh(scores / cap)."""
    if cap is not None:
        scores.div_(cap).tanh_().mul_(cap)
    return scores


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        window: int | None = None, scale: float | None = None,
                        softcap: float | None = None) -> torch.Tensor:
    """Plain causal GQA attention for one sequence, computed in float32.

    q [n, num_heads, d]; k, v [L, num_kv_heads, d] with the n queries at positions [L - n, L);
    window: a sliding window in tokens (None: every earlier key); scale: the scores' factor
    (None: d ** -0.5); softcap: Gemma 2's cap on the scores (before the mask).
    """
    n, num_heads, d = q.shape
    group = num_heads // k.shape[1]
    k = k.repeat_interleave(group, dim=1).float()  # [L, num_heads, d]
    v = v.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k) * (scale or d ** -0.5)  # [heads, n, L]
    scores = softcap_(scores, softcap)
    scores = scores.masked_fill(~causal_mask(n, k.shape[0], q.device, window), float("-inf"))
    out = torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)
    return out.to(q.dtype)


PREFILL_CHUNK_QUERIES = 256


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   window: int | None = None, scale: float | None = None,
                   softcap: float | None = None) -> torch.Tensor:
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
    if window is not None and n == 1 and length > window:  # decode: the last `window` keys
        k, v, length = k[:, length - window:], v[:, length - window:], window
    if window is not None and length <= window:  # no query's window cuts a key off
        window = None
    qg = q.reshape(n, num_kv, group, d).permute(1, 2, 0, 3)  # [num_kv, group, n, d]
    if scale is not None or softcap is not None:  # Gemma 2: scores by hand, in query chunks
        out = _chunked_windowed(qg, k.unsqueeze(1), v.unsqueeze(1), length - n,
                                window or length + 1, scale, softcap)
        return out.permute(2, 0, 1, 3).reshape(n, num_heads, d)
    if window is not None:  # several queries, some of whose windows start after key 0
        if q.device.type == "cuda":
            mask = causal_mask(n, length, q.device, window)  # [n, L]
            out = F.scaled_dot_product_attention(qg, k.unsqueeze(1), v.unsqueeze(1),
                                                 attn_mask=mask)
        else:
            out = _chunked_windowed(qg, k.unsqueeze(1), v.unsqueeze(1), length - n, window)
        return out.permute(2, 0, 1, 3).reshape(n, num_heads, d)
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


def _chunked_windowed(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_cached: int,
                      window: int, scale: float | None = None,
                      softcap: float | None = None) -> torch.Tensor:
    """_chunked_causal under a sliding window: query rows [start, end) at positions
    num_cached + start.. read only keys [first row's p - window + 1, last row's p]; scores
    times `scale` (default d ** -0.5), soft-capped by `softcap` if given."""
    n, d = qg.shape[2], qg.shape[3]
    qg = qg * (scale or d ** -0.5)
    out = torch.empty_like(qg)
    for start in range(0, n, PREFILL_CHUNK_QUERIES):
        end = min(n, start + PREFILL_CHUNK_QUERIES)
        lo, hi = max(0, num_cached + start - window + 1), num_cached + end
        scores = softcap_(torch.matmul(qg[:, :, start:end], k[:, :, lo:hi].transpose(-1, -2)),
                          softcap)
        q_pos = torch.arange(num_cached + start, hi, device=qg.device).unsqueeze(1)
        keys = torch.arange(lo, hi, device=qg.device).unsqueeze(0)
        scores.masked_fill_((keys > q_pos) | (keys <= q_pos - window), float("-inf"))
        out[:, :, start:end] = torch.matmul(scores.softmax(-1), v[:, :, lo:hi])
    return out


def window_starts(positions: torch.Tensor, block_size: int, window_blocks: int) -> torch.Tensor:
    """For queries at these positions: the first key each reads from its residual window (its
    own last window_blocks blocks, kvstore/paged.py), a multiple of block_size; the keys before
    it are read through their codes."""
    return (positions // block_size + 1 - window_blocks).clamp(min=0) * block_size


def attention_windowed_reference(q: torch.Tensor, k_codes: torch.Tensor, v_codes: torch.Tensor,
                                 k_window: torch.Tensor, v_window: torch.Tensor,
                                 block_size: int, window_blocks: int,
                                 sliding: int | None = None, scale: float | None = None,
                                 softcap: float | None = None) -> torch.Tensor:
    """Plain causal GQA attention where query i reads key j as the window holds it (float32)
    when j is in i's window (window_starts), else as its codes decode: q [n, num_heads, d] at
    positions [L - n, L); k/v_codes and k/v_window [L, num_kv_heads, d], every position of the
    sequence in each representation; sliding: the layer's sliding window in tokens (keys before
    i - sliding + 1 unseen). Computed in float32, one query at a time."""
    n, num_heads, d = q.shape
    length = k_codes.shape[0]
    group = num_heads // k_codes.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for r in range(n):
        i = length - n + r
        w = int(window_starts(torch.tensor(i), block_size, window_blocks))
        k = torch.cat((k_codes[:w], k_window[w:i + 1])).repeat_interleave(group, dim=1).float()
        v = torch.cat((v_codes[:w], v_window[w:i + 1])).repeat_interleave(group, dim=1).float()
        first = 0 if sliding is None else max(0, i - sliding + 1)
        k, v = k[first:], v[first:]
        scores = softcap_(torch.einsum("hd,lhd->hl", q[r].float(), k) * (scale or d ** -0.5),
                          softcap)
        out[r] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v)
    return out.to(q.dtype)


def attention_windowed(q: torch.Tensor, k_codes: torch.Tensor, v_codes: torch.Tensor,
                       k_window: torch.Tensor, v_window: torch.Tensor, window_from: int,
                       block_size: int, window_blocks: int,
                       sliding: int | None = None, scale: float | None = None,
                       softcap: float | None = None) -> torch.Tensor:
    """attention_windowed_reference, head-major and in query chunks: q [n, num_heads, d] at
    positions [start, start + n) (start = L - n); k/v_codes [num_kv, >= window_starts of the
    last query, d] from position 0; k/v_window [num_kv, L - window_from, d] from position
    window_from (<= the first query's window start). Each chunk multiplies only the code
    columns before its last query's window and the window columns from its first query's
    window to its last query (no more than a plain causal chunk, plus the window's overlap)."""
    n, num_heads, d = q.shape
    num_kv = k_codes.shape[0]
    length = window_from + k_window.shape[1]
    start = length - n
    group = num_heads // num_kv
    qg = q.reshape(n, num_kv, group, d).permute(1, 2, 0, 3) * (scale or d ** -0.5)
    kc, vc = k_codes.unsqueeze(1), v_codes.unsqueeze(1)  # [kv, 1, L', d]
    kw, vw = k_window.unsqueeze(1), v_window.unsqueeze(1)
    out = torch.empty(qg.shape, dtype=qg.dtype, device=q.device)
    for s0 in range(0, n, PREFILL_CHUNK_QUERIES):
        s1 = min(n, s0 + PREFILL_CHUNK_QUERIES)
        pos = torch.arange(start + s0, start + s1, device=q.device)
        w = window_starts(pos, block_size, window_blocks)
        lo, hc, p1 = int(w[0]), int(w[-1]), start + s1  # window columns [lo, p1), codes [0, hc)
        qc = qg[:, :, s0:s1]
        sc = softcap_(torch.matmul(qc, kc[:, :, :hc].transpose(-1, -2)), softcap)
        sw = softcap_(torch.matmul(qc, kw[:, :, lo - window_from:p1 - window_from]
                                   .transpose(-1, -2)), softcap)
        cols_w = torch.arange(lo, p1, device=q.device)
        cols_c = torch.arange(hc, device=q.device)
        first = torch.zeros_like(pos) if sliding is None else pos - sliding + 1  # [rows]
        sc.masked_fill_((cols_c >= w[:, None]) | (cols_c < first[:, None]), float("-inf"))
        sw.masked_fill_((cols_w < w[:, None]) | (cols_w > pos[:, None]) | (cols_w < first[:, None]),
                        float("-inf"))
        p = torch.cat((sc, sw), dim=-1).softmax(-1)
        out[:, :, s0:s1] = torch.matmul(p[..., :hc], vc[:, :, :hc]) + torch.matmul(
            p[..., hc:], vw[:, :, lo - window_from:p1 - window_from])
    return out.permute(2, 0, 1, 3).reshape(n, num_heads, d)
