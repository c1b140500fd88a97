"""Engine settings are declared once (config.py) and every surface derives from that declaration:
the CLI's engine flags (generate, serve), LLM(...)'s keywords, EngineConfig.create, and the
planner's KV flags; one kv_cache_dtype name and one "auto" rule for engine and planner."""

import inspect

import pytest

from kvserve import LLM, EngineConfig
from kvserve.cli import build_parser
from kvserve.config import CacheConfig, SchedulerConfig, engine_settings
from kvserve.errors import ConfigError
from kvserve.kv_dtypes import KV_CACHE_DTYPES, canonical_kv_dtype, resolve_kv_cache_dtype


def help_text(*argv: str) -> str:
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[argv[0]]
    for name in argv[1:]:
        sub = sub._subparsers._group_actions[0].choices[name]
    return sub.format_help()


def test_every_setting_is_a_flag_a_keyword_and_a_create_argument():
    signature = inspect.signature(LLM)
    generate, serve = help_text("generate"), help_text("serve")
    for s in engine_settings():
        assert s.name in signature.parameters and signature.parameters[s.name].default == \
            s.default, s.name
        if s.flag:
            assert s.flag_name in generate and s.flag_name in serve, s.flag_name
    assert len(engine_settings()) == 32  # adding one is a field in config.py, nothing else


def test_create_routes_flat_settings_to_their_config():
    config = EngineConfig.create(dtype="bfloat16", block_size=8, kv_cache_dtype="fp16",
                                 max_num_seqs=3, preemption_mode="swap")
    assert config.dtype == "bfloat16" and config.cache.block_size == 8
    assert config.cache.kv_cache_dtype == "fp16" and config.kv_cache_dtype == "float16"
    assert config.scheduler.max_num_seqs == 3 and config.scheduler.preemption_mode == "swap"
    assert EngineConfig.create() == EngineConfig()
    with pytest.raises(ConfigError, match="unknown engine setting 'block'"):
        EngineConfig.create(block=8)


def test_cli_flags_parse_to_the_same_config_as_keywords():
    args = build_parser().parse_args(["generate", "hi", "--kv-cache-dtype", "bf16",
                                      "--no-enable-prefix-caching", "--max-model-len", "512"])
    from kvserve.cli import engine_kwargs

    assert EngineConfig.create(**engine_kwargs(args)) == EngineConfig.create(
        kv_cache_dtype="bfloat16", enable_prefix_caching=False, max_model_len=512)


def test_help_shows_defaults_and_every_kv_format():
    generate = " ".join(help_text("generate").split())
    assert "(default: 1GiB)" in generate and "(default: 8)" in generate
    assert "{" + ",".join(KV_CACHE_DTYPES) + "}" in generate.replace(" ", "")
    assert "{" + ",".join(KV_CACHE_DTYPES) + "}" in help_text("plan").replace(" ", "").replace(
        "\n", "")
    assert "--kv-cache-memory" in help_text("bench", "cache")


def test_one_kv_cache_dtype_rule_for_engine_and_planner():
    from kvserve.planner.capacity import plan

    assert canonical_kv_dtype("fp8") == "fp8_e4m3" and canonical_kv_dtype("BF16") == "bfloat16"
    for dtype, expected in (("float32", "float32"), ("bfloat16", "bfloat16"),
                            ("fp16", "float16"), ("int4", "float16"), ("stored", "float16")):
        assert resolve_kv_cache_dtype("auto", dtype) == expected
    assert EngineConfig(dtype="bfloat16").kv_cache_dtype == "bfloat16"
    assert plan(None, weights_dtype="bf16").kv.kv_cache_dtype == "bf16"
    assert plan(None, weights_dtype="int4").kv.kv_cache_dtype == "fp16"
    assert plan(None, kv_cache_dtype="fp8_e5m2").kv.kv_cache_dtype == "fp8_e5m2"
    assert plan(None, kv_cache_dtype="fp8_e5m2").kv.bytes_per_token == \
        plan(None, kv_cache_dtype="fp8_e4m3").kv.bytes_per_token


def test_quantized_formats_and_their_settings_are_checked_with_one_line():
    for name in ("fp8_e4m3", "fp8_e5m2", "int8", "int4"):
        assert CacheConfig(kv_cache_dtype=name).kv_cache_dtype == name
        with pytest.raises(ConfigError, match=f"'{name}' is stored in the paged pool only"):
            CacheConfig(kv_cache_dtype=name, cache_mode="contiguous")
    c = CacheConfig(kv_cache_dtype="bf16", k_cache_dtype="int8", v_cache_dtype="int4")
    assert c.resolved_kv_cache_dtype("float32") == "int8/int4"
    assert CacheConfig(v_cache_dtype="fp8").resolved_kv_cache_dtype("float32") == \
        "float32/fp8_e4m3"
    with pytest.raises(ConfigError, match="need the paged pool"):
        CacheConfig(v_cache_dtype="bf16", cache_mode="contiguous")
    assert CacheConfig(kv_cache_dtype="int4", kv_residual_tokens=32).residual_window_tokens == 32
    assert CacheConfig(kv_cache_dtype="int4").residual_window_tokens == 128  # KIVI's
    assert CacheConfig(kv_cache_dtype="fp8", block_size=256).residual_window_tokens == 256
    assert CacheConfig(v_cache_dtype="int4").residual_window_tokens == 128  # one side will do
    assert CacheConfig(kv_cache_dtype="bf16").residual_window_tokens == 0
    assert CacheConfig(kv_cache_dtype="fp8", kv_residual_tokens=0).residual_window_tokens == 0
    with pytest.raises(ConfigError, match="applies to quantized K or V only"):
        CacheConfig(kv_cache_dtype="bf16", kv_residual_tokens=32)
    for bad in (24, -16, 8192, True, "32"):
        with pytest.raises(ConfigError, match="multiple of block_size"):
            CacheConfig(kv_cache_dtype="int4", kv_residual_tokens=bad)
    SchedulerConfig()  # the other half of the settings needs nothing


def _parsers(parser):
    import argparse

    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_help_shows_every_default():
    """Each option of every command (bench's labs too) with a default says it in --help."""
    import argparse

    checked = 0
    for parser in _parsers(build_parser()):
        text = parser.format_help()
        for action in parser._actions:
            if (not action.option_strings or isinstance(action, argparse._HelpAction)
                    or action.default in (None, False, [], argparse.SUPPRESS)):
                continue
            help_line = parser._get_formatter()._get_help_string(action)
            assert "default" in help_line.lower(), (parser.prog, action.option_strings)
            checked += 1
        assert "usage: kvserve" in text
    assert checked > 80
