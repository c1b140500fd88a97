"""Quantized K/V in the paged pool on the tiny model: preemption (recompute and swap), prefix
hits and n > 1 samples give exactly the outputs of an unpreempted, uncached run in the same
format; the C decode path gives the PyTorch path's tokens; the format is part of every block key;
the dense cache modes refuse a quantized format with one line; the start-up guardrail passes the
real codecs and refuses (or warns about) a broken one."""

import logging

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.errors import ConfigError
from kvserve.kvcache.layout import KVLayout
from kvserve.kvstore import paged
from kvserve.kvstore.codecs import ChannelBlockCodec

BLOCK = 4
WINDOW = 8  # two whole blocks and the partial one in float32: codes are read too
MAX_LEN = 48
PROMPTS = [{"prompt_token_ids": [(7 * i + 3 * j) % 200 + 10 for j in range(n)]}
           for i, n in enumerate([10, 1, 14, 5, 8])]
GREEDY = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
SEEDED = [SamplingParams(max_tokens=30, temperature=1.0, seed=i, ignore_eos=True)
          for i in range(5)]
FORMATS = ["int8", "fp8_e4m3", "int4", "int8/int4"]


def run(llm: LLM, params) -> list[tuple[int, ...]]:
    return [o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def make(tiny_hf_dir, kv_cache_dtype: str, **kwargs) -> LLM:
    """kv_cache_dtype 'k/v': K and V in two formats (--k-cache-dtype, --v-cache-dtype)."""
    k, _, v = kv_cache_dtype.partition("/")
    return LLM(model=str(tiny_hf_dir), block_size=BLOCK, max_model_len=MAX_LEN,
               k_cache_dtype=k, v_cache_dtype=v or k,
               **{"max_num_seqs": 8, "kv_residual_tokens": WINDOW if "int" in kv_cache_dtype
                  or "fp8" in kv_cache_dtype else None, **kwargs})


@pytest.fixture(scope="module", params=FORMATS)
def quantized(request, tiny_hf_dir):
    """(format, an ample uncached engine in it, its greedy and seeded outputs)."""
    llm = make(tiny_hf_dir, request.param, enable_prefix_caching=False)
    return request.param, llm, {"greedy": run(llm, GREEDY), "seeded": run(llm, SEEDED)}


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("which", ["greedy", "seeded"])
def test_preemption_gives_the_unpreempted_outputs_in_the_same_format(tiny_hf_dir, quantized,
                                                                     mode, which, request):
    name, _, expected = quantized
    if mode == "recompute" and name.endswith(("int8", "int4")):
        # Known gap (README, quantized KV): recompute rebuilds K/V through the prefill kernels,
        # whose last bits differ from the decode kernel's; a code at a rounding boundary then
        # moves a whole step, and the random tiny model's near-ties flip. Swap is exact.
        request.applymarker(pytest.mark.xfail(reason="codes of recomputed K/V can differ by a "
                                                     "step", strict=False))
    llm = make(tiny_hf_dir, name, enable_prefix_caching=False)
    block_bytes = KVLayout(llm.engine.spec, BLOCK, name).bytes_per_block
    fixed = KVLayout(llm.engine.spec, BLOCK, name, residual_seqs=8,
                     window_tokens=WINDOW).fixed_bytes  # the residual windows
    tight = make(tiny_hf_dir, name, kv_cache_memory=13 * block_bytes + fixed,
                 preemption_mode=mode, max_num_batched_tokens=16)
    assert tight.engine.block_manager.pool.num_blocks == 13
    assert run(tight, GREEDY if which == "greedy" else SEEDED) == expected[which]
    snap = tight.engine.cache_snapshot()
    assert snap.num_preemptions > 0 and snap.pool.num_used_blocks == 0
    assert not tight.engine.runner.host_blocks and not tight.engine.runner.parked_windows
    store = tight.engine.runner.kv_store
    assert not store._slot_of  # every residual window given back


def test_prefix_hits_and_n_samples_give_the_uncached_outputs(tiny_hf_dir, quantized):
    """Exact when the window is the partial block alone (--kv-residual-tokens 0): a hit's first
    computed token then reads only its own block in float32, as the uncached run did."""
    name = quantized[0]
    expected = {"greedy": run(make(tiny_hf_dir, name, enable_prefix_caching=False,
                                   kv_residual_tokens=0), GREEDY)}
    llm = make(tiny_hf_dir, name, kv_residual_tokens=0)
    assert run(llm, GREEDY) == expected["greedy"]
    again = llm.generate(PROMPTS, GREEDY, use_tqdm=False)  # every full block now a hit
    assert [o.token_ids for o in again] == expected["greedy"]
    assert sum(o.num_cached_tokens for o in again) > 0
    n3 = SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=4, ignore_eos=True)
    shared = llm.generate(PROMPTS[2], n3, use_tqdm=False)
    alone = make(tiny_hf_dir, name, enable_prefix_caching=False,
                 kv_residual_tokens=0).generate(PROMPTS[2], n3, use_tqdm=False)
    assert [s.token_ids for s in shared[0].outputs] == [s.token_ids for s in alone[0].outputs]
    llm.engine.block_manager.check_invariants()


def test_a_prefix_hit_with_a_longer_window_reads_the_hit_blocks_through_their_codes(
        tiny_hf_dir, quantized):
    """With whole blocks in the window, a hit's first computed tokens read the window's blocks
    before the hit as their codes decode (the float K/V were the first request's, not kept):
    the hit run then equals a run of the same prompt whose first blocks came from the cache
    the same way, and the C decode path agrees with the PyTorch path on it."""
    name, _, expected = quantized
    prompt = {"prompt_token_ids": [(5 * j) % 190 + 11 for j in range(30)]}
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    llm = make(tiny_hf_dir, name)
    llm.generate(prompt, params, use_tqdm=False)
    hit = llm.generate(prompt, params, use_tqdm=False)[0]
    assert hit.num_cached_tokens == 28  # 7 blocks: all but the last token's
    again = llm.generate(prompt, params, use_tqdm=False)[0]
    assert again.num_cached_tokens == 28 and again.token_ids == hit.token_ids
    llm.engine.runner.attention.use_fast_decode = False
    slow = llm.generate(prompt, params, use_tqdm=False)[0]
    assert slow.num_cached_tokens == 28 and slow.token_ids == hit.token_ids
    llm.engine.block_manager.check_invariants()
    assert not llm.engine.runner.kv_store._slot_of


def test_c_decode_over_codes_gives_the_pytorch_paths_tokens(tiny_hf_dir, quantized):
    name, llm, expected = quantized
    attention = llm.engine.runner.attention
    attention.use_fast_decode = False
    try:
        assert run(llm, GREEDY) == expected["greedy"]
    finally:
        attention.use_fast_decode = True


def test_the_format_is_part_of_every_block_key(tiny_hf_dir):
    keys = {}
    for name in ("float32", "int8", "fp8_e4m3", "int4", "int8/int4"):
        llm = make(tiny_hf_dir, name)
        llm.engine.record_kv_events()
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=1), use_tqdm=False)
        keys[name] = {e.block_key for e in llm.engine.drain_kv_events() if e.block_key}
    assert keys["float32"] and not (keys["float32"] & keys["int8"])
    names = list(keys)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert keys[a] and not (keys[a] & keys[b]), (a, b)


@pytest.mark.parametrize("mode", ["contiguous", "none"])
def test_dense_modes_refuse_a_quantized_format(tiny_hf_dir, mode):
    with pytest.raises(ConfigError, match="paged pool only"):
        make(tiny_hf_dir, "int8", cache_mode=mode)


class ForgetsItsScales(ChannelBlockCodec):
    """A plausible bug: decodes the int8 codes as if every scale were 1 (K and V alike)."""

    def __init__(self):
        super().__init__("int8", 8)

    def decode_blocks(self, parts, dtype):
        return (parts["codes"].float() + parts["zero"].float().unsqueeze(1)).to(dtype)


@pytest.fixture
def broken_int8(monkeypatch):
    real = paged.codec_for
    monkeypatch.setattr(paged, "codec_for",
                        lambda name, which=0: ForgetsItsScales() if name == "int8"
                        else real(name, which))


def test_the_guardrail_measures_a_quantized_format_at_start_up(tiny_hf_dir, quantized):
    name, llm, _ = quantized
    check = llm.engine.cache_snapshot().quant_check
    assert check is not None and check.kv_cache_dtype == name and check.reference == "float32"
    context = llm.engine.spec.max_position_embeddings  # the tiny model's: under 1,024
    assert check.num_predictions == min(1024, context) - 1
    assert 0 <= check.mean_kl < 0.1 and check.top1_agreement >= 0.8
    assert check.perplexity == pytest.approx(check.perplexity_reference, rel=0.2)
    float_run = make(tiny_hf_dir, "float32")
    assert float_run.engine.cache_snapshot().quant_check is None  # float formats: no check


def test_the_guardrail_refuses_a_broken_codec(tiny_hf_dir, broken_int8):
    with pytest.raises(ConfigError, match="int8 fails the quantized-KV check: mean KL"):
        make(tiny_hf_dir, "int8")


def test_the_guardrail_can_warn_or_be_off(tiny_hf_dir, broken_int8, caplog):
    with caplog.at_level(logging.WARNING, logger="kvserve.engine"):
        warned = make(tiny_hf_dir, "int8", kv_quant_check="warn")
    assert "fails the quantized-KV check" in caplog.text
    check = warned.engine.cache_snapshot().quant_check
    assert check.mean_kl > 0.1 or check.top1_agreement < 0.8
    off = make(tiny_hf_dir, "int8", kv_quant_check="off")
    assert off.engine.cache_snapshot().quant_check is None
    assert isinstance(off.engine.runner.kv_store.codec, ForgetsItsScales)
    assert torch.is_tensor(off.engine.runner.kv_store.parts["k.scale"])


def test_the_check_is_measured_once_per_model_format_and_codec(tiny_hf_dir, tmp_path,
                                                               monkeypatch):
    from kvserve.engine import kv_check

    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path))
    first = make(tiny_hf_dir, "int8").engine.cache_snapshot().quant_check
    assert len(list((tmp_path / "kv_checks").glob("*.json"))) == 1

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(kv_check, "compare", no_measuring)
    again = make(tiny_hf_dir, "int8").engine.cache_snapshot().quant_check
    assert again == first  # read back, not measured
    with pytest.raises(AssertionError, match="measured again"):  # another format: measured
        make(tiny_hf_dir, "fp8_e4m3")
    real = paged.codec_for
    monkeypatch.setattr(paged, "codec_for",
                        lambda name, which=0: ForgetsItsScales() if name == "int8"
                        else real(name, which))
    with pytest.raises(AssertionError, match="measured again"):  # another codec: measured
        make(tiny_hf_dir, "int8")
