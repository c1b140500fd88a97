"""The capacity planner: the seeds' worked examples exactly, the presets against published
parameter counts, config.json / GGUF reading, the verdict, and bad input (no torch, no model)."""

import json

import pytest

from kvserve.cli import main
from kvserve.errors import ConfigError, KVServeError
from kvserve.planner.capacity import plan
from kvserve.planner.presets import PRESETS, find_preset, suggest
from kvserve.planner.shapes import ModelShape, shape_from_hf_config

# The worked example: 32 layers, 8 KV heads, head_dim 128 (Llama 3 8B's shape).
EXAMPLE = ModelShape(name="example", architecture="llama", num_layers=32, hidden_size=4096,
                     num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
                     vocab_size=128256, max_context=8192)


def test_worked_example_bytes_per_token_layer_and_request():
    p = plan(EXAMPLE, context=4000, concurrency=20, memory="10GiB", weights_memory="1B",
             reserve="0", kv_cache_dtype="fp16")
    assert p.kv.bytes_per_token == 131_072  # 128 KiB
    assert p.kv.bytes_per_token_per_layer == 4_096
    assert p.kv.bytes_per_request == 524_288_000  # 4,000 tokens = 250 whole blocks of 16
    assert p.kv.blocks_per_request == 250


def test_worked_example_about_twenty_requests_in_ten_gigabytes():
    # ~10 GiB left for the cache: 20 requests of 500 MiB
    in_gib = plan(EXAMPLE, context=4000, concurrency=20, memory="10GiB", weights_memory="1B",
                  reserve="0", kv_cache_dtype="fp16")
    assert in_gib.kv.max_concurrent_requests == 20 and in_gib.fits
    # the seed's 24 GB GPU with 14 GB of weights: 10 GB left, 19 "only in the ideal case"
    gpu = plan(EXAMPLE, context=4000, concurrency=20, memory="24GB", weights_memory="14GB",
               reserve="0", kv_cache_dtype="fp16")
    assert gpu.kv_budget_bytes == 10 * 10**9
    assert gpu.kv.max_concurrent_requests == 19
    assert not gpu.fits and any("fewer requests: 19" in s for s in gpu.suggestions)
    # a stated runtime reserve fits fewer still
    assert plan(EXAMPLE, context=4000, memory="24GB", weights_memory="14GB",
                kv_cache_dtype="fp16").kv.max_concurrent_requests < 19


def test_default_model_is_23040_bytes_per_token_in_fp16():
    p = plan(None, kv_cache_dtype="fp16")
    assert (p.model.num_layers, p.model.num_kv_heads, p.model.head_dim) == (30, 3, 64)
    assert p.kv.bytes_per_token == 23_040
    assert p.model.num_params == 134_515_008 == p.model.computed_num_params  # GGUF tensors


def test_quantized_kv_dtypes_count_their_scales():
    d = plan(None).by_kv_cache_dtype
    assert d["fp32"].bytes_per_token == 46_080
    assert d["bf16"].bytes_per_token == d["fp16"].bytes_per_token == 23_040
    assert d["fp8"].bytes_per_token == 11_520  # per-tensor scales: nothing per token
    # int8/int4 in 16-token blocks: K's fp16 scale and zero per channel per block (64 x 4 B / 16
    # tokens), V's per 32 channels per token
    assert d["int8"].bytes_per_token == 30 * 3 * ((64 + 64 * 4 // 16) + (64 + 2 * 4))
    assert d["int4"].bytes_per_token == 30 * 3 * ((32 + 64 * 4 // 16) + (32 + 2 * 4))


def test_the_mha_mistake_for_llama_3_70b():
    p = plan("llama-3-70b", memory="80GiB", weights_dtype="int4", kv_cache_dtype="fp16")
    assert p.mha_formula_bytes_per_token == 2_621_440  # 2 x 8192 x 80 x 2: about 2.5 MB
    assert p.kv.bytes_per_token == 327_680  # 320 KiB with 8 KV heads
    from kvserve.planner.report import render

    text = render(p)
    assert "2,621,440 B (2.50 MiB)" in text and "327,680 B (320.00 KiB), 8.0x less" in text


PUBLISHED_PARAMS = {  # from the models' cards
    "llama-3-8b": 8.03e9, "llama-3-70b": 70.6e9, "llama-3.1-405b": 405.9e9,
    "llama-2-7b": 6.74e9, "mistral-7b": 7.24e9, "mixtral-8x7b": 46.7e9, "qwen2.5-7b": 7.61e9,
    "qwen2.5-72b": 72.7e9, "gemma-2-9b": 9.24e9, "gemma-2b": 2.51e9, "smollm2-135m": 134.5e6,
    "smollm2-360m": 361.8e6, "smollm2-1.7b": 1.71e9, "gpt2": 124.4e6,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_counts_match_the_published_ones(name):
    assert PRESETS[name].num_params == pytest.approx(PUBLISHED_PARAMS[name], rel=0.005)


def test_presets_cover_mha_gqa_and_mqa():
    kinds = {p.attention_kind for p in PRESETS.values()}
    assert kinds == {"MHA", "GQA", "MQA"}
    assert find_preset("Llama-3-8B") is PRESETS["llama-3-8b"]


def test_max_context_is_the_longest_whole_block_context_that_fits():
    p = plan("llama-3-8b", context=4000, concurrency=20)
    t, bs = p.kv.max_context_at_concurrency, p.block_size
    assert t % bs == 0
    per_block = p.kv.bytes_per_block
    assert 20 * (t // bs) * per_block <= p.kv_budget_bytes < 20 * (t // bs + 1) * per_block


def test_max_context_is_capped_by_the_model():
    p = plan("smollm2-135m", context=100, concurrency=1)
    assert p.kv.max_context_at_concurrency == 8192
    over = plan("smollm2-135m", context=10_000, concurrency=1)
    assert not over.fits and "context window (8,192 tokens)" in over.problems[0]


def test_sliding_window_layers_hold_at_most_the_window():
    gemma = PRESETS["gemma-2-9b"]
    p4k = plan(gemma, context=4096, concurrency=1, memory="80GiB")
    p8k = plan(gemma, context=8192, concurrency=1, memory="80GiB")
    per_layer_token = p4k.kv.bytes_per_token_per_layer
    # 21 full layers double, 21 sliding layers stay at the 4,096-token window
    assert p8k.kv.bytes_per_request - p4k.kv.bytes_per_request == 21 * 4096 * per_layer_token


def test_verdict_names_what_would_fit():
    p = plan("llama-3-8b", context=4000, concurrency=20, memory="24GiB")
    assert not p.fits
    text = " | ".join(p.suggestions)
    assert "fewer requests: 13" in text and "shorter context: 2,720 tokens" in text
    assert "smaller KV dtype: fp8, int8 or int4" in text and "more memory" in text
    need = float(p.suggestions[-1].split("more memory: ")[1].split(" GiB")[0])
    assert plan("llama-3-8b", memory=f"{need + 0.01}GiB").fits


def test_json_has_the_promised_integer_keys(capsys):
    assert main(["plan", "--model", "llama-3-8b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("bytes_per_token", "bytes_per_token_per_layer", "bytes_per_request",
                "weights_bytes", "kv_budget_bytes", "max_concurrent_requests",
                "max_context_at_concurrency"):
        assert isinstance(out[key], int), key
    assert out["fits"] is False
    assert set(out["by_kv_cache_dtype"]) == {"fp32", "bf16", "fp16", "fp8", "int8", "int4"}
    assert out["by_kv_cache_dtype"]["fp8"]["fits"] is True
    assert out["by_kv_cache_dtype"]["bf16"]["bytes_per_token"] == out["bytes_per_token"] == 131_072


def test_text_report_and_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "kv.png"
    assert main(["plan", "--model", "mistral-7b", "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "Every KV dtype side by side" in text and "sliding window" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- reading shapes --------------------------------------------------------------------------
LLAMA3_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


def test_config_json_file_and_folder(tmp_path, capsys):
    folder = tmp_path / "Meta-Llama-3-8B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B_CONFIG))
    for model in (str(folder), str(folder / "config.json")):
        p = plan(model)
        assert p.model.name == "Meta-Llama-3-8B"
        assert p.model.num_params == PRESETS["llama-3-8b"].num_params
        assert p.kv.bytes_per_token == 131_072


def test_hf_config_variants():
    gpt2 = shape_from_hf_config({"model_type": "gpt2", "n_layer": 12, "n_embd": 768,
                                 "n_head": 12, "vocab_size": 50257, "n_positions": 1024}, "g",
                                "gpt2")
    assert gpt2.num_params == PRESETS["gpt2"].num_params and gpt2.attention_kind == "MHA"
    falcon = shape_from_hf_config({"model_type": "falcon", "num_hidden_layers": 32,
                                   "hidden_size": 4544, "num_attention_heads": 71,
                                   "multi_query": True, "vocab_size": 65024,
                                   "max_position_embeddings": 2048}, "f", "falcon")
    assert falcon.num_kv_heads == 1 and falcon.attention_kind == "MQA"
    qwen = {"model_type": "qwen2", "num_hidden_layers": 28, "hidden_size": 3584,
            "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4,
            "vocab_size": 152064, "max_position_embeddings": 131072, "sliding_window": 131072,
            "use_sliding_window": False}
    assert shape_from_hf_config(qwen, "q", "q").num_sliding_layers == 0
    assert shape_from_hf_config(qwen, "q", "q").num_params == PRESETS["qwen2.5-7b"].num_params
    typed = {**LLAMA3_8B_CONFIG, "sliding_window": 512,
             "layer_types": ["sliding_attention", "full_attention"] * 16}
    assert shape_from_hf_config(typed, "t", "t").num_sliding_layers == 16
    nested = {"model_type": "llava", "text_config": LLAMA3_8B_CONFIG}
    assert shape_from_hf_config(nested, "n", "n").num_kv_heads == 8


@pytest.mark.parametrize("cfg, message", [
    ({"num_hidden_layers": 2}, "has no hidden_size"),
    ({**LLAMA3_8B_CONFIG, "num_key_value_heads": 5}, "not a multiple"),
    ({**LLAMA3_8B_CONFIG, "num_hidden_layers": "32"}, "must be an integer"),
    ({**LLAMA3_8B_CONFIG, "vocab_size": 0}, "vocab_size must be a positive integer"),
    ({**LLAMA3_8B_CONFIG, "kv_lora_rank": 512}, "multi-head latent attention"),
    ([1, 2], "not a JSON object"),
])
def test_malformed_configs_are_named(cfg, message):
    with pytest.raises(ConfigError, match=message):
        shape_from_hf_config(cfg, "x", "config.json")


def test_unknown_preset_suggests_the_closest_names():
    assert suggest("lama-3-8b")[0] == "llama-3-8b"
    assert "qwen2.5-72b" in suggest("qwen-72b")
    with pytest.raises(ConfigError, match="did you mean llama-3-8b"):
        plan("lama-3-8b")


def _run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["plan", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("argv, message", [
    (["--model", "lama-3-8b"], "unknown model preset 'lama-3-8b': did you mean llama-3-8b"),
    (["--context", "0"], "context must be a positive integer, got 0"),
    (["--concurrency", "-3"], "concurrency must be a positive integer, got -3"),
    (["--memory=-3GB"], "memory must be a positive size"),
    (["--memory", "0"], "memory must be a positive size"),
    (["--memory", "lots"], "memory must be a positive size"),
    (["--block-size", "0"], "block_size must be a positive integer"),
    (["--block-size", "12"], "power of two"),
    (["--reserve", "120%"], "reserve must be a percentage"),
    (["--model", "/nowhere/config.json"], "not found"),
    (["--model", "llama-3-8b", "--weights-dtype", "stored"], "needs a GGUF file"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(capsys, argv, message):
    rc, out, err = _run_cli(capsys, *argv)
    assert rc != 0 and out == ""
    assert err.count("\n") == 1 and message in err, err


def test_malformed_config_file_is_one_line(capsys, tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"num_hidden_layers": 2,')
    rc, _, err = _run_cli(capsys, "--model", str(bad))
    assert rc == 1 and err.count("\n") == 1 and "is not valid JSON" in err
    garbage = tmp_path / "model.gguf"
    garbage.write_bytes(b"GGUF" + b"\x00" * 10)
    rc, _, err = _run_cli(capsys, "--model", str(garbage))
    assert rc == 1 and err.count("\n") == 1 and "not a valid GGUF" in err


def test_planner_errors_are_kvserve_errors():
    with pytest.raises(KVServeError):
        plan("smollm2-135m", context=0)


@pytest.mark.parametrize("argv, problem", [
    (["--model", "llama-3-70b"], "nothing is left for the KV cache"),
    (["--model", "llama-3-8b", "--memory", "16GiB"], "the weights and the runtime reserve"),
])
def test_a_plan_that_does_not_fit_is_still_a_plan(capsys, argv, problem):
    """Weights larger than the memory: fits false, the problem named, and the KV figures a
    script asked for (Llama 3 70B: 327,680 bytes per token in fp16)."""
    rc, out, err = _run_cli(capsys, *argv, "--json")
    assert rc == 0 and err == ""
    got = json.loads(out)
    assert got["fits"] is False and problem in got["problems"][0]
    assert got["max_concurrent_requests"] == 0 and got["kv_budget_bytes"] == 0
    if argv[1] == "llama-3-70b":
        assert got["bytes_per_token"] == 327_680
    assert any("more memory" in x for x in got["suggestions"])
    rc, out, _ = _run_cli(capsys, *argv)
    assert rc == 0 and problem in out


def test_kv_cache_memory_is_the_budget_itself(capsys):
    rc, out, _ = _run_cli(capsys, "--context", "2048", "--kv-cache-memory", "64MiB",
                          "--kv-cache-dtype", "fp32", "--json")
    got = json.loads(out)
    assert rc == 0 and got["kv_budget_bytes"] == 64 << 20
    assert got["by_kv_cache_dtype"]["fp32"]["pool_blocks"] == (64 << 20) // got["bytes_per_block"]


@pytest.mark.parametrize("command", ["plan", "generate", "serve", "bench"])
def test_every_command_help_renders(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: kvserve" in capsys.readouterr().out


def test_list_presets(capsys):
    assert main(["plan", "--list-presets"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == len(PRESETS) and "(MQA)" in out and "llama-3.1-405b" in out


def test_gguf_and_hf_folder_of_the_same_model_agree(tiny_gguf_path, tiny_hf_dir):
    from_gguf = plan(str(tiny_gguf_path), weights_dtype="stored", memory="1GiB")
    from_hf = plan(str(tiny_hf_dir), memory="1GiB")
    assert from_gguf.model.exact_num_params == from_hf.model.computed_num_params
    assert from_gguf.weights_bytes == 4 * from_gguf.model.num_params  # F32 tensors as stored
    assert from_gguf.kv.bytes_per_token == from_hf.kv.bytes_per_token
