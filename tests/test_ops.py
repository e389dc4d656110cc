"""Shape rules and reference implementations of the core ops, against torch."""

import math

import pytest
import torch
import torch.nn.functional as F

from kiln.ir import Graph, ShapeError, TensorType, interpret, ops, sym, verify

B, S = sym("batch"), sym("seq")


def _run(build, *tensors, batched=1):
    """Build a graph over inputs typed like ``tensors`` (the first dim of the first
    ``batched`` inputs symbolic) and run it."""
    g = Graph("t")
    values = [g.add_input(f"x{i}", TensorType(t.dtype, (B, *t.shape[1:]) if i < batched else t.shape))
              for i, t in enumerate(tensors)]
    out = build(*values)
    g.set_outputs(list(out) if isinstance(out, tuple) else [out])
    verify(g)
    return interpret(g, list(tensors))


@pytest.mark.parametrize("causal, window, softcap, groups, mask", [
    (False, None, None, 1, False), (True, None, None, 1, False), (True, None, None, 2, False),
    (False, None, None, 4, True), (True, 3, None, 2, False), (True, None, 30.0, 1, False),
])
def test_attention_matches_a_direct_computation(causal, window, softcap, groups, mask):
    torch.manual_seed(0)
    b, hkv, sq, skv, d = 2, 2, 5, 7, 8
    q = torch.randn(b, hkv * groups, sq, d)
    k, v = torch.randn(b, hkv, skv, d), torch.randn(b, hkv, skv, d)
    m = torch.rand(b, 1, sq, skv) > 0.3 if mask else None
    m = m | (torch.arange(skv) == 0) if mask else None  # keep one key per row
    inputs = (q, k, v) + ((m,) if mask else ())
    out = _run(lambda *a: ops.attention(*a, causal=causal, sliding_window=window, softcap=softcap), *inputs,
               batched=len(inputs))[0]
    kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ kk.transpose(-1, -2) / math.sqrt(d)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    qpos = torch.arange(sq)[:, None] + skv - sq
    kpos = torch.arange(skv)[None]
    allowed = torch.ones(sq, skv, dtype=torch.bool)
    if causal:
        allowed &= kpos <= qpos
    if window:
        allowed &= qpos - kpos < window
    if mask:
        allowed = allowed & m
    expected = torch.softmax(scores.masked_fill(~allowed, -torch.inf), -1) @ vv
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if not window and not softcap:
        sdpa = F.scaled_dot_product_attention(q, kk, vv, attn_mask=m if mask else None,
                                              is_causal=causal and sq == skv)
        if causal and sq != skv:
            sdpa = F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed)
        torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_give_zeros():
    q = torch.randn(1, 1, 2, 4)
    mask = torch.zeros(1, 1, 2, 3, dtype=torch.bool)
    out = _run(lambda q, k, v, m: ops.attention(q, k, v, m), q, torch.randn(1, 1, 3, 4),
               torch.randn(1, 1, 3, 4), mask, batched=4)[0]
    assert torch.equal(out, torch.zeros_like(out))


def test_norm_rejects_mismatched_weight():
    g = Graph("t")
    x = g.add_input("x", TensorType("f32", (B, 16)))
    w = g.add_input("w", TensorType("f32", (8,)))
    with pytest.raises(ShapeError, match="does not match the last dim"):
        ops.rms_norm(x, w)


def test_rms_norm_and_layer_norm_numerics():
    x, w, bias = torch.randn(3, 16), torch.randn(16), torch.randn(16)
    g = Graph("t")
    xv = g.add_input("x", TensorType("f32", (B, 16)))
    wv, bv = g.add_constant(w, name="w"), g.add_constant(bias, name="b")
    g.set_outputs([ops.rms_norm(xv, wv, eps=1e-5), ops.layer_norm(xv, wv, bv, eps=1e-5)])
    rms, ln = interpret(g, [x])
    torch.testing.assert_close(rms, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w)
    torch.testing.assert_close(ln, F.layer_norm(x, (16,), w, bias, 1e-5))


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotated", [8, 4])
def test_rotary_is_a_rotation_of_pairs(interleaved, rotated):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8)
    theta = torch.randn(5, rotated // 2)
    if interleaved:
        angles = theta.repeat_interleave(2, -1)
    else:
        angles = torch.cat([theta, theta], -1)
    out = _run(lambda x, c, s: ops.rotary(x, c, s, interleaved=interleaved), x,
               torch.cos(angles), torch.sin(angles))
    # The same rotation, as complex multiplication of (even, odd) or (first half, second half) pairs.
    xr = x[..., :rotated]
    if interleaved:
        pairs = torch.complex(xr[..., 0::2], xr[..., 1::2])
    else:
        pairs = torch.complex(xr[..., : rotated // 2], xr[..., rotated // 2:])
    turned = pairs * torch.polar(torch.ones_like(theta), theta)
    if interleaved:
        expected = torch.stack([turned.real, turned.imag], -1).flatten(-2)
    else:
        expected = torch.cat([turned.real, turned.imag], -1)
    torch.testing.assert_close(out[0][..., :rotated], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[0][..., rotated:], x[..., rotated:])


def test_symbolic_shape_rules():
    g = Graph("t")
    x = g.add_input("x", TensorType("f32", (B, S, 8)))
    assert ops.reshape(x, shape=(-1, 8)).shape == (B * S, 8)
    assert ops.reshape(x, shape=(B, S, 2, -1)).shape == (B, S, 2, 4)
    assert ops.concat([x, x], dim=1).shape == (B, 2 * S, 8)
    assert [v.shape for v in ops.split(x, dim=2, sizes=(3, 5))] == [(B, S, 3), (B, S, 5)]
    assert ops.slice(x, dim=1, start=1).shape == (B, S - 1, 8)
    assert ops.slice(x, dim=2, start=2, end=100, step=2).shape == (B, S, 3)
    assert ops.arange(graph=g, end=S).shape == (S,)
    assert ops.matmul(x, ops.transpose(x, dim0=1, dim1=2)).shape == (B, S, S)
    assert ops.sum(x, dims=(1,), keepdim=True).shape == (B, 1, 8)
    assert ops.expand(ops.unsqueeze(x, dim=1), shape=(-1, 3, -1, -1)).shape == (B, 3, S, 8)
    for bad, message in [
        (lambda: ops.reshape(x, shape=(B, 7)), "element counts differ"),
        (lambda: ops.split(x, dim=2, sizes=(3, 3)), "do not add up"),
        (lambda: ops.add(x, ops.cast(x, dtype="f16")), "dtypes differ"),
        (lambda: ops.matmul(x, x), "contraction dims differ"),
        (lambda: ops.squeeze(x, dim=1), "it is not 1"),
        (lambda: ops.transpose(x, dim0=0, dim1=5), "out of range"),
        (lambda: ops.cast(x, dtype="i4"), "i4"),
    ]:
        with pytest.raises(ShapeError, match=message):
            bad()


def test_data_movement_references():
    x = torch.randn(2, 3, 4)
    outs = _run(lambda x: (ops.permute(x, dims=(2, 0, 1)), ops.slice(x, dim=-1, start=-3, end=-1),
                           ops.index_select(x, ops.cast(ops.arange(graph=x.graph, end=2), dtype="i64"), dim=2),
                           ops.gather(x, ops.argmax(x, dim=-1, keepdim=True), dim=-1)), x)
    assert torch.equal(outs[0], x.permute(2, 0, 1))
    assert torch.equal(outs[1], x[..., 1:3])
    assert torch.equal(outs[2], x[..., :2])
    assert torch.equal(outs[3], x.max(-1, keepdim=True).values)


def test_embedding_and_linear():
    ids = torch.tensor([[1, 0, 3], [2, 2, 1]])
    table, w, bias = torch.randn(4, 6), torch.randn(5, 6), torch.randn(5)
    g = Graph("t")
    idv = g.add_input("ids", TensorType("i64", (B, S)))
    h = ops.embedding(idv, g.add_constant(table, name="table"))
    g.set_outputs([ops.linear(h, g.add_constant(w, name="w"), g.add_constant(bias, name="b"))])
    torch.testing.assert_close(interpret(g, [ids])[0], F.linear(table[ids], w, bias))


def test_attention_of_empty_sequences_and_heads():
    for q_len, kv_len, dim in ((0, 3, 4), (2, 0, 4), (2, 3, 0)):
        q, k = torch.randn(1, 1, q_len, dim), torch.randn(1, 1, kv_len, dim)
        out = _run(lambda q, k, v: ops.attention(q, k, v), q, k, torch.randn(1, 1, kv_len, 2), batched=3)[0]
        assert out.shape == (1, 1, q_len, 2) and not torch.isnan(out).any()
