"""Plain nn.Modules through kiln.compile: same outputs as the module, at shapes other than
the traced ones; unsupported ops reported together with where they came from."""

import pytest
import torch
from torch import nn
from torch.export import Dim

import kiln
from kiln.frontends import FrontendError, UnsupportedOpsError


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x), approximate="tanh")) + x


class Block(nn.Module):
    """A pre-norm transformer encoder block written with scaled_dot_product_attention."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, mask):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + self.out(att.transpose(1, 2).reshape(b, s, d))
        return {"hidden": x + self.mlp(self.norm2(x)), "pooled": x.mean(1)}


def test_mlp_with_dynamic_batch():
    module = MLP().eval()
    compiled = kiln.compile(module, example_inputs=[torch.randn(4, 8)], dynamic_shapes=({0: Dim("batch")},))
    assert str(compiled.graph.inputs[0].type) == "f32[batch, 8]"
    for batch in (1, 3, 17):
        x = torch.randn(batch, 8)
        torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-5)


def test_encoder_block_with_mask_and_structured_outputs():
    module = Block().eval()
    dims = {"x": {0: Dim("batch"), 1: Dim("seq")}, "mask": {0: Dim("batch"), 1: Dim("seq")}}
    compiled = kiln.compile(module, example_inputs=[torch.randn(2, 6, 32), torch.ones(2, 6, dtype=torch.bool)],
                            dynamic_shapes=dims)
    assert compiled.graph.op_counts()["attention"] == 1
    x, mask = torch.randn(3, 9, 32), torch.rand(3, 9) > 0.3
    mask[:, 0] = True
    got, want = compiled(x, mask), module(x, mask)
    assert set(got) == {"hidden", "pooled"}
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)


def test_torch_transformer_encoder_layer():
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True, dropout=0.0)
    compiled = kiln.compile(layer, example_inputs=[torch.randn(2, 7, 32)],
                            dynamic_shapes=({0: Dim("batch"), 1: Dim("seq")},))
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(compiled(x), layer.eval()(x), rtol=1e-5, atol=1e-5)


class Inner(nn.Module):
    def forward(self, x):
        return torch.roll(x, 1, -1)


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()

    def forward(self, x):
        return torch.flip(self.inner(x), [0]) + torch.roll(x, 1, 0)


def test_unsupported_ops_are_reported_together_with_their_modules():
    with pytest.raises(UnsupportedOpsError) as info:
        kiln.compile(Unsupported(), example_inputs=[torch.randn(3, 4)])
    roll = "aten.roll.default"
    assert set(info.value.unsupported) == {roll, "aten.flip.default"}
    assert set(info.value.unsupported[roll]) == {"inner", "<top level>"}
    assert f"{roll} (from <top level>, inner)" in str(info.value)


def test_compile_needs_example_inputs_for_plain_modules():
    with pytest.raises(TypeError, match="needs example_inputs"):
        kiln.compile(MLP())
    with pytest.raises(FrontendError, match="example_inputs must be a sequence of tensors"):
        kiln.compile(MLP(), example_inputs=[[1.0] * 8])
    with pytest.raises(TypeError, match="checkpoint directory or an nn.Module"):
        kiln.compile(42)
