"""KV cache groups: one block table per group of layers that attend alike, over one pool of pages.

A model whose layers differ in what they read (Gemma 2's alternating local and global layers,
Gemma 3's five local to one global, Qwen2 with windows on some layers) cannot release a block
while any layer still reads it, so with one table per sequence its windowed layers keep every
block the global ones do. With a table per group, each group's blocks follow its own retention
policy: a windowed group releases what falls out of its window while a full-attention group keeps
everything.

The groups share one pool, as vLLM's hybrid KV cache manager does: every group has the same
number of layers (`page_layers`), so a pool block ("page") holds one block of tokens for
page_layers layers and serves any group. A layer type with more layers than that is split into
several groups with the same policy; the last group of a type may be short (its spare rows are
padding). Layer l's K/V live in storage row `row_of_layer[l]` of the page its group's table names.
One layer type: one group of every layer, exactly the single table the engine always had. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVGroups:
    layers: tuple[tuple[int, ...], ...]  # each group's layers, ascending
    windows: tuple[int | None, ...]  # each group's sliding window (None: full attention)

    @property
    def num_groups(self) -> int:
        return len(self.layers)

    @property
    def page_layers(self) -> int:
        """Layers one pool page holds: the largest group's."""
        return max(len(g) for g in self.layers)

    @property
    def num_layers(self) -> int:
        return sum(len(g) for g in self.layers)

    @property
    def group_of_layer(self) -> tuple[int, ...]:
        out = [0] * self.num_layers
        for g, layers in enumerate(self.layers):
            for layer in layers:
                out[layer] = g
        return tuple(out)

    @property
    def row_of_layer(self) -> tuple[int, ...]:
        """Each layer's storage row within its group's pages."""
        out = [0] * self.num_layers
        for layers in self.layers:
            for row, layer in enumerate(layers):
                out[layer] = row
        return tuple(out)

    @property
    def padding_layers(self) -> int:
        """Storage rows no layer uses, over all groups (bytes a page carries for nothing)."""
        return self.num_groups * self.page_layers - self.num_layers

    def describe(self) -> str:
        """For the start-up log: 'one block table', or the tables per layer type."""
        if self.num_groups == 1:
            return "one block table"
        parts = []
        for window in dict.fromkeys(self.windows):
            groups = [g for g, w in zip(self.layers, self.windows) if w == window]
            what = "full attention" if window is None else f"a {window}-token window"
            parts.append(f"{len(groups)} for {sum(map(len, groups))} layers with {what}")
        return (f"{self.num_groups} block tables ({'; '.join(parts)}), "
                f"{self.page_layers} layers per block")


def single_group(num_layers: int, window: int | None = None) -> KVGroups:
    return KVGroups((tuple(range(num_layers)),), (window,))


def kv_groups(layer_windows: tuple[int, ...], num_layers: int) -> KVGroups:
    """The groups for a model's per-layer windows (0 or absent: full attention). Layers with the
    same window form a type; each type is cut into groups of the smallest type's size (full
    attention first, then windows in the order the layers first use them)."""
    windows = tuple(layer_windows) or (0,) * num_layers
    types: dict[int, list[int]] = {}
    for layer, w in enumerate(windows):
        types.setdefault(w, []).append(layer)
    if len(types) == 1:
        (w,) = types
        return single_group(num_layers, w or None)
    order = sorted(types, key=lambda w: (w != 0, types[w][0]))
    size = min(len(types[w]) for w in order)
    layers, group_windows = [], []
    for w in order:
        members = types[w]
        for i in range(0, len(members), size):
            layers.append(tuple(members[i:i + size]))
            group_windows.append(w or None)
    return KVGroups(tuple(layers), tuple(group_windows))
