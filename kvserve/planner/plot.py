"""`kvserve plan --plot`: KV memory against context length for several concurrency levels, with the
memory left for the KV cache marked (matplotlib, PNG). No torch."""

from __future__ import annotations

from kvserve.errors import KVServeError
from kvserve.kvcache.layout import KVLayout
from kvserve.planner.capacity import CapacityPlan, request_bytes
from kvserve.planner.simulate import SimulationResult


def concurrency_levels(concurrency: int) -> list[int]:
    return sorted({c for c in (1, concurrency // 4, concurrency // 2, concurrency,
                               2 * concurrency) if c > 0})


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise KVServeError("--plot needs matplotlib (the 'lab' extra): "
                           "pip install 'kvserve[lab]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str) -> str:
    """Write the figure and close it, written or not."""
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as err:
        raise KVServeError(f"cannot write the plot to '{path}': {err.strerror or err}") from None
    finally:
        plt.close(fig)
    return path


def plot_plan(p: CapacityPlan, path: str) -> str:
    """Write the PNG to `path`; returns it."""
    plt = _pyplot()

    layout = KVLayout(p.model.to_spec(), p.block_size, p.kv.kv_cache_dtype)
    top = max(p.context, min(p.model.max_context, 2 * p.context))
    contexts = sorted({max(1, top * i // 100) for i in range(101)})
    fig, ax = plt.subplots(figsize=(8, 5))
    for c in concurrency_levels(p.concurrency):
        gib = [c * request_bytes(layout, p.model, t)[1] / 2**30 for t in contexts]
        ax.plot(contexts, gib, label=f"{c} request{'s' if c > 1 else ''}",
                linewidth=2.5 if c == p.concurrency else 1.2)
    budget = p.kv_budget_bytes / 2**30
    ax.axhline(budget, color="black", linestyle="--",
               label=f"KV budget {budget:,.2f} GiB (memory - weights - reserve)")
    ax.axvline(p.context, color="grey", linestyle=":", label=f"context {p.context:,}")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"KV cache ({p.kv.kv_cache_dtype}), GiB")
    ax.set_title(f"{p.model.name}: KV cache vs context, {p.memory_bytes / 2**30:,.0f} GiB memory, "
                 f"{p.weights_dtype} weights")
    ax.set_ylim(0, max(budget * 1.5, 1e-3))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return _save(plt, fig, path)


def plot_simulation(sim: SimulationResult, path: str) -> str:
    """Blocks in use, and requests running and waiting, over simulated time."""
    plt = _pyplot()
    t = [row[0] for row in sim.timeline]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(t, [row[1] for row in sim.timeline], linewidth=1, label="blocks in use")
    top.axhline(sim.num_blocks_total, color="black", linestyle="--",
                label=f"pool: {sim.num_blocks_total:,} blocks")
    top.set_ylabel("KV blocks")
    top.set_title(f"Simulated traffic: peak {sim.peak_blocks_used:,} blocks, "
                  f"{sim.num_preemptions} preemptions")
    top.legend(loc="lower right", fontsize=8)
    bottom.plot(t, [row[2] for row in sim.timeline], linewidth=1, label="running")
    bottom.plot(t, [row[3] for row in sim.timeline], linewidth=1, label="waiting")
    bottom.set_xlabel("simulated time (s)")
    bottom.set_ylabel("requests")
    bottom.legend(loc="upper right", fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    return _save(plt, fig, path)
