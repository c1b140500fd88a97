"""Batched token sampling for one engine step: penalties, min_tokens, greedy/temperature/top-k/
top-p/min-p and logprobs, with vLLM's semantics. Stop checks, detokenization and the per-request
generators (seeded from params.seed, kept across steps) are the caller's.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvserve.request import SamplingParams

# (row ids [m] long, token ids [m] long): a sparse [num_seqs, vocab] set of positions.
TokenIndex = tuple[torch.Tensor, torch.Tensor]


def _token_index(rows_tokens: list[tuple[int, Sequence[int]]], device) -> TokenIndex | None:
    rows = [row for row, tokens in rows_tokens for _ in tokens]
    if not rows:
        return None
    token_ids = [t for _, tokens in rows_tokens for t in tokens]
    return (torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor(token_ids, dtype=torch.long, device=device))


def token_mask_rows(masks: Sequence[tuple[int, bytes]], vocab: int) -> np.ndarray:
    """[len(masks), vocab] bool from bit masks (bit t of byte t // 8, little-endian, set when
    token t is allowed; tokens past the mask's bits are not allowed)."""
    bits = np.frombuffer(b"".join(m for _, m in masks), np.uint8).reshape(len(masks), -1)
    allowed = np.unpackbits(bits, axis=1, bitorder="little").view(bool)
    if allowed.shape[1] < vocab:
        allowed = np.pad(allowed, ((0, 0), (0, vocab - allowed.shape[1])))
    return allowed[:, :vocab]


def reference_token_mask(mask: bytes, vocab: int) -> list[bool]:
    """token_mask_rows' definition, one token at a time."""
    return [t // 8 < len(mask) and bool(mask[t // 8] >> (t % 8) & 1) for t in range(vocab)]


def apply_token_masks(logits: torch.Tensor, masks: Sequence[tuple[int, bytes]]
                      ) -> torch.Tensor:
    """Structured outputs: the logits with -inf for every token row i's grammar does not allow
    (masks: (row, bit mask) pairs, kvserve/structured.py Grammar.allowed_bits)."""
    allowed = torch.from_numpy(token_mask_rows(masks, logits.shape[1])).to(logits.device)
    rows = torch.tensor([i for i, _ in masks], dtype=torch.long, device=logits.device)
    return logits.index_put((rows,), logits.index_select(0, rows).masked_fill(~allowed,
                                                                              float("-inf")))


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [num_seqs, vocab] -> [num_seqs] long, the first largest of each row (NaN counts as
    largest), as torch.argmax(dim=-1). On the CPU through numpy, whose argmax is vectorized:
    ~5 us for a 49,152-token vocabulary against torch's ~55 us, on a decode step of ~7 ms."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(logits.numpy().argmax(-1).astype(np.int64, copy=False))
    return logits.argmax(dim=-1)


def _stop_ids_for_min_tokens(params: SamplingParams, eos_token_ids: Sequence[int]) -> list[int]:
    """vLLM masks the stop token ids, and EOS unless ignore_eos (then EOS does not stop anyway)."""
    return list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_token_ids))


@dataclass
class SamplingBatch:
    """Per-step sampling tensors. An optional field is None when no row needs that step."""

    random_rows: torch.Tensor  # [num_random] long: the rows that sample (not greedy)
    temperature: torch.Tensor  # [num_seqs] float32, 1.0 on greedy rows (never divides by 0)
    top_k: torch.Tensor | None  # [num_seqs] long, 0 = off
    top_p: torch.Tensor | None  # [num_seqs] float32, 1.0 = off
    min_p: torch.Tensor | None  # [num_seqs] float32, 0.0 = off
    repetition_penalty: torch.Tensor | None  # [num_seqs] float32, 1.0 = off
    seen_tokens: TokenIndex | None  # prompt + output tokens of rows with a repetition penalty
    frequency_penalty: torch.Tensor | None  # [num_seqs] float32
    presence_penalty: torch.Tensor | None  # [num_seqs] float32
    output_tokens: TokenIndex | None  # output tokens (repeats kept) of rows with either of those
    min_tokens_banned: TokenIndex | None  # stop/EOS ids of rows still short of min_tokens
    max_num_logprobs: int | None  # largest params.logprobs in the batch; None: nobody asked
    generators: list[torch.Generator | None]
    seeded: list[tuple[int, int]]  # (row, its index among random_rows) with their own generator
    any_unseeded: bool  # some random row draws from torch's default generator
    all_greedy: bool
    any_greedy: bool

    @classmethod
    def build(cls, params_list: Sequence[SamplingParams], prompt_token_ids: Sequence[Sequence[int]],
              output_token_ids: Sequence[Sequence[int]],
              generators: Sequence[torch.Generator | None], device: torch.device | str,
              eos_token_ids: Sequence[int] = ()) -> SamplingBatch:
        lengths = {len(params_list), len(prompt_token_ids), len(output_token_ids), len(generators)}
        if len(lengths) > 1:
            raise ValueError("params, prompt ids, output ids and generators differ in length")
        greedy = [p.greedy for p in params_list]
        if all(greedy) and all(p.plain(len(out)) for p, out in zip(params_list,
                                                                      output_token_ids)):
            return cls._plain_greedy(list(generators), device)

        def column(values: list, neutral, dtype: torch.dtype, random_only: bool = True):
            if random_only:  # greedy rows ignore these: keep them neutral
                values = [neutral if g else v for g, v in zip(greedy, values, strict=True)]
            if all(v == neutral for v in values):
                return None
            return torch.tensor(values, dtype=dtype, device=device)

        ps = list(params_list)
        rep = column([p.repetition_penalty for p in ps], 1.0, torch.float32, random_only=False)
        freq = column([p.frequency_penalty for p in ps], 0.0, torch.float32, random_only=False)
        pres = column([p.presence_penalty for p in ps], 0.0, torch.float32, random_only=False)
        logprob_counts = [p.logprobs for p in ps if p.logprobs is not None]
        random_rows = [i for i, g in enumerate(greedy) if not g]
        return cls(
            random_rows=torch.tensor(random_rows, dtype=torch.long, device=device),
            temperature=torch.tensor([1.0 if p.greedy else p.temperature for p in ps],
                                     dtype=torch.float32, device=device),
            top_k=column([p.top_k for p in ps], 0, torch.long),
            top_p=column([p.top_p for p in ps], 1.0, torch.float32),
            min_p=column([p.min_p for p in ps], 0.0, torch.float32),
            repetition_penalty=rep,
            seen_tokens=None if rep is None else _token_index(
                [(i, [*prompt_token_ids[i], *output_token_ids[i]])
                 for i, p in enumerate(ps) if p.repetition_penalty != 1.0], device),
            frequency_penalty=freq,
            presence_penalty=pres,
            output_tokens=None if freq is None and pres is None else _token_index(
                [(i, output_token_ids[i]) for i, p in enumerate(ps)
                 if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0], device),
            min_tokens_banned=_token_index(
                [(i, _stop_ids_for_min_tokens(p, eos_token_ids)) for i, p in enumerate(ps)
                 if len(output_token_ids[i]) < p.min_tokens], device),
            max_num_logprobs=max(logprob_counts) if logprob_counts else None,
            generators=list(generators),
            seeded=[(row, j) for j, row in enumerate(random_rows)
                    if generators[row] is not None],
            any_unseeded=any(generators[i] is None for i in random_rows),
            all_greedy=not random_rows,
            any_greedy=any(greedy),
        )

    @classmethod
    def _plain_greedy(cls, generators: list, device) -> SamplingBatch:
        """Every row greedy with nothing to change its logits and no logprobs: what build() gives
        for such rows, without its per-row columns (a decode step's common case)."""
        none = torch.empty(0, dtype=torch.long, device=device)
        return cls(random_rows=none, temperature=torch.ones(len(generators), device=device),
                   top_k=None, top_p=None, min_p=None, repetition_penalty=None,
                   seen_tokens=None, frequency_penalty=None, presence_penalty=None,
                   output_tokens=None, min_tokens_banned=None, max_num_logprobs=None,
                   generators=generators, seeded=[], any_unseeded=False, all_greedy=True,
                   any_greedy=bool(generators))

    @property
    def changes_logits(self) -> bool:
        return (self.repetition_penalty is not None or self.frequency_penalty is not None
                or self.presence_penalty is not None or self.min_tokens_banned is not None)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [num_seqs] long
    # Only when some row asked for logprobs; from log_softmax of the penalized logits (see Sampler).
    logprobs: torch.Tensor | None = None  # [num_seqs] float32: each chosen token's log-prob
    top_token_ids: torch.Tensor | None = None  # [num_seqs, max_num_logprobs] long
    top_logprobs: torch.Tensor | None = None  # [num_seqs, max_num_logprobs] float32

    def logprob_lists(self, num_logprobs: Sequence[int | None]
                      ) -> list[tuple[float, dict[int, float]] | None]:
        """Per row: (chosen logprob, {token id: logprob} of its top k), as Request keeps them."""
        if self.logprobs is None:
            return [None] * len(num_logprobs)
        chosen, ids, values = (self.logprobs.tolist(), self.top_token_ids.tolist(),
                               self.top_logprobs.tolist())
        return [None if k is None else (chosen[row], dict(zip(ids[row][:k], values[row][:k],
                                                              strict=True)))
                for row, k in enumerate(num_logprobs)]


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """In place on float32 [num_seqs, vocab]: repetition (HF/vLLM), then frequency/presence
    (OpenAI: logit -= frequency * count + presence * (count > 0), output tokens only), then the
    min_tokens mask."""
    if batch.repetition_penalty is not None and batch.seen_tokens is not None:
        seen = torch.zeros_like(logits, dtype=torch.bool)  # [num_seqs, vocab]
        seen[batch.seen_tokens] = True
        penalty = batch.repetition_penalty.unsqueeze(-1)  # [num_seqs, 1]
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits.copy_(torch.where(seen, penalized, logits))
        # A tiny penalty can push a logit to +inf, and softmax/log_softmax of inf is NaN.
        logits.clamp_(max=torch.finfo(logits.dtype).max)
    if batch.output_tokens is not None:
        counts = torch.zeros_like(logits)  # [num_seqs, vocab] float32 occurrences in the output
        ones = torch.ones(batch.output_tokens[1].shape, dtype=logits.dtype, device=logits.device)
        counts.index_put_(batch.output_tokens, ones, accumulate=True)
        zero = torch.zeros((), device=logits.device)
        freq = zero if batch.frequency_penalty is None else batch.frequency_penalty.unsqueeze(-1)
        pres = zero if batch.presence_penalty is None else batch.presence_penalty.unsqueeze(-1)
        logits.sub_(freq * counts + pres * (counts > 0))
    if batch.min_tokens_banned is not None:
        rows, token_ids = batch.min_tokens_banned
        in_vocab = token_ids < logits.shape[-1]  # ignore stop ids the model cannot produce
        logits[rows[in_vocab], token_ids[in_vocab]] = -math.inf


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> None:
    """In place. top-k keeps logits >= the k-th largest (ties kept, as vLLM); top-p then keeps the
    fewest most likely tokens whose renormalized mass reaches top_p (at least one)."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [num_seqs, vocab]
    if top_k is not None:
        k = top_k.masked_fill(top_k == 0, vocab).clamp_(max=vocab)  # [num_seqs]
        kth_largest = sorted_logits.gather(-1, (k - 1).unsqueeze(-1))  # [num_seqs, 1]
        sorted_logits.masked_fill_(sorted_logits < kth_largest, -math.inf)
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)  # [num_seqs, vocab]
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        limit = torch.where(top_p < 1.0, top_p, math.inf).unsqueeze(-1)  # [num_seqs, 1]
        drop = mass_before >= limit
        drop[:, 0] = False  # the most likely token always stays (top_p 1e-300 is 0 in float32)
        sorted_logits.masked_fill_(drop, -math.inf)
    logits.scatter_(-1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """In place: drop tokens with prob < min_p * max prob, i.e. logit < max logit + log(min_p)."""
    floor = logits.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(-1)  # [num_seqs, 1]
    logits.masked_fill_(logits < floor, -math.inf)


def _exponential(out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Exp(1) draws as -log(1 - U), U uniform on [0, 1) (4-5x faster on CPU than torch's
    exponential_), floored above 0 so that 0 / 0 never makes a NaN."""
    return (out.uniform_(generator=generator).neg_().log1p_().neg_()
            .clamp_min_(torch.finfo(out.dtype).tiny))


def _sample_random(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, then the exponential race argmax(probs / Exp(1)), which
    samples from probs; each seeded row draws vocab values from its own generator. Only the
    random rows are worked on (greedy rows cost nothing here): returns [num_random] token ids."""
    rows = batch.random_rows
    subset = len(rows) < logits.shape[0]

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return t.index_select(0, rows) if t is not None and subset else t

    work = logits.index_select(0, rows) if subset else logits  # [num_random, vocab]
    work.div_(pick(batch.temperature).unsqueeze(-1))
    top_k, top_p, min_p = pick(batch.top_k), pick(batch.top_p), pick(batch.min_p)
    if top_k is not None or top_p is not None:
        apply_top_k_top_p(work, top_k, top_p)
    if min_p is not None:
        apply_min_p(work, min_p)
    probs = work.softmax(dim=-1)  # [num_random, vocab]
    race = torch.empty_like(probs)  # [num_random, vocab] Exp(1) arrival times
    if batch.any_unseeded:
        _exponential(race, None)
    for row, j in batch.seeded:
        _exponential(race[j], batch.generators[row])
    return argmax_rows(probs.div_(race))


class Sampler:
    """Picks one token per row; stateless. Logprobs are log_softmax of the logits after penalties
    and the min_tokens mask, before temperature/top-k/top-p/min-p: the model's distribution as
    penalized, independent of how the token was drawn (vLLM returns the raw model's by default)."""

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if batch.all_greedy and not batch.changes_logits:  # fast path: no copy
            return self._output(argmax_rows(logits), self._logprobs(logits, batch), batch)
        work = logits.to(torch.float32, copy=True)  # [num_seqs, vocab]
        apply_penalties(work, batch)
        logprobs = self._logprobs(work, batch)
        token_ids = argmax_rows(work) if batch.any_greedy else None  # [num_seqs]
        if not batch.all_greedy:
            sampled = _sample_random(work, batch)  # [num_random]
            token_ids = sampled if token_ids is None else token_ids.index_copy_(
                0, batch.random_rows, sampled)
        return self._output(token_ids, logprobs, batch)

    @staticmethod
    def _logprobs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor | None:
        if batch.max_num_logprobs is None:
            return None
        return logits.float().log_softmax(dim=-1)  # [num_seqs, vocab]

    @staticmethod
    def _output(token_ids: torch.Tensor, logprobs: torch.Tensor | None,
                batch: SamplingBatch) -> SamplerOutput:
        if logprobs is None or batch.max_num_logprobs is None:
            return SamplerOutput(token_ids)
        chosen = logprobs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)  # [num_seqs]
        top = logprobs.topk(min(batch.max_num_logprobs, logprobs.shape[-1]), dim=-1)
        return SamplerOutput(token_ids, chosen, top.indices, top.values)


# ---- Plain per-row reference: slow, obvious, used by the tests to check the batched code. ----

def reference_penalize_row(logits_row: torch.Tensor, params: SamplingParams,
                           prompt_ids: Sequence[int], output_ids: Sequence[int],
                           eos_token_ids: Sequence[int] = ()) -> torch.Tensor:
    row = logits_row.to(torch.float32, copy=True)  # [vocab]
    penalty = params.repetition_penalty
    for token in set(prompt_ids) | set(output_ids):
        row[token] = row[token] / penalty if row[token] > 0 else row[token] * penalty
    for token, count in Counter(output_ids).items():
        row[token] -= params.frequency_penalty * count + params.presence_penalty
    if len(output_ids) < params.min_tokens:
        for token in _stop_ids_for_min_tokens(params, eos_token_ids):
            if token < len(row):
                row[token] = -math.inf
    return row


def _reference_keep(values: list[float], params: SamplingParams) -> set[int]:
    """Token ids surviving top-k, top-p and min-p, by loops over Python floats."""
    order = sorted(range(len(values)), key=lambda t: -values[t])  # stable, like torch.sort
    keep = set(order)
    if 0 < params.top_k < len(values):
        kth = values[order[params.top_k - 1]]
        keep = {t for t in keep if values[t] >= kth}

    def probs(tokens: set[int]) -> dict[int, float]:
        top = max(values[t] for t in tokens)
        weights = {t: math.exp(values[t] - top) for t in tokens}
        return {t: w / sum(weights.values()) for t, w in weights.items()}

    if params.top_p < 1.0:
        p, mass, kept = probs(keep), 0.0, set()
        for t in (t for t in order if t in keep):
            if mass >= params.top_p:
                break
            kept.add(t)
            mass += p[t]
        keep = kept
    if params.min_p > 0.0:
        p = probs(keep)
        keep = {t for t in keep if p[t] >= params.min_p * max(p.values())}
    return keep


def reference_sample_row(logits_row: torch.Tensor, params: SamplingParams,
                         prompt_ids: Sequence[int], output_ids: Sequence[int],
                         generator: torch.Generator | None,
                         eos_token_ids: Sequence[int] = ()) -> int:
    row = reference_penalize_row(logits_row, params, prompt_ids, output_ids, eos_token_ids)
    if params.greedy:
        return int(row.argmax())
    row = row / torch.tensor(params.temperature, dtype=torch.float32)
    keep = sorted(_reference_keep(row.tolist(), params))
    masked = torch.full_like(row, -math.inf)
    masked[keep] = row[keep]
    probs = masked.softmax(dim=-1)
    return int((probs / _exponential(torch.empty_like(probs), generator)).argmax())
