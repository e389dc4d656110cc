"""The cuda backend's norm kernels against the registry's reference ops: float32 and float16
on the CPU (Triton's interpreter) at small shapes, bfloat16 on a GPU at real ones."""

import pytest
import torch

from kiln.backends.cuda.norms import NormConfig, add_layer_norm, add_rms_norm, norm_configs, rms_norm
from kiln.ir import REGISTRY

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
             torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def gpu(*values):
    return pytest.param(*values, marks=pytest.mark.gpu)


CASES = [
    *(("cpu", dtype, shape) for dtype in (torch.float32, torch.float16)
      for shape in [(0, 64), (1, 300), (3, 5, 64), (8, 100), (2, 1, 37)]),
    *(gpu("cuda", torch.bfloat16, shape) for shape in [(1, 4096), (7, 4096), (256, 4096), (2048, 4096),
                                                       (1, 1, 576), (9, 576), (3, 8192), (5, 5120)]),
    gpu("cuda", torch.float16, (33, 2048)),
    gpu("cuda", torch.float32, (33, 2048)),
]


def randn(shape, dtype, device, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype=dtype, device=device)


def check(got, want, dtype):
    assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


@pytest.mark.parametrize("device, dtype, shape", CASES)
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm(device, dtype, shape, with_weight):
    x = randn(shape, dtype, device, 0) * 3
    weight = randn(shape[-1:], dtype, device, 1) if with_weight else None
    check(rms_norm(x, weight, eps=1e-6), REGISTRY["rms_norm"].reference(x, weight, eps=1e-6), dtype)


@pytest.mark.parametrize("device, dtype, shape", CASES)
@pytest.mark.parametrize("with_weight", [True, False])
def test_add_rms_norm(device, dtype, shape, with_weight):
    x, residual = randn(shape, dtype, device, 0), randn(shape, dtype, device, 1)
    weight = randn(shape[-1:], dtype, device, 2) if with_weight else None
    inputs = (x.clone(), residual.clone())
    got = add_rms_norm(x, residual, weight, eps=1e-5)
    want = REGISTRY["add_rms_norm"].reference(x, residual, weight, eps=1e-5)
    check(got[0], want[0], dtype)
    assert torch.equal(got[1], want[1])  # the sum is rounded exactly as torch rounds it
    assert torch.equal(x, inputs[0]) and torch.equal(residual, inputs[1])


@pytest.mark.parametrize("device, dtype, shape", CASES)
@pytest.mark.parametrize("with_weight, with_bias", [(True, True), (True, False), (False, False)])
def test_add_layer_norm(device, dtype, shape, with_weight, with_bias):
    x, residual = randn(shape, dtype, device, 0) + 1, randn(shape, dtype, device, 1)
    weight = randn(shape[-1:], dtype, device, 2) if with_weight else None
    bias = randn(shape[-1:], dtype, device, 3) if with_bias else None
    got = add_layer_norm(x, residual, weight, bias, eps=1e-5)
    want = REGISTRY["add_layer_norm"].reference(x, residual, weight, bias, eps=1e-5)
    check(got[0], want[0], dtype)
    assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("columns", [slice(0, 48), slice(0, 96, 2)])
def test_strided_inputs(columns):
    x = randn((4, 96), torch.float32, "cpu", 0)[:, columns]
    check(rms_norm(x, eps=1e-6), REGISTRY["rms_norm"].reference(x, None, eps=1e-6), torch.float32)


@pytest.mark.parametrize("device, dtype, rows, hidden", [
    ("cpu", torch.float32, 5, 40),
    gpu("cuda", torch.bfloat16, 256, 4096),
    gpu("cuda", torch.bfloat16, 256, 576),
])
def test_every_candidate_config_gives_the_same_result(device, dtype, rows, hidden):
    x, residual = randn((rows, hidden), dtype, device, 0), randn((rows, hidden), dtype, device, 1)
    weight = randn((hidden,), dtype, device, 2)
    want = REGISTRY["add_rms_norm"].reference(x, residual, weight, eps=1e-6)
    configs = norm_configs(hidden)
    assert configs and len(set(configs)) == len(configs)
    for config in configs:
        got = add_rms_norm(x, residual, weight, eps=1e-6, config=config)
        check(got[0], want[0], dtype)
        assert torch.equal(got[1], want[1]), config


def test_candidate_configs_scale_with_the_row():
    assert NormConfig(num_warps=16, block_rows=1) in norm_configs(8192)
    assert all(config.block_rows == 1 for config in norm_configs(16384))
    assert max(config.block_rows for config in norm_configs(64)) == 16
