"""Moving a per-channel scale from a linear layer's weights to its input, exactly:
``x @ W.T == (x / s) @ (W * s).T``. AWQ and SmoothQuant pick ``s``; this module puts
``1 / s`` where it costs nothing at run time:

- into the norm that makes the input (``rms_norm``'s weight; ``layer_norm``'s weight and
  bias), when the norm's output goes to the scaled layers only;
- into the rows of the linear layer that makes one factor of an elementwise product
  (``mul(silu(gate), up)`` feeding ``down_proj``: the ``up`` projection's rows), when
  that layer's output goes to the product only;
- otherwise into an explicit ``mul`` by ``1 / s`` before the layers (the attention
  output feeding ``o_proj``, where grouped heads rule out folding into ``v_proj``).

The layers' own weights are multiplied by ``s`` by the caller, as it quantizes them.
"""

from __future__ import annotations

import torch

from ...ir import Graph, Node, Value
from .activations import LinearGroup

NORMS = {"rms_norm": (1,), "layer_norm": (1, 2)}  # op -> the operands scaled with its output


def fold_input_scale(graph: Graph, group: LinearGroup, scale: torch.Tensor) -> str:
    """Divide ``group``'s input by ``scale`` (float ``[in]``); return where the division
    went: ``"norm"``, ``"linear"`` or ``"mul"``."""
    x, layers = group.input, {id(n) for n in group.layers}
    producer = x.producer
    if producer is not None and all(id(use.node) in layers for use in x.uses) and x not in graph.outputs:
        if producer.op in NORMS and len(producer.inputs) > 1 and producer.inputs[1] is not None \
                and all(_owned_constant(producer, i) for i in NORMS[producer.op]):
            for index in NORMS[producer.op]:
                _rescale_operand(graph, producer, index, lambda t: t / scale)
            return "norm"
        previous = _scalable_factor(graph, producer)
        if previous is not None:
            _rescale_operand(graph, previous, 1, lambda t: t / scale[:, None])
            if len(previous.inputs) > 2 and previous.inputs[2] is not None:
                _rescale_operand(graph, previous, 2, lambda t: t / scale)
            return "linear"
    inverse = graph.add_constant((1 / scale).to(x.dtype.torch_dtype), name=f"{_base(group)}.input_scale")
    with graph.inserting_before(group.layers[0]):
        scaled = graph.call("mul", [x, inverse], location=group.layers[0].location).result
    for node in group.layers:
        node.set_input(0, scaled)
    group.input = scaled
    return "mul"


def _base(group: LinearGroup) -> str:
    return group.layers[0].inputs[1].name.removesuffix(".weight")


def _owned_constant(node: Node, index: int) -> bool:
    """Operand ``index`` of ``node`` is a constant that ``node`` alone reads (absent counts)."""
    value = node.inputs[index] if index < len(node.inputs) else None
    return value is None or (value.is_constant and value.users == [node] and value not in node.graph.outputs)


def _scalable_factor(graph: Graph, product: Node) -> Node | None:
    """The linear layer over a constant weight that makes one factor of ``product`` (a
    ``mul`` of two values of its shape) and nothing else, if there is one."""
    if product.op != "mul" or any(v is None or v.shape != product.result.shape for v in product.inputs):
        return None
    for factor in product.inputs:
        node = factor.producer
        if node is not None and node.op == "linear" and node.inputs[1].is_constant and factor.users == [product] \
                and factor not in graph.outputs and all(_owned_constant(node, i) for i in (1, 2)):
            return node
    return None


def _rescale_operand(graph: Graph, node: Node, index: int, change) -> Value | None:
    """Give ``node`` a new constant for operand ``index``: ``change`` of the old one, in its dtype."""
    old = node.inputs[index] if index < len(node.inputs) else None
    if old is None:
        return None
    new = graph.add_constant(change(old.tensor().detach().float()).to(old.dtype.torch_dtype), old.type, old.name)
    node.set_input(index, new)
    return new
