"""The cuda backend's fused QKV split with rotary embedding against the registry's reference
op: float32 and float16 on the CPU (Triton's interpreter) at small shapes, bfloat16 on a GPU
at Llama-3 8B and SmolLM2 shapes; rotate-half and interleaved, partial rotary, the
transposed cos/sin views that real graphs pass, and cos/sin broadcast over a batch."""

import pytest
import torch

from kiln.backends.cuda.rotary import RotaryConfig, default_rotary_config, qkv_rotary, rotary_configs
from kiln.ir import REGISTRY

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
             torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def gpu(*values):
    return pytest.param(*values, marks=pytest.mark.gpu)


# (leading dims of qkv, q_heads, kv_heads, head_dim, rotary_dim, rope theta)
CPU_SHAPES = [((1, 5), 4, 2, 16, 16, 1e4), ((1, 3), 3, 1, 20, 10, 1e4), ((7,), 6, 3, 16, 8, 1e4),
              ((2, 3), 2, 1, 8, 8, 1e4), ((1, 0), 4, 2, 16, 16, 1e4), ((1, 4), 9, 3, 64, 64, 1e5)]
GPU_SHAPES = [*(((1, tokens), 32, 8, 128, 128, 5e5) for tokens in (1, 7, 256, 2048)),
              ((1, 1), 9, 3, 64, 64, 1e5), ((1, 256), 9, 3, 64, 64, 1e5),
              ((1, 33), 32, 32, 80, 32, 1e4), ((1, 33), 32, 8, 96, 96, 1e4), ((1, 33), 8, 4, 256, 256, 1e4)]
CASES = [
    *(("cpu", dtype, *shape) for dtype in (torch.float32, torch.float16) for shape in CPU_SHAPES),
    *(gpu("cuda", torch.bfloat16, *shape) for shape in GPU_SHAPES),
    gpu("cuda", torch.float16, *GPU_SHAPES[2]),
    gpu("cuda", torch.float32, *GPU_SHAPES[2]),
]


def make_inputs(leading, q_heads, kv_heads, head_dim, rotary_dim, theta, dtype, device, seed=0):
    """Random qkv, and cos/sin of one frequency per feature (so that a swapped feature shows)
    at positions from a random offset, as the transposed view [..., tokens, 1, r] of
    [..., 1, tokens, r] that real graphs pass; leading dims before the tokens are 1 (broadcast)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(*leading, (q_heads + 2 * kv_heads) * head_dim, generator=g)
    tokens = leading[-1]
    positions = torch.randint(0, 1000, (1,), generator=g) + torch.arange(tokens)
    angles = positions[:, None] * theta ** -(torch.arange(rotary_dim) / rotary_dim)
    shape = (1,) * (len(leading) - 1) + (1, tokens, rotary_dim)
    cos, sin = (t.reshape(shape).to(dtype=dtype, device=device).transpose(-2, -3)
                for t in (angles.cos(), angles.sin()))
    return qkv.to(dtype=dtype, device=device), cos, sin


@pytest.mark.parametrize("device, dtype, leading, q_heads, kv_heads, head_dim, rotary_dim, theta", CASES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_qkv_rotary(device, dtype, leading, q_heads, kv_heads, head_dim, rotary_dim, theta, interleaved):
    qkv, cos, sin = make_inputs(leading, q_heads, kv_heads, head_dim, rotary_dim, theta, dtype, device)
    before = qkv.clone()
    attrs = dict(q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, interleaved=interleaved)
    got = qkv_rotary(qkv, cos, sin, **attrs)
    want = REGISTRY["qkv_rotary"].reference(qkv, cos, sin, **attrs)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype and g.is_contiguous()
        torch.testing.assert_close(g, w, **TOLERANCE[dtype])
    assert torch.equal(got[2], want[2])  # v is copied
    assert torch.equal(qkv, before)


@pytest.mark.parametrize("device, dtype, leading, q_heads, kv_heads, head_dim, rotary_dim, theta", [
    ("cpu", torch.float32, (1, 3), 6, 3, 16, 8, 1e4),
    gpu("cuda", torch.bfloat16, (1, 256), 32, 8, 128, 128, 5e5),
    gpu("cuda", torch.bfloat16, (1, 256), 9, 3, 64, 64, 1e5),
])
def test_every_candidate_config_gives_the_same_result(device, dtype, leading, q_heads, kv_heads, head_dim,
                                                      rotary_dim, theta):
    qkv, cos, sin = make_inputs(leading, q_heads, kv_heads, head_dim, rotary_dim, theta, dtype, device)
    attrs = dict(q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, interleaved=False)
    want = REGISTRY["qkv_rotary"].reference(qkv, cos, sin, **attrs)
    configs = rotary_configs(head_dim, kv_heads)
    assert configs and len(set(configs)) == len(configs)
    for config in configs:
        for g, w in zip(qkv_rotary(qkv, cos, sin, **attrs, config=config), want, strict=True):
            torch.testing.assert_close(g, w, **TOLERANCE[dtype])


def test_default_config_blocks_the_kv_heads():
    assert default_rotary_config(8, 128) == RotaryConfig(block_heads=8, num_warps=4)
    assert default_rotary_config(3, 64) == RotaryConfig(block_heads=4, num_warps=1)
    assert default_rotary_config(1, 256).block_heads == 1
