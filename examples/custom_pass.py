"""A new fusion in a few lines: write it, run it in a pipeline, property-test it.

torch.export leaves SiLU as ``x * sigmoid(x)``; this pass makes it one ``silu`` op.
Run it with ``python examples/custom_pass.py``; ``tests/test_examples.py`` runs the
property test below under pytest.
"""

import torch
from hypothesis import given, settings

from kiln.ir import interpret, ops, parse
from kiln.passes import PassManager, Rule, format_records, pipeline, rewrite_pass
from kiln.testing import assert_preserves, bind_random_constants, graphs_with_inputs


# 1. The fusion: a pattern and its replacement, both plain functions over kiln ops.
def decomposed_silu(x):
    return x * ops.sigmoid(x)


def fused_silu(x):
    return ops.silu(x)


fuse_silu = rewrite_pass("fuse_silu", [Rule(decomposed_silu, fused_silu)])

# 2. Run it, followed by the built-in cleanup, on a graph written in kiln's text form.
MLP = """
graph @mlp(%x: f32[batch, 16]) {
  %w1 = constant : f32[32, 16]
  %w2 = constant : f32[16, 32]
  %0 = linear(%x, %w1) : f32[batch, 32]
  %1 = sigmoid(%0) : f32[batch, 32]
  %2 = mul(%1, %0) : f32[batch, 32]
  %3 = linear(%2, %w2) : f32[batch, 16]
  return %3
}
"""


def main() -> None:
    graph = bind_random_constants(parse(MLP))
    x = torch.randn(3, 16)
    before = interpret(graph, [x])[0]
    records = PassManager([fuse_silu, *pipeline("cleanup")], until_stable=True, debug=True).run(graph)
    print(graph)
    print(format_records(records))
    assert torch.allclose(interpret(graph, [x])[0], before, atol=1e-5)


# 3. A property test: plant the pattern into random graphs and check that the pass
#    preserves what the interpreter computes.
def silu_site(draft):
    x = draft.value()
    return x * ops.sigmoid(x)


@settings(max_examples=100, deadline=None)
@given(graphs_with_inputs(extra_generators={"silu_site": silu_site}))
def test_fuse_silu_preserves_semantics(case):
    graph, inputs = case
    assert_preserves(fuse_silu, graph, inputs)


if __name__ == "__main__":
    main()
    test_fuse_silu_preserves_semantics()
    print("property test passed")
