"""The Triton GEMV against ``linear``'s registry reference, and the dispatch that uses it
only for one row of a tuned weight shape."""

import pytest
import torch

from kiln.ir import REGISTRY

gemv = pytest.importorskip("kiln.backends.cuda.gemv")

GPU = pytest.mark.gpu
REFERENCE = REGISTRY["linear"].reference


@pytest.mark.parametrize("device, dtype, n, k, tolerance", [
    ("cpu", torch.float32, 37, 300, 1e-5), ("cpu", torch.float16, 64, 1000, 2e-3),
    pytest.param("cuda", torch.bfloat16, 6144, 4096, 1e-2, marks=GPU),
    pytest.param("cuda", torch.bfloat16, 4096, 14336, 1e-2, marks=GPU),
    pytest.param("cuda", torch.bfloat16, 128256, 4096, 1e-2, marks=GPU),
])
@pytest.mark.parametrize("config", [gemv.GemvConfig(), gemv.GemvConfig(block_n=16, block_k=128)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_the_reference(device, dtype, n, k, tolerance, config, with_bias):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(1, 1, k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if with_bias else None
    want = REFERENCE(x.float(), w.float(), None if b is None else b.float())
    got = gemv.gemv(x, w, b, config)
    assert got.shape == (1, 1, n) and got.dtype == dtype
    assert ((got.float() - want).norm() / want.norm()) < tolerance


def test_linear_takes_the_gemv_only_for_one_row_of_a_tuned_shape(monkeypatch):
    calls = []

    def recording(*args):
        calls.append(args)
        return torch.zeros(1, 8)

    monkeypatch.setattr(gemv, "gemv", recording)
    w, tuned = torch.randn(8, 16), {gemv.shape_key(8, 16): {"block_n": 4, "block_k": 16}}
    gemv.linear(torch.randn(1, 16), w, config=tuned)
    assert len(calls) == 1
    for x, config in ((torch.randn(3, 16), tuned), (torch.randn(1, 16), {}), (torch.randn(1, 16), None)):
        torch.testing.assert_close(gemv.linear(x, w, config=config), x @ w.T)
    assert len(calls) == 1
