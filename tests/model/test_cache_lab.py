"""The cache lab on the tiny model: same tokens in every mode, K/V projections counted by the engine
(N(N+1)/2 per layer without the cache, N with it), the CSV/PNG/JSON files, and its CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from kvserve.bench import LABS, describe
from kvserve.bench.cache_lab import build_prompt, run_mode
from kvserve.bench.report import CacheLabResult, cache_lab_summary, write_cache_lab

NEW_TOKENS = 12
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tiny_hf_dir):
    from kvserve.model.loader import load_checkpoint

    prompt = build_prompt(load_checkpoint(str(tiny_hf_dir)).tokenizer, 1)
    kwargs = dict(model=str(tiny_hf_dir), block_size=4, kv_cache_memory="1MiB")
    return [run_mode(mode, prompt, NEW_TOKENS, kwargs)
            for mode in ("none", "contiguous", "paged")]


def test_every_mode_generates_the_same_tokens(runs):
    none, contiguous, paged = runs
    assert len(none.token_ids) == NEW_TOKENS
    assert contiguous.token_ids == none.token_ids
    assert paged.token_ids == none.token_ids


def test_projections_counted_quadratic_without_cache_linear_with_it(runs):
    n = NEW_TOKENS  # one prompt token: step i attends (and, without a cache, projects) i + 1
    none, contiguous, paged = runs
    assert none.kv_projections == n * (n + 1) // 2 * none.num_layers
    assert contiguous.kv_projections == n * contiguous.num_layers
    assert paged.kv_projections == n * paged.num_layers
    # per step, as the engine counted them
    assert [s.kv_projections for s in none.samples][:4] == [
        none.num_layers * k * (k + 1) // 2 for k in range(1, 5)]


def test_kv_memory_follows_the_cache(runs):
    none, contiguous, paged = runs
    assert all(s.kv_bytes == 0 for s in none.samples)
    per_token = paged.kv_bytes_per_token
    # paged: whole blocks of 4 tokens, one more each time the last fills
    for s in paged.samples:
        held = s.context_len  # the step's input tokens have K/V; the token it sampled not yet
        assert s.kv_blocks == -(-held // 4)
        assert s.kv_bytes == s.kv_blocks * 4 * per_token
    # contiguous: at least the tokens held, never shrinking
    sizes = [s.kv_bytes for s in contiguous.samples]
    assert sizes == sorted(sizes)
    assert all(b >= s.context_len * per_token
               for b, s in zip(sizes, contiguous.samples))


def test_files_are_written_and_pngs_are_valid(runs, tmp_path):
    pytest.importorskip("matplotlib")
    result = CacheLabResult("tiny", "float32", "cpu", 1, NEW_TOKENS, runs)
    files = write_cache_lab(result, tmp_path / "out")
    for key in ("time_png", "memory_png"):
        data = open(files[key], "rb").read()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000
        import matplotlib.image

        assert matplotlib.image.imread(files[key]).ndim == 3  # decodes as an image
    with open(files["steps_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * NEW_TOKENS
    assert {r["mode"] for r in rows} == {"none", "contiguous", "paged"}
    data = json.loads(open(files["json"]).read())
    assert data["tokens_match"] is True
    assert data["runs"]["none"]["kv_projections_per_layer"] == NEW_TOKENS * (NEW_TOKENS + 1) // 2
    summary = cache_lab_summary(result, files)
    assert "speedup contiguous vs none" in summary and "same tokens" in summary


def test_a_differing_run_is_reported(runs):
    import dataclasses

    other = dataclasses.replace(runs[2], token_ids=runs[2].token_ids[:5] + [-1] * 7)
    result = CacheLabResult("tiny", "float32", "cpu", 1, NEW_TOKENS, [runs[0], other])
    assert result.first_mismatch(other) == 5 and not result.tokens_match()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvserve.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_quick_run(tiny_hf_dir, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "lab"
    proc = _cli("bench", "cache", "--model", str(tiny_hf_dir), "--new-tokens", "32",
                "--out", str(out), "--json", "--no-progress", "--block-size", "4",
                "--kv-cache-memory", "1MiB")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert data["tokens_match"] and data["new_tokens"] == 32
    assert data["runs"]["paged"]["kv_projections_per_layer"] == 16 + 31  # 16-token prompt
    assert "seed's typical setup at 500 tokens: 40 s vs 9 s (4.5x)" in proc.stdout
    for name in ("cache_lab_steps.csv", "cache_lab_time_per_token.png",
                 "cache_lab_kv_memory.png", "cache_lab.json"):
        assert (out / name).is_file()


def test_cli_lists_labs_and_rejects_bad_flags(tiny_hf_dir):
    listing = _cli("bench")
    assert listing.returncode == 0 and "cache" in listing.stdout
    assert describe().splitlines()[1].strip().startswith("cache") and "cache" in LABS
    bad = _cli("bench", "cache", "--modes", "none,fast", "--model", str(tiny_hf_dir))
    assert bad.returncode == 1
    assert bad.stderr.strip() == ("kvserve: error: --modes: unknown cache mode(s) fast; "
                                  "choose from none, contiguous, paged")


def test_a_lab_without_matplotlib_says_so_on_stderr(monkeypatch, capsys):
    import sys

    from kvserve.bench import report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises
    files: dict[str, str] = {}
    assert not report._plotting("cache", files)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cache lab: plots skipped" in err and "kvserve[lab]" in err
    assert "plots_skipped" in files
