"""The start-up log's capacity report equals `kvserve plan` for the same settings: the pool's
blocks, bytes per token, blocks per max_model_len request and how many fit at once, read from the
log of a real engine on the default model and from the plan command it names (run with --json);
and the pool the engine really built has that many blocks."""

from __future__ import annotations

import json
import logging
import re
import shlex
import subprocess
import sys

import pytest

from kvserve import LLM

LINE = re.compile(r"KV capacity: [\d.]+ GiB = ([\d,]+) blocks of (\d+) tokens \(([\d,]+) tokens at "
                  r"([\d,]+) B/token, (\S+)\); a ([\d,]+)-token request takes ([\d,]+) blocks: "
                  r"([\d,]+) fit at once .*; as (kvserve plan .*)$")


def _n(text: str) -> int:
    return int(text.replace(",", ""))


@pytest.mark.parametrize("settings", [
    dict(kv_cache_memory="256MiB", max_model_len=2048, max_num_seqs=4),
    dict(kv_cache_memory="1GiB", max_model_len=1000, max_num_seqs=16, kv_cache_dtype="bf16",
         block_size=32),
    dict(kv_cache_memory="300MiB", max_model_len=4096, max_num_seqs=2, kv_cache_dtype="int8",
         kv_residual_tokens=64),
])
def test_the_start_up_report_is_the_plan(caplog, settings):
    with caplog.at_level(logging.INFO, logger="kvserve.engine"):
        llm = LLM(**settings)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("KV capacity")]
    assert len(lines) == 1, lines
    m = LINE.match(lines[0])
    assert m, lines[0]
    pool, bs, tokens, per_token, _, context, per_request, fit = map(
        _n, (m[1], m[2], m[3], m[4], "0", m[6], m[7], m[8]))
    assert pool == llm.engine.block_manager.pool.num_blocks and tokens == pool * bs
    assert context == settings["max_model_len"] and bs == settings.get("block_size", 16)
    argv = shlex.split(m[9])[2:]  # after "kvserve plan"
    run = subprocess.run([sys.executable, "-m", "kvserve.cli", "plan", *argv, "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)
    assert (plan["bytes_per_token"], plan["blocks_per_request"],
            plan["max_concurrent_requests"]) == (per_token, per_request, fit)
    dtype = plan["kv_cache_dtype"]
    assert plan["by_kv_cache_dtype"][dtype]["pool_blocks"] == pool
    assert per_token == llm.engine.kv_bytes_per_token
