"""Output of the labs: CSV, PNG plots (matplotlib, Agg), JSON and the text summary a person pastes
into a report. Plots are skipped with one line of explanation when matplotlib is missing."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

from kvserve.bench.runs import CacheLabResult, ModeRun

# The seed's "typical setup" figure for a 500-token response (Daily Dose DS), shown beside ours.
SEED_NO_CACHE_S, SEED_CACHE_S, SEED_SPEEDUP, SEED_TOKENS = 40.0, 9.0, 4.5, 500
MIB = 1 << 20


def _plotting(lab: str, files: dict[str, str]) -> bool:
    """Whether matplotlib can draw the lab's plots; if not, say so on stderr (one line) and in
    the files' note."""
    try:
        import matplotlib
    except ImportError:
        files["plots_skipped"] = "matplotlib is not installed: pip install 'kvserve[lab]'"
        print(f"{lab} lab: plots skipped (matplotlib is not installed: pip install "
              "'kvserve[lab]'); the CSV and JSON are written", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    return True


def write_json_and_plots(result: dict, out: Path, lab: str,
                         plots: dict[str, tuple[str, Callable[[dict, str], None]]]
                         ) -> dict[str, str]:
    """A lab's JSON (`<lab>_lab.json`) and plots ({kind: (file name, plot(result, path))}) in
    `out`; without matplotlib the plots are skipped with one line on stderr and a note in the
    files. Returns {kind: path} of what was written."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / f"{lab}_lab.json")}
    if _plotting(lab, files):
        for kind, (name, plot) in plots.items():
            files[kind] = str(out / name)
            plot(result, files[kind])
    Path(files["json"]).write_text(json.dumps(result) + "\n")
    return files


def write_cache_lab(result: CacheLabResult, out: Path) -> dict[str, str]:
    """Writes the lab's files into `out`; returns {kind: path} of what was written."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"steps_csv": str(out / "cache_lab_steps.csv")}
    with open(files["steps_csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["mode", "token_index", "context_len", "step_ms", "kv_projections",
                         "kv_bytes", "kv_blocks"])
        for run in result.runs:
            for s in run.samples:
                writer.writerow([run.mode, s.token_index, s.context_len,
                                 f"{s.step_s * 1e3:.3f}", s.kv_projections, s.kv_bytes,
                                 "" if s.kv_blocks is None else s.kv_blocks])
    if _plotting("cache", files):
        files["time_png"] = str(out / "cache_lab_time_per_token.png")
        files["memory_png"] = str(out / "cache_lab_kv_memory.png")
        plot_time_per_token(result, files["time_png"])
        plot_kv_memory(result, files["memory_png"])
    files["json"] = str(out / "cache_lab.json")
    Path(files["json"]).write_text(cache_lab_json(result, files) + "\n")
    return files


def plot_time_per_token(result: CacheLabResult, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for run in result.runs:
        decode = run.samples[1:]  # the prefill step is the first token's, not a decode step
        ax.plot([s.context_len for s in decode], [s.step_s * 1e3 for s in decode],
                label=f"{run.mode} ({run.total_s:.1f} s total)", linewidth=1.2)
    _finish(fig, ax, path, "context length (tokens attended by the step)",
            "time per generated token (ms)",
            f"Time per token as context grows: {result.model}, {result.dtype}, {result.device}")


def plot_kv_memory(result: CacheLabResult, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for run in result.runs:
        label = {"paged": f"paged (blocks of {run.block_size} held)",
                 "contiguous": "contiguous (tensor as allocated)",
                 "none": "none (nothing kept between steps)"}.get(run.mode, run.mode)
        ax.step([s.token_index for s in run.samples], [s.kv_bytes / MIB for s in run.samples],
                where="post", label=label, linewidth=1.2)
    run = result.baseline
    ax.plot([s.token_index for s in run.samples],
            [s.context_len * run.kv_bytes_per_token / MIB for s in run.samples],
            "k--", linewidth=0.8, label="tokens in context x KV bytes per token")
    _finish(fig, ax, path, "generation step (tokens generated)", "KV cache memory (MiB)",
            f"KV memory over the generation ({run.kv_bytes_per_token:,} bytes per token)")


def _finish(fig, ax, path: str, xlabel: str, ylabel: str, title: str) -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _ms_at(run: ModeRun, index: int) -> float:
    return run.samples[index].step_s * 1e3


def cache_lab_summary(result: CacheLabResult, files: dict[str, str]) -> str:
    base = result.baseline
    lines = [f"kvserve cache lab: {result.model} ({result.dtype}, {result.device}), prompt "
             f"{result.prompt_tokens} tokens, {result.new_tokens} new tokens, greedy", "",
             f"{'mode':<11} {'total s':>8} {'tok/s':>7} {'ms/token first -> last':>24} "
             f"{'K/V projections/layer':>22} {'peak KV':>10}"]
    for run in result.runs:
        first, last = _ms_at(run, 1), _ms_at(run, -1)
        lines.append(f"{run.mode:<11} {run.total_s:>8.2f} {result.new_tokens / run.total_s:>7.1f} "
                     f"{first:>11.1f} -> {last:>9.1f} "
                     f"{run.kv_projections // run.num_layers:>22,} "
                     f"{run.peak_kv_bytes / MIB:>7.1f} MiB")
    lines.append("")
    for run in result.runs[1:]:
        mismatch = result.first_mismatch(run)
        same = ("same tokens" if mismatch is None
                else f"TOKENS DIFFER from token {mismatch}")
        lines.append(f"speedup {run.mode} vs {base.mode}: {base.total_s / run.total_s:.2f}x "
                     f"({base.total_s:.1f} s vs {run.total_s:.1f} s), K/V projections "
                     f"{base.kv_projections / max(run.kv_projections, 1):.0f}x fewer; {same}")
    lines.append(f"seed's typical setup at {SEED_TOKENS} tokens: {SEED_NO_CACHE_S:.0f} s vs "
                 f"{SEED_CACHE_S:.0f} s ({SEED_SPEEDUP}x)")
    lines.append("files: " + ", ".join(v for k, v in files.items() if k != "plots_skipped"))
    if "plots_skipped" in files:
        lines.append(f"plots skipped: {files['plots_skipped']}")
    return "\n".join(lines)


def cache_lab_json(result: CacheLabResult, files: dict[str, str]) -> str:
    base = result.baseline
    runs = {}
    for run in result.runs:
        runs[run.mode] = {
            "total_s": run.total_s, "tokens_per_s": result.new_tokens / run.total_s,
            "kv_projections": run.kv_projections,
            "kv_projections_per_layer": run.kv_projections // run.num_layers,
            "peak_kv_bytes": run.peak_kv_bytes, "first_mismatch": result.first_mismatch(run),
            "speedup_vs_baseline": base.total_s / run.total_s,
            "first_decode_ms": _ms_at(run, 1), "last_decode_ms": _ms_at(run, -1),
        }
    return json.dumps({
        "lab": "cache", **{f.name: getattr(result, f.name) for f in dataclasses.fields(result)
                           if f.name != "runs"},
        "baseline": base.mode, "tokens_match": result.tokens_match(), "runs": runs,
        "seed": {"no_cache_s": SEED_NO_CACHE_S, "cache_s": SEED_CACHE_S, "speedup": SEED_SPEEDUP,
                 "tokens": SEED_TOKENS},
        "files": files})
