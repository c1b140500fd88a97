"""--threads (llama.cpp's -t): the engine's CPU threads, for torch and the C kernels alike; bad
values are a ConfigError naming the setting (the CLI's one line)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.errors import ConfigError


def test_threads_sets_the_pool_the_kernels_use(tiny_hf_dir):
    before = torch.get_num_threads()
    try:
        llm = LLM(model=str(tiny_hf_dir), threads=1)
        assert torch.get_num_threads() == 1
        out = llm.generate("the cache", SamplingParams(max_tokens=4, temperature=0.0),
                           use_tqdm=False)[0]
        assert len(out.token_ids) == 4
        LLM(model=str(tiny_hf_dir), threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bad", [0, -3, 10**6, True, "2"])
def test_bad_thread_counts_are_refused(tiny_hf_dir, bad):
    with pytest.raises(ConfigError, match="threads must be an integer"):
        LLM(model=str(tiny_hf_dir), threads=bad)


def test_the_cli_says_so_in_one_line(tiny_hf_dir):
    run = subprocess.run([sys.executable, "-m", "kvserve.cli", "generate", "--model",
                          str(tiny_hf_dir), "--threads", "0", "hi"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "threads must be an integer" in run.stderr
