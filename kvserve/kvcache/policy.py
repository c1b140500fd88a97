"""Which of a sequence's blocks attention will still read: the seam for window policies.

Full history keeps every block until the sequence ends (every layer attends to every earlier
token). A model whose every layer has a sliding window (Mistral v0.1, Phi-3 mini) reads only the
last W tokens, so the blocks wholly before them go back to the pool mid-sequence: the block
manager asks the policy after each step (BlockManager.release_unread).
"""

from __future__ import annotations

from typing import Protocol


class RetentionPolicy(Protocol):
    name: str

    def kept_block_indices(self, num_tokens: int, block_size: int) -> range:
        """Indices (into the sequence's block table) of the blocks still read once the
        sequence holds num_tokens tokens; blocks outside the range can be released."""
        ...


class FullHistory:
    """Every block stays until the sequence ends."""

    name = "full"

    def kept_block_indices(self, num_tokens: int, block_size: int) -> range:
        return range(-(-num_tokens // block_size))


class SlidingWindow:
    """Every layer attends to the last `window` tokens at most (the smallest of the layers'
    windows): once a sequence holds n computed tokens, its next query (at position n) reads keys
    n - window + 1 .. n, so the blocks wholly before key n - window + 1 are released."""

    name = "sliding-window"

    def __init__(self, window: int):
        if window < 1:
            raise ValueError(f"a sliding window holds at least one token, got {window}")
        self.window = window

    def kept_block_indices(self, num_tokens: int, block_size: int) -> range:
        first = max(0, num_tokens - self.window + 1) // block_size
        return range(first, -(-num_tokens // block_size))


def policy_for(layer_windows: tuple[int, ...]) -> RetentionPolicy:
    """Sliding window when every layer has one (a layer with full attention reads every block)."""
    if layer_windows and all(layer_windows):
        return SlidingWindow(min(layer_windows))
    return FullHistory()
