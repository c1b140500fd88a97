"""The C decode kernels against their PyTorch reference (F.linear)."""

import pytest
import torch

from kvserve.kernels import cpu

pytestmark = pytest.mark.skipif(cpu.load() is None, reason="no C compiler: reference path only")


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 13, 64])  # row-streaming gemv, then tiled GEMM
@pytest.mark.parametrize("n,k", [(1, 5), (7, 13), (96, 64), (130, 257)])
def test_gemv_f32_matches_reference(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g)
    torch.testing.assert_close(cpu.linear(x, w), cpu.reference_linear(x, w),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m", [1, 6, 13])
def test_gemv_accumulates_into_y(m):
    g = torch.Generator().manual_seed(m)
    x, w, y = torch.randn(m, 40, generator=g), torch.randn(11, 40, generator=g), torch.randn(m, 11)
    expected = y + cpu.reference_linear(x, w)
    cpu.linear_add_(y, x, w)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m", [1, 4, 11])
@pytest.mark.parametrize("n,k", [(9, 31), (64, 5000)])
def test_gemv_bf16_weights_match_widened_reference(m, n, k):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g).bfloat16()
    torch.testing.assert_close(cpu.linear(x, w), x @ w.float().t(), rtol=1e-4, atol=1e-4)


def test_large_batches_take_the_reference_path():
    x = torch.randn(cpu.MAX_M + 1, 16)
    w = torch.randn(8, 16)
    assert torch.equal(cpu.linear(x, w), cpu.reference_linear(x, w))


def test_bfloat16_activations_come_back_in_bfloat16():
    x = torch.randn(1, 32).bfloat16()
    w = torch.randn(8, 32).bfloat16()
    y = cpu.linear(x, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x.float() @ w.float().t(), rtol=2e-2, atol=2e-2)


def test_a_new_build_drops_stale_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path))
    stale = tmp_path / "kernels" / "gemv-0123456789abcdef.so"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old build")
    target = cpu._build()
    assert target is not None and target.is_file() and target.parent == stale.parent
    assert not stale.exists()
    assert cpu._build() == target  # cached: found, not rebuilt


def test_freed_memory_is_kept_for_reuse_unless_opted_out():
    """keep_freed_memory (mallopt, glibc on Linux), once per process; KVSERVE_KEEP_FREED_MEMORY=0
    leaves malloc's defaults."""
    import os
    import subprocess
    import sys

    code = ("from kvserve.kernels import cpu; "
            "print(cpu.keep_freed_memory(), cpu.keep_freed_memory())")
    for env, want in (({}, "True True"), ({"KVSERVE_KEEP_FREED_MEMORY": "0"}, "False False")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, **env}, check=True).stdout.strip()
        assert out == want
