"""The labs behind `kvserve bench`: each measures one KV-cache trade-off on a real model and writes
a table, CSV, plots and JSON into one output folder. This module only names them; each lab's
module owns its flags (add_arguments) and its run (main)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Lab:
    name: str
    module: str  # kvserve.bench.<module>, imported only when the lab runs
    summary: str

    def load(self):
        return importlib.import_module(f"kvserve.bench.{self.module}")


LABS: dict[str, Lab] = {lab.name: lab for lab in (
    Lab("cache", "cache_lab",
        "generation with and without the KV cache: time per token as context grows, K/V "
        "projections computed, KV memory per step"),
    Lab("quant", "quant_lab",
        "KV formats side by side: bytes per token, requests that fit, perplexity, KL and "
        "greedy agreement vs float32 K/V, decode speed at 1k-8k context"),
    Lab("offload", "offload_lab",
        "tiers below the pool: TTFT of a 1k-8k prefix fetched from host RAM, disk or Redis vs "
        "recomputed, the cost model's break-even, and a multi-tenant trace with and without "
        "the host tier"),
    Lab("window", "window_lab",
        "attention sinks (--cache-policy sinks): KV memory over a 20,000-token generation, "
        "perplexity past the model's context with sinks + window, the window alone, and the "
        "full cache inside its context"),
)}


def describe() -> str:
    """The list `kvserve bench` prints."""
    width = max(len(n) for n in LABS)
    lines = ["labs (kvserve bench LAB --help for a lab's flags):"]
    lines += [f"  {lab.name:<{width}}  {lab.summary}" for lab in LABS.values()]
    return "\n".join(lines)
