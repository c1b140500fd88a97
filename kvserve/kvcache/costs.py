"""Fetch or recompute: what moving a run of cached blocks up from a lower tier costs, against
what prefilling their tokens again costs. No torch.

Both sides are measured: the engine times a transfer of real blocks per tier and a real prefill
at start-up, then feeds every transfer and every prefill-only step it runs back in (moving
averages), so the decision follows the machine as it is now (bandwidth drifts, a disk warms
up, Redis sits across a network). The model of a prefill of n tokens after `start` cached ones:

    seconds = per_token * n * (1 + attention_ratio * (start + n / 2))

per_token is measured at start-up; attention_ratio starts as the model's attention FLOPs per
token per context token over its matmul FLOPs per token (4 * layers * heads * head_dim / 2 *
params), so a long prefix makes recomputing each token dearer, as it is. Real prefill steps then
fit both by least squares (attention costs more than its FLOPs on a CPU: about twice).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

SMOOTHING = 0.2  # weight of a new measurement in the moving averages


@dataclass
class TransferRate:
    """A tier's measured cost: a fixed latency per batch of blocks plus bytes / bandwidth."""

    bytes_per_s: float
    latency_s: float = 0.0

    def seconds(self, num_bytes: int) -> float:
        return self.latency_s + num_bytes / self.bytes_per_s

    def observe(self, num_bytes: int, seconds: float) -> None:
        """A real transfer: its bandwidth net of the latency joins the moving average."""
        if num_bytes <= 0 or seconds <= 0:
            return
        rate = num_bytes / max(seconds - self.latency_s, seconds * 0.1)
        self.bytes_per_s += SMOOTHING * (rate - self.bytes_per_s)


@dataclass
class PrefillRate:
    """per_token_s: seconds per token at an empty context; attention_ratio: how much dearer each
    context token makes a token (a prior from the model's FLOPs, then fitted)."""

    per_token_s: float
    attention_ratio: float
    # decayed sums over prefill steps of (L = tokens, A = tokens x mean context, y = seconds):
    # LL, LA, AA, Ly, Ay, for the least-squares fit y = per_token_s * (L + attention_ratio * A)
    _sums: list[float] = field(default_factory=lambda: [0.0] * 5, repr=False)

    def seconds(self, num_tokens: int, start: int) -> float:
        return self.per_token_s * self.work(num_tokens, start)

    def work(self, num_tokens: int, start: int) -> float:
        """A prefill's cost in units of per_token_s."""
        return num_tokens * (1 + self.attention_ratio * (start + num_tokens / 2))

    def observe_many(self, prefills: Sequence[tuple[int, int]], seconds: float) -> None:
        """A step of prefills (num_tokens, start) took `seconds`. Both terms are fitted by
        least squares over recent steps (older ones decay) once steps at short and long
        contexts have been seen; until then the FLOP prior keeps attention_ratio and the
        moving average moves per_token_s."""
        lin = float(sum(n for n, _ in prefills))
        att = float(sum(n * (start + n / 2) for n, start in prefills))
        if lin <= 0 or seconds <= 0:
            return
        s = self._sums
        for i, v in enumerate((lin * lin, lin * att, att * att, lin * seconds, att * seconds)):
            s[i] = (1 - SMOOTHING / 4) * s[i] + v
        ll, la, aa, ly, ay = s
        det = ll * aa - la * la
        if det > 1e-3 * ll * aa:  # contexts varied enough to tell the two terms apart
            a, b = (ly * aa - ay * la) / det, (ay * ll - ly * la) / det
            if a > 0 and b >= 0:
                self.per_token_s, self.attention_ratio = a, b / a
                return
        work = lin + self.attention_ratio * att
        self.per_token_s += SMOOTHING * (seconds / work - self.per_token_s)


@dataclass(frozen=True)
class Decision:
    fetch: bool
    fetch_s: float  # expected seconds to bring the blocks up
    recompute_s: float  # expected seconds to prefill their tokens again


def attention_ratio(num_layers: int, num_heads: int, head_dim: int, num_params: int) -> float:
    """Attention FLOPs per token per context token (QK and PV) over matmul FLOPs per token."""
    return 4 * num_layers * num_heads * head_dim / max(1, 2 * num_params)


def decide(rate: TransferRate, prefill: PrefillRate, num_bytes: int, num_tokens: int,
           start: int) -> Decision:
    """Fetch num_tokens tokens' blocks (num_bytes) that follow `start` cached tokens, or
    recompute them: whichever is expected to be faster."""
    fetch_s, recompute_s = rate.seconds(num_bytes), prefill.seconds(num_tokens, start)
    return Decision(fetch_s < recompute_s, fetch_s, recompute_s)
