"""The window lab on the tiny model (256 positions), end to end through the CLI: the sinks
sequence generates past the context with its KV bytes flat at the policy's bound, the text is
scored with the full cache inside the context and with sinks + window and the window alone past
it, and the JSON and both plots are written; bad flags are one line."""

from __future__ import annotations

import json
import subprocess
import sys

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_lab(tiny_hf_dir, tmp_path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvserve.cli", "bench", "window", "--model", str(tiny_hf_dir),
         "--block-size", "4", "--out", str(tmp_path), "--no-progress", "--json", *flags],
        capture_output=True, text=True, timeout=600)


def test_the_lab_measures_memory_and_perplexity_past_the_context(tiny_hf_dir, tmp_path):
    proc = run_lab(tiny_hf_dir, tmp_path, "--window-tokens", "32", "--gen-tokens", "400",
                   "--text-tokens", "600", "--chunk-tokens", "16", "--segment-tokens", "100")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["context"] == 256 and result["text_tokens"] == 600
    m = result["memory"]
    assert m["generated"] == 400 and m["tokens"][-1] > 256  # past the context
    # flat: sinks (1 block) + the window (32 tokens) + a 16-token step + a block, at most
    assert m["peak_blocks"] <= m["block_bound"] == 1 + (32 + 16 + 4) // 4
    assert max(m["kv_bytes"]) == m["peak_kv_bytes"] == m["peak_blocks"] * m["bytes_per_block"]
    assert m["kv_bytes"][-1] < m["full_cache_bytes_at_end"] / 4
    q = result["quality"]
    full, sinks, window = q["full cache"], q["sinks + window"], q["window only"]
    assert full["scored_tokens"] == 254 and full["perplexity_past_context"] is None
    assert sinks["scored_tokens"] == window["scored_tokens"] == 599
    assert full["peak_blocks"] == 64 and sinks["peak_blocks"] <= m["block_bound"]
    assert len(sinks["segments"]) == 6 and sinks["perplexity_past_context"] > 0
    assert sinks["past_context_vs_full_inside"] == \
        sinks["perplexity_past_context"] / full["perplexity_inside_context"] - 1
    for name in ("window_lab.json", "window_lab_kv_bytes.png", "window_lab_perplexity.png"):
        assert (tmp_path / name).is_file()
    assert (tmp_path / "window_lab_perplexity.png").read_bytes()[:8] == PNG_MAGIC
    assert "sinks + window" in proc.stdout


def test_bad_flags_are_one_line(tiny_hf_dir, tmp_path):
    proc = run_lab(tiny_hf_dir, tmp_path, "--sink-tokens", "0")
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("kvserve: error: --sink-tokens must be at least 1 (the "
                                   "window-only run has none)")
