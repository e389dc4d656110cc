"""The cuda backend's fused mixture of experts against the registry's reference ops:
float32 and float16 on the CPU (Triton's interpreter) at small shapes, bfloat16 on a GPU at
Mixtral's, Qwen3-MoE's and Llama 4 Scout's shapes; Llama 4's experts that weigh their inputs; the
alignment of pairs to blocks; capture in a CUDA graph."""

import pytest
import torch

from kiln.backends.cuda.moe import MoeConfig, align, moe, moe_experts
from kiln.ir import REGISTRY

TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-2, atol=2e-2),
             torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def gpu(*values):
    return pytest.param(*values, marks=pytest.mark.gpu)


def _problem(tokens, hidden, inter, experts, top_k, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    logits = torch.randn(tokens, experts, generator=gen)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen) * hidden ** -0.5
    down = torch.randn(experts, hidden, inter, generator=gen) * inter ** -0.5
    return [t.to(dtype=dtype, device=device) for t in (x, logits, gate_up, down)]


CASES = [
    *(("cpu", torch.float32, shape) for shape in [(1, 16, 16, 4, 2), (7, 24, 40, 4, 2), (33, 32, 16, 8, 3)]),
    *(("cpu", torch.float16, shape) for shape in [(5, 16, 32, 3, 1), (7, 24, 40, 4, 2)]),
    *(gpu("cuda", torch.bfloat16, (tokens, 4096, 14336, 8, 2)) for tokens in (1, 64, 512)),  # Mixtral-8x7B
    *(gpu("cuda", torch.bfloat16, (tokens, 2048, 768, 128, 8)) for tokens in (1, 64, 512)),  # Qwen3-30B-A3B
    gpu("cuda", torch.float16, (37, 1024, 512, 16, 4)),
]


@pytest.mark.parametrize("device, dtype, shape", CASES)
def test_moe_matches_the_reference(device, dtype, shape, activation="silu"):
    tokens, hidden, inter, experts, top_k = shape
    x, logits, gate_up, down = _problem(tokens, hidden, inter, experts, top_k, dtype, device)
    attrs = dict(top_k=top_k, scoring="softmax", normalize=True, scale=1.0, num_groups=1, topk_groups=1,
                 activation=activation)
    got = moe(x, logits, gate_up, down, None, **attrs)
    want = REGISTRY["moe"].reference(x, logits, gate_up, down, None, **attrs)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


LLAMA4_CASES = [
    *(("cpu", torch.float32, shape) for shape in [(1, 16, 16, 4, 1), (9, 24, 40, 4, 1), (33, 32, 16, 8, 2)]),
    ("cpu", torch.float16, (7, 24, 40, 4, 1)),
    *(gpu("cuda", torch.bfloat16, (tokens, 5120, 8192, 16, 1)) for tokens in (1, 64, 512)),  # Llama 4 Scout
]


@pytest.mark.parametrize("device, dtype, shape", LLAMA4_CASES)
def test_llama4_experts_weigh_their_inputs(device, dtype, shape):
    """Llama 4's routed MLP: sigmoid scores of the chosen logits scale each expert's input."""
    tokens, hidden, inter, experts, top_k = shape
    x, logits, gate_up, down = _problem(tokens, hidden, inter, experts, top_k, dtype, device, seed=4)
    attrs = dict(top_k=top_k, scoring="sigmoid", normalize=False, scale=1.0, num_groups=1, topk_groups=1,
                 activation="silu", weigh_inputs=True)
    got = moe(x, logits, gate_up, down, None, **attrs)
    want = REGISTRY["moe"].reference(x, logits, gate_up, down, None, **attrs)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    unweighed = REGISTRY["moe"].reference(x, logits, gate_up, down, None, **{**attrs, "weigh_inputs": False})
    assert not torch.allclose(got.float(), unweighed.float(), **TOLERANCE[dtype])


def test_grouped_sigmoid_routing_gelu_and_small_blocks():
    x, logits, gate_up, down = _problem(9, 16, 16, 8, 3, torch.float32, "cpu", seed=1)
    bias = torch.randn(8, generator=torch.Generator().manual_seed(2))
    attrs = dict(top_k=3, scoring="sigmoid", normalize=True, scale=2.5, num_groups=4, topk_groups=2,
                 activation="gelu_tanh")
    got = moe(x, logits, gate_up, down, bias, **attrs, config=MoeConfig(block_m=16, block_n=16, block_k=16))
    torch.testing.assert_close(got, REGISTRY["moe"].reference(x, logits, gate_up, down, bias, **attrs),
                               **TOLERANCE[torch.float32])


def test_experts_take_given_routing():
    x, _, gate_up, down = _problem(6, 16, 24, 5, 2, torch.float32, "cpu", seed=3)
    weights = torch.rand(6, 2)
    indices = torch.tensor([[0, 4], [4, 0], [2, 2], [1, 3], [3, 1], [4, 2]])
    for weigh_inputs in (False, True):
        got = moe_experts(x, weights, indices, gate_up, down, activation="gelu", weigh_inputs=weigh_inputs)
        want = REGISTRY["moe_experts"].reference(x, weights, indices, gate_up, down, activation="gelu",
                                                 weigh_inputs=weigh_inputs)
        torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])


def test_align_gives_each_block_one_expert():
    indices = torch.tensor([[3, 0], [0, 1], [3, 0], [0, 3], [1, 0]])
    rows, experts = align(indices, 5, 4)
    assert rows.numel() == 4 * len(experts) == 4 * (3 + 5)
    flat = indices.reshape(-1)
    assert sorted(rows[rows >= 0].tolist()) == list(range(10))  # every pair once
    for block, expert in enumerate(experts.tolist()):
        chosen = rows[4 * block:4 * block + 4]
        chosen = chosen[chosen >= 0]
        assert (expert == 5 and len(chosen) == 0) or (flat[chosen] == expert).all()
    assert experts.tolist()[:4] == [0, 0, 1, 3]  # expert 0 has 5 pairs: two blocks


@pytest.mark.gpu
def test_a_decode_step_is_captured_in_a_cuda_graph():
    x, logits, gate_up, down = _problem(4, 256, 512, 8, 2, torch.bfloat16, "cuda")
    attrs = dict(top_k=2, scoring="softmax", normalize=True, scale=1.0, num_groups=1, topk_groups=1,
                 activation="silu")
    moe(x, logits, gate_up, down, None, **attrs)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe(x, logits, gate_up, down, None, **attrs)
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    torch.testing.assert_close(out, REGISTRY["moe"].reference(x, logits, gate_up, down, None, **attrs),
                               **TOLERANCE[torch.bfloat16])
