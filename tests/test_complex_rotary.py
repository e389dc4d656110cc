"""Complex tensors imported as real pairs (``frontends/complex.py``), and rotary embedding
written as complex multiplication (DeepSeek-V2's, Llama 4's) raised into kiln's interleaved
``rotary`` (``passes/complex_rotary.py``). DeepSeek-V2's and Llama 4's logits and greedy tokens
against transformers are in test_frontend_hf.py, with every architecture's."""

import pytest
import torch
from torch import nn
from torch.export import Dim

from kiln.frontends import UnsupportedOpsError, import_program
from kiln.ir import interpret
from kiln.passes import COMPLEX_ROTARY_RULES, pipeline_manager, raise_ops, rewrite
from kiln.testing import assert_preserves, graph_from_text, random_inputs


class ComplexRotary(nn.Module):
    """DeepSeek-V2's rotary: ``x`` as complex pairs times ``polar(scale, angle)``."""

    def __init__(self, rope: int = 8, scale: float = 0.75):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, rope, 2).float() / rope)))
        self.scale = scale

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        freqs = positions[..., None].float() * self.inv_freq
        cis = torch.polar(torch.ones_like(freqs), freqs) * self.scale
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * cis.unsqueeze(1)).flatten(3).type_as(x)


class ComplexMagnitude(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)).abs()


def _inputs(batch: int, seq: int):
    generator = torch.Generator().manual_seed(batch * 100 + seq)
    x = torch.randn(batch, 3, seq, 8, generator=generator)
    positions = torch.arange(seq).expand(batch, seq) + torch.randint(0, 50, (batch, 1), generator=generator)
    return x, positions


def _imported(module: nn.Module):
    batch, seq = Dim("batch", max=16), Dim("seq", max=64)
    program = torch.export.export(module, _inputs(2, 5), dynamic_shapes=({0: batch, 2: seq}, {0: batch, 1: seq}))
    return import_program(program, input_dims=[{0: "batch", 2: "seq"}, {0: "batch", 1: "seq"}])


def test_complex_ops_import_as_real_pairs():
    module = ComplexRotary()
    graph = _imported(module)
    for batch, seq in ((3, 7), (1, 1)):  # neither is the traced shape
        x, positions = _inputs(batch, seq)
        torch.testing.assert_close(interpret(graph, [x, positions])[0], module(x, positions), atol=1e-6, rtol=1e-6)


def test_complex_rotation_is_raised_into_interleaved_rotary():
    module = ComplexRotary()
    graph = _imported(module)
    pipeline_manager("cleanup").run(graph)
    assert rewrite(graph, COMPLEX_ROTARY_RULES) == {"raise_complex_rotary": 1}
    pipeline_manager("cleanup").run(graph)
    (rotary,) = [n for n in graph.nodes if n.op == "rotary"]
    assert rotary.attrs["interleaved"] and rotary.results[0].shape[-1] == 8
    assert not {"sub", "squeeze"} & set(graph.op_counts())
    for batch, seq in ((3, 7), (2, 1)):
        x, positions = _inputs(batch, seq)
        torch.testing.assert_close(interpret(graph, [x, positions])[0], module(x, positions), atol=1e-6, rtol=1e-6)


PRODUCT_OF_PAIRS = """
    graph @g(%x: f32[t, 4, 2], %c: f32[t, {n}], %s: f32[t, {n}]) {{
      %a = slice(%x) {{dim = 2, end = 1}} : f32[t, 4, 1]
      %re = squeeze(%a) {{dim = 2}} : f32[t, 4]
      %b = slice(%x) {{dim = 2, start = 1, end = 2}} : f32[t, 4, 1]
      %im = squeeze(%b) {{dim = 2}} : f32[t, 4]
      %rc = mul(%re, %c) : f32[t, 4]
      %is = mul(%im, %s) : f32[t, 4]
      %r = {real}(%rc, %is) : f32[t, 4]
      %rs = mul(%re, %s) : f32[t, 4]
      %ic = mul(%im, %c) : f32[t, 4]
      %i = add(%rs, %ic) : f32[t, 4]
      %ur = unsqueeze(%r) {{dim = 2}} : f32[t, 4, 1]
      %ui = unsqueeze(%i) {{dim = 2}} : f32[t, 4, 1]
      %out = concat(%ur, %ui) {{dim = 2}} : f32[t, 4, 2]
      return %out
    }}
    """


@pytest.mark.parametrize("table, real, raised", [
    (4, "sub", 1),  # a rotation by one angle per pair: rotary's tables
    (4, "add", 0),  # (re c + im s, ...): the product with the conjugate's transpose, not a rotation
    (1, "sub", 0),  # one angle for every pair ([..., 1]): a rotation too, but not rotary's table layout
])
def test_only_a_rotation_with_an_angle_per_pair_is_raised(table, real, raised):
    graph = graph_from_text(PRODUCT_OF_PAIRS.format(n=table, real=real))
    assert sum(rewrite(graph.clone(), COMPLEX_ROTARY_RULES).values()) == raised
    for batch in (1, 3):
        result = assert_preserves(raise_ops, graph, random_inputs(graph, batch))
    assert result.op_counts().get("rotary", 0) == raised


def test_a_complex_op_without_a_mapping_is_named():
    program = torch.export.export(ComplexMagnitude(), (torch.randn(2, 8),))
    with pytest.raises(UnsupportedOpsError, match=r"aten.abs.default \(on complex tensors\)"):
        import_program(program)
