"""Bad input gets one clear line and a non-zero exit from the CLI, a typed KVServeError from the
Python API, and leaves nothing half-done behind in the engine.

The CLI cases run as real subprocesses (`python -m kvserve.cli`), all started at once by one
module fixture: each pays Python + torch start-up, so running them side by side keeps this short.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fixtures
import pytest

from kvserve import LLM, SamplingParams
from kvserve.errors import (
    ConfigError,
    EngineStepError,
    InvalidRequestError,
    KVServeError,
    ModelLoadError,
)

LONG_PROMPT = "The KV cache keeps the keys and values of earlier tokens, so each new token " \
    "costs less."  # > 16 tokens for the tiny tokenizer


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, tiny_hf_dir, tiny_gguf_path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad-models")
    half = folder / "half.gguf"
    data = tiny_gguf_path.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    gpt2 = fixtures.write_wrong_arch_gguf(folder / "gpt2.gguf")
    mxfp4 = fixtures.write_tiny_gguf(folder / "mxfp4.gguf", tiny_hf_dir, qtype="MXFP4")
    return {"missing": folder / "no-such-model.gguf", "truncated": half, "architecture": gpt2,
            "quantization": mxfp4}


MODEL_ERRORS = {  # which bad file -> what the one line must say
    "missing": "not found",
    "truncated": "truncated",
    "architecture": "unsupported architecture 'gpt2'",
    "quantization": "unsupported quantization type MXFP4",
}
# name -> (prompt, extra flags, what the one line must say); "{tiny}" is the tiny model folder.
CLI_CASES = {
    **{f"model-{kind}": ("hello", ["--model", f"{{{kind}}}"], text)
       for kind, text in MODEL_ERRORS.items()},
    "empty-prompt": ("", [], "prompt is empty"),
    "prompt-too-long": (LONG_PROMPT, ["--max-model-len", "16"], "max_model_len) is 16"),
    # Sampling parameters fail before torch is even imported.
    "max-tokens": ("hello", ["--max-tokens", "-3"], "max_tokens must be a positive integer"),
    "temperature-negative": ("hello", ["--temperature", "-1"], "temperature must be in"),
    "temperature-huge": ("hello", ["--temperature", "1e9"], "temperature must be in"),
    "top-p-zero": ("hello", ["--top-p", "0"], "top_p must be in (0, 1]"),
    "top-p-big": ("hello", ["--top-p", "1.5"], "top_p must be in (0, 1]"),
    "top-k": ("hello", ["--top-k", "-5"], "top_k must be a non-negative integer"),
    "repetition-penalty": ("hello", ["--repetition-penalty", "0"], "repetition_penalty must be"),
    # settings checked before the model loads
    "k-dtype-dense": ("hello", ["--k-cache-dtype", "int8", "--cache-mode", "none"],
                      "'int8' is stored in the paged pool only"),
    "kv-residual-float": ("hello", ["--kv-cache-dtype", "bf16", "--kv-residual-tokens", "32"],
                          "kv_residual_tokens applies to quantized K or V only"),
}
ARGPARSE_CASE = ("hello", ["--seed", "abc"], "invalid int value: 'abc'")


def _run_cli(prompt: str, flags: list[str], paths: dict[str, str]) -> subprocess.CompletedProcess:
    flags = [f.format(**paths) for f in flags]
    if "--model" not in flags:
        flags += ["--model", paths["tiny"]]
    return subprocess.run([sys.executable, "-m", "kvserve.cli", "generate", prompt, *flags],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def cli_results(bad_models, tiny_hf_dir) -> dict[str, subprocess.CompletedProcess]:
    paths = {k: str(v) for k, v in bad_models.items()} | {"tiny": str(tiny_hf_dir)}
    cases = {**CLI_CASES, "argparse": ARGPARSE_CASE}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(_run_cli, prompt, flags, paths)
                   for name, (prompt, flags, _) in cases.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_one_line_error(cli_results, name):
    proc = cli_results[name]
    expected = CLI_CASES[name][2]
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kvserve: error: ") and expected in lines[0], lines[0]
    assert proc.stdout == ""


def test_cli_argparse_type_error_is_usage_plus_one_error(cli_results):
    proc = cli_results["argparse"]
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    # argparse's own pair: the usage (wrapped to the terminal width), then one error line.
    assert lines[0].startswith("usage: kvserve generate")
    assert [ln for ln in lines if "error" in ln] == [lines[-1]]
    assert lines[-1].startswith("kvserve generate: error: ") and ARGPARSE_CASE[2] in lines[-1]


# -- the Python API ------------------------------------------------------------------------------
def _one_line(err: pytest.ExceptionInfo) -> str:
    assert isinstance(err.value, KVServeError)
    message = str(err.value)
    assert message and "\n" not in message
    return message


@pytest.fixture(scope="module")
def llm(tiny_hf_dir) -> LLM:
    return LLM(model=str(tiny_hf_dir))


@pytest.mark.parametrize("kind", list(MODEL_ERRORS))
def test_api_bad_model_files(bad_models, kind):
    with pytest.raises(ModelLoadError) as err:
        LLM(model=str(bad_models[kind]))
    assert MODEL_ERRORS[kind] in _one_line(err)


@pytest.mark.parametrize("kwargs, expected", [
    ({"cache_mode": "paged-ish"}, "cache_mode must be one of"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"max_num_seqs": 0}, "max_num_seqs must be a positive integer"),
    ({"kv_cache_dtype": "int4", "kv_residual_tokens": 24}, "multiple of block_size (16)"),
    ({"k_cache_dtype": "int8", "cache_mode": "none"}, "is stored in the paged pool only"),
    ({"kv_cache_dtype": "int8", "cache_mode": "contiguous"}, "is stored in the paged pool only"),
    ({"kv_cache_dtype": "fp4"}, "kv_cache_dtype must be one of auto, float32"),
    ({"kv_caching": True}, "unknown engine setting 'kv_caching'"),
])
def test_api_bad_engine_config(tiny_hf_dir, kwargs, expected):
    with pytest.raises(ConfigError) as err:
        LLM(model=str(tiny_hf_dir), **kwargs)
    assert expected in _one_line(err)


@pytest.mark.parametrize("prompt", ["", {"prompt": ""}, {"prompt_token_ids": []}])
def test_api_empty_prompt(llm, prompt):
    with pytest.raises(InvalidRequestError) as err:
        llm.generate(prompt, use_tqdm=False)
    assert "prompt is empty" in _one_line(err)


def test_api_prompt_longer_than_context(tiny_hf_dir):
    short = LLM(model=str(tiny_hf_dir), max_model_len=16)
    with pytest.raises(InvalidRequestError) as err:
        short.generate(LONG_PROMPT, use_tqdm=False)
    assert "context length (max_model_len) is 16" in _one_line(err)
    with pytest.raises(InvalidRequestError):
        short.stream(LONG_PROMPT).__next__()
    assert not short.engine.has_unfinished_requests() and not short.engine.requests


@pytest.mark.parametrize("kwargs, name", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": 1e9}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -5}, "top_k"),
    ({"n": 0}, "n must be"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"seed": "abc"}, "seed must be an integer"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"stop": [""]}, "stop must be"),
])
def test_api_bad_sampling_params(kwargs, name):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert name in _one_line(err)


@pytest.mark.parametrize("messages, expected", [
    ([{"role": "user"}], "messages[0].content must be a string"),
    ([{"content": "hi"}], "messages[0] must be an object with a string 'role'"),
    ([{"role": "user", "content": 5}], "messages[0].content must be a string"),
    ([], "non-empty list"),
    ("hi", "non-empty list"),
    (None, "non-empty list"),
    ([{"role": "user", "content": "hi"}, "oops"], "messages[1] must be an object"),
])
def test_api_chat_malformed_messages(llm, messages, expected):
    with pytest.raises(InvalidRequestError) as err:
        llm.chat(messages, SamplingParams(max_tokens=2), use_tqdm=False)
    assert expected in _one_line(err)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("prompts, params, expected", [
    (["a", "b"], [SamplingParams()], "got 1 sampling params for 2 prompts"),
    ("a", {"max_tokens": 4}, "sampling_params must be SamplingParams"),
    ([{"prompt_token_ids": [1, 10_000]}], None, "prompt token ids must be integers in [0, "),
    ([{"prompt_token_ids": "12"}], None, "prompt_token_ids must be a list"),
    ([{"text": "hi"}], None, "unknown prompt field(s): text"),
    ([42], None, "each prompt must be a string"),
])
def test_api_malformed_generate_arguments(llm, prompts, params, expected):
    with pytest.raises(InvalidRequestError) as err:
        llm.generate(prompts, params, use_tqdm=False)
    assert expected in _one_line(err)


# -- nothing half-written -----------------------------------------------------------------------
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _assert_clean(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert not engine.requests
    stats = engine.cache_snapshot()
    if stats.pool is not None:  # paged: the pool stays allocated, every block is free again
        assert stats.pool.num_used_blocks == 0
        engine.block_manager.check_invariants()
    else:
        assert stats.num_bytes_allocated == 0


def test_invalid_prompt_in_a_batch_leaves_nothing_queued(llm):
    expected = [o.token_ids for o in llm.generate(["first", "second"], GREEDY, use_tqdm=False)]
    with pytest.raises(InvalidRequestError):
        llm.generate(["first", "", "second"], SamplingParams(n=2, max_tokens=8), use_tqdm=False)
    _assert_clean(llm)
    with pytest.raises(InvalidRequestError):
        llm.generate(["first", {"prompt_token_ids": [-1]}], GREEDY, use_tqdm=False)
    _assert_clean(llm)
    assert [o.token_ids for o in llm.generate(["first", "second"], GREEDY,
                                              use_tqdm=False)] == expected


def test_failure_mid_run_leaves_nothing_behind(llm, monkeypatch):
    # long enough for a prefill and at least two decode calls (one step or several each)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in llm.generate(["first", "second"], params, use_tqdm=False)]
    runner = llm.engine.runner
    calls = []

    def failing(real):
        def run(plan, requests):  # from the third call on (decode has run), for every request
            calls.append(plan)
            if len(calls) >= 3:
                raise RuntimeError("simulated device failure")
            return real(plan, requests)
        return run

    # single steps and multi-step plans (num_scheduler_steps) alike
    monkeypatch.setattr(runner, "execute", failing(runner.execute))
    monkeypatch.setattr(runner, "execute_steps", failing(runner.execute_steps))
    with pytest.raises(EngineStepError, match="RuntimeError: simulated device failure"):
        llm.generate(["first", "second", "third"], params, use_tqdm=False)
    monkeypatch.undo()
    scheduler = llm.engine.scheduler
    assert scheduler.max_steps == 1  # a failed multi-step plan turns them off for the engine
    scheduler.max_steps = scheduler.config.num_scheduler_steps  # on again for the next tests
    _assert_clean(llm)
    assert [o.token_ids for o in llm.generate(["first", "second"], params,
                                              use_tqdm=False)] == expected
    _assert_clean(llm)
