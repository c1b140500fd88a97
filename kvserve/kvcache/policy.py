"""Which of a sequence's blocks attention will still read: the retention policies.

Full history keeps every block until the sequence ends (every layer attends to every earlier
token). A model whose every layer has a sliding window (Mistral v0.1, Phi-3 mini) reads only the
last W tokens, so the blocks wholly before them go back to the pool mid-sequence. Attention
sinks (StreamingLLM, --cache-policy sinks) keep the first tokens' blocks and the last W tokens'
blocks of any model and release the run between. The block manager asks the policy after each
step which run of a sequence's table no layer reads any more (BlockManager.release_unread); the
paged attention asks it which blocks to read.
"""

from __future__ import annotations

from typing import Protocol


class RetentionPolicy(Protocol):
    name: str
    description: str  # for the start-up log and --stats

    def released_blocks(self, num_tokens: int, block_size: int) -> range:
        """The run of table indices no layer reads once the sequence holds num_tokens computed
        tokens (its next query is at position num_tokens); its start never moves."""
        ...

    def exact_blocks(self, block_size: int) -> int | None:
        """Leading blocks whose K/V equal what full attention computes (None: every block), the
        only ones another request may reuse from the prefix cache."""
        ...

    def most_tokens_held(self, num_tokens: int, step_tokens: int, block_size: int) -> int:
        """Tokens' worth of blocks a sequence of num_tokens holds at most, at steps of up to
        step_tokens new tokens."""
        ...


def _first_window_block(num_tokens: int, window: int, block_size: int) -> int:
    """The block of the next query's first key: keys num_tokens - window + 1 .. num_tokens."""
    return max(0, num_tokens - window + 1) // block_size


class FullHistory:
    """Every block stays until the sequence ends."""

    name = "full"
    description = "full history"

    def released_blocks(self, num_tokens: int, block_size: int) -> range:
        return range(0)

    def exact_blocks(self, block_size: int) -> int | None:
        return None

    def most_tokens_held(self, num_tokens: int, step_tokens: int, block_size: int) -> int:
        return num_tokens


class SlidingWindow:
    """Every layer attends to the last `window` tokens at most (the largest of the layers'
    windows): once a sequence holds n computed tokens, its next query (at position n) reads keys
    n - window + 1 .. n, so the blocks wholly before key n - window + 1 are released. The model
    itself is windowed, so every block's K/V are exact."""

    name = "sliding-window"

    def __init__(self, window: int):
        if window < 1:
            raise ValueError(f"a sliding window holds at least one token, got {window}")
        self.window = window
        self.description = f"the model's sliding window ({window} tokens)"

    def released_blocks(self, num_tokens: int, block_size: int) -> range:
        return range(0, _first_window_block(num_tokens, self.window, block_size))

    def exact_blocks(self, block_size: int) -> int | None:
        return None

    def most_tokens_held(self, num_tokens: int, step_tokens: int, block_size: int) -> int:
        # the window's keys and one step's tokens, each run rounded out to whole blocks
        return min(num_tokens, self.window + step_tokens + block_size)


class Sinks:
    """StreamingLLM's attention sinks for any model: the blocks of the first sink_tokens tokens
    (rounded up to whole blocks) and those of the last `window` tokens stay; the run between
    goes back to the pool. Attention reads the sinks as if they sat just before the window
    (model/attention/paged.py rotates them), so every distance it sees stays within the cache.
    Only the blocks computed before anything was released are exact."""

    name = "sinks"

    def __init__(self, sink_tokens: int, window: int, block_size: int):
        if sink_tokens < 0 or window < block_size:
            raise ValueError(f"sinks need sink_tokens >= 0 and a window of at least a block "
                             f"({block_size}), got {sink_tokens} and {window}")
        self.sink_blocks = -(-sink_tokens // block_size)
        self.sink_tokens = self.sink_blocks * block_size  # what is kept: whole blocks
        self.window = window
        self.description = f"sinks ({self.sink_tokens} sink tokens, a {window}-token window)"

    def released_blocks(self, num_tokens: int, block_size: int) -> range:
        first = _first_window_block(num_tokens, self.window, block_size)
        return range(self.sink_blocks, max(self.sink_blocks, first))

    def exact_blocks(self, block_size: int) -> int | None:
        # a query at position p < (sink_blocks + 1) * block_size + window - 1 sees every key
        return ((self.sink_blocks + 1) * block_size + self.window - 1) // block_size

    def most_tokens_held(self, num_tokens: int, step_tokens: int, block_size: int) -> int:
        return min(num_tokens, self.sink_tokens + self.window + step_tokens + block_size)

    @staticmethod
    def default_window(context: int, sink_tokens: int, block_size: int, step_tokens: int) -> int:
        """The largest window that keeps every distance attention sees (the sinks, the window,
        one step and a block) inside the model's context."""
        sinks = -(-sink_tokens // block_size) * block_size
        return max(block_size, context - sinks - step_tokens - block_size)


class PerGroup:
    """A model with several KV groups (kvcache/groups.py): each group's table follows its own
    policy; this names them together for logs and snapshots."""

    name = "per-group"

    def __init__(self, policies: list[RetentionPolicy]):
        self.policies = policies
        kinds = ", ".join(dict.fromkeys(p.description for p in policies))
        self.description = f"a block table per layer group ({kinds})"


def most_blocks_held(policies: list[RetentionPolicy], num_tokens: int, step_tokens: int,
                     block_size: int) -> int:
    """The most blocks a sequence of num_tokens holds at once with a table under each policy
    (one table, or one per KV group), at steps of up to step_tokens new tokens."""
    return sum(-(-p.most_tokens_held(num_tokens, step_tokens, block_size) // block_size)
               for p in policies)


def group_policy(window: int | None) -> RetentionPolicy:
    return FullHistory() if window is None else SlidingWindow(window)


def policy_for(layer_windows: tuple[int, ...]) -> RetentionPolicy:
    """Sliding window when every layer has one (a layer with full attention reads every block):
    the largest, since a block is released only when no layer reads it."""
    if layer_windows and all(layer_windows):
        return SlidingWindow(max(layer_windows))
    return FullHistory()
