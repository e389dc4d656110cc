"""The cuda backend's gated activation against the registry's reference op: float32 and
float16 on the CPU (Triton's interpreter) at small shapes, bfloat16 on a GPU at real ones."""

import pytest
import torch

from kiln.backends.cuda.activations import gated_activation, gated_configs
from kiln.ir import REGISTRY
from kiln.ir.opdefs.fused import ACTIVATIONS

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
             torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def gpu(*values):
    return pytest.param(*values, marks=pytest.mark.gpu)


CASES = [
    *(("cpu", dtype, shape) for dtype in (torch.float32, torch.float16)
      for shape in [(0, 128), (1, 600), (3, 2, 74), (8, 200)]),
    *(gpu("cuda", torch.bfloat16, shape) for shape in [(1, 2 * 14336), (7, 2 * 14336), (256, 2 * 14336),
                                                       (2048, 2 * 14336), (1, 1, 2 * 1536), (64, 2 * 1536)]),
    gpu("cuda", torch.float16, (33, 2 * 14336)),
    gpu("cuda", torch.float32, (33, 2 * 14336)),
]


def randn(shape, dtype, device, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype=dtype, device=device)


def check(got, want, dtype):
    assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


@pytest.mark.parametrize("device, dtype, shape", CASES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gated_activation(device, dtype, shape, activation):
    x = randn(shape, dtype, device) * 3
    before = x.clone()
    got = gated_activation(x, activation=activation)
    check(got, REGISTRY["gated_activation"].reference(x, activation=activation), dtype)
    assert torch.equal(x, before)


@pytest.mark.parametrize("columns", [slice(0, 64), slice(0, 128, 2)])
def test_strided_inputs(columns):
    x = randn((4, 128), torch.float32, "cpu")[:, columns]
    check(gated_activation(x, activation="silu"),
          REGISTRY["gated_activation"].reference(x, activation="silu"), torch.float32)


@pytest.mark.parametrize("device, dtype, rows, n", [
    ("cpu", torch.float32, 3, 300),
    gpu("cuda", torch.bfloat16, 7, 14336),
])
def test_every_candidate_config_gives_the_same_result(device, dtype, rows, n):
    x = randn((rows, 2 * n), dtype, device)
    want = REGISTRY["gated_activation"].reference(x, activation="silu")
    configs = gated_configs(n)
    assert configs and len(set(configs)) == len(configs)
    for config in configs:
        check(gated_activation(x, activation="silu", config=config), want, dtype)


def test_an_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="relu"):
        gated_activation(torch.ones(1, 4), activation="relu")
