"""The quant lab on the tiny model, end to end through the CLI: every format's row (bytes per token
from the pool, requests that fit, perplexity, KL, agreement, decode speed), the simulated int8
per-token variant beside them, the JSON and the plot; bad flags are one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_lab(tiny_hf_dir, tmp_path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvserve.cli", "bench", "quant", "--model", str(tiny_hf_dir),
         "--block-size", "4", "--kv-cache-memory", "2MiB", "--out", str(tmp_path),
         "--no-progress", "--json", *flags], capture_output=True, text=True, timeout=600)


def test_the_lab_measures_every_format_and_the_scale_alternatives(tiny_hf_dir, tmp_path):
    proc = run_lab(tiny_hf_dir, tmp_path, "--formats", "float32,fp8_e4m3,int8,int4,int8/int4",
                   "--windows", "2",
                   "--window-tokens", "40", "--prompts", "3", "--prompt-tokens", "8",
                   "--new-tokens", "12", "--contexts", "16,32", "--decode-tokens", "4",
                   "--budget", "1MiB", "--budget-context", "64", "--kv-residual-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {r["label"]: r for r in result["rows"]}
    assert result["perplexity_tokens"] == 2 * 39
    f32, int8, fp8 = rows["float32"], rows["int8"], rows["fp8_e4m3"]
    assert f32["bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # tiny model: 2 layers, 2 KV heads x 16
    # int8/int4 in 4-token blocks: K's fp16 scale and zero per channel per block, V's per token
    # (the whole 16-channel head is one group)
    assert int8["bytes_per_token"] == 2 * 2 * ((16 + 16 * 4 // 4) + (16 + 4))
    assert fp8["bytes_per_token"] == 2 * 2 * 2 * 16
    per_request = 64 // 4  # blocks of a 64-token request
    # the residual window: 8 tokens and the partial block, float32 K and V, per sequence
    window = 2 * 2 * (8 + 4) * 2 * 16 * 4
    assert result["kv_residual_tokens"] == 8
    assert int8["requests_in_budget"] == (1 << 20) // (int8["bytes_per_token"] * 4 * per_request
                                                      + window)
    int4, mixed = rows["int4"], rows["int8/int4"]
    assert int4["bytes_per_token"] == 2 * 2 * ((8 + 16 * 4 // 4) + (8 + 4))
    assert mixed["bytes_per_token"] == 2 * 2 * ((16 + 16 * 4 // 4) + (8 + 4))
    assert int4["requests_in_budget"] == (1 << 20) // (int4["bytes_per_token"] * 4 * per_request
                                                      + window)
    assert fp8["requests_in_budget"] == (1 << 20) // (fp8["bytes_per_token"] * 4 * per_request
                                                      + window)
    assert f32["greedy_agreement_all"] == 12 and f32["mean_kl"] == 0.0
    for r in (int8, fp8, int4, mixed):
        assert 0 <= r["mean_kl"] < 0.1 and 0.5 <= r["top1_agreement"] <= 1.0
        assert 0 <= r["greedy_agreement_min_128"] <= r["greedy_agreement_128"] <= 12
        assert set(r["decode_tokens_per_s"]) == {"16", "32"}
        assert all(v > 0 for v in r["decode_tokens_per_s"].values())
    sim = rows["int8 sim: per-token K and V, no window"]
    assert sim["simulated"] and sim["bytes_per_token"] is None
    assert sim["mean_kl"] > 0 and sim["perplexity"] > 0
    for name in ("int8", "int4"):
        assert rows[f"{name} alt: per-token K (V's rule)"]["mean_kl"] > 0
        assert rows[f"{name} alt: 8-token blocks"]["mean_kl"] > 0
    for name in ("fp8_e4m3", "int8", "int4"):  # the window's worth, measured
        assert rows[f"{name} alt: no window"]["mean_kl"] > 0
    assert f32["forced_agreement_128"] == 12
    for r in (int8, fp8, int4, mixed):  # teacher-forced, on float32's own greedy text
        assert 0 <= r["forced_agreement_128"] <= 12
    assert "greedy/128 (min)" in proc.stdout and "float32" in proc.stdout
    assert (tmp_path / "quant_lab.json").exists()
    assert (tmp_path / "quant_lab_memory_vs_quality.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("flags, message", [
    (["--formats", "int8,float32"], "--formats must start with float32"),
    (["--formats", "float32,int3"], "kv_cache_dtype must be one of"),
    (["--windows", "0"], "--windows must be at least 1"),
    (["--windows", "500", "--contexts", "64", "--decode-tokens", "4", "--new-tokens", "8",
      "--prompt-tokens", "8"], "the corpus has"),
    (["--contexts", "100000"], "the model's context is"),
])
def test_bad_flags_are_one_line(tiny_hf_dir, tmp_path, flags, message):
    proc = run_lab(tiny_hf_dir, tmp_path, *flags)
    assert proc.returncode != 0 and message in proc.stderr
    assert "Traceback" not in proc.stderr
