"""Calibration: running the quantized graph on sample text to fix what the weights alone
cannot, here the static per-tensor input scales of FP8 layers.

``calibrate_fp8_inputs`` runs the graph with the interpreter on batches of token ids,
records each ``linear_fp8`` input's absolute maximum over all of them, and gives the layer
the static ``input_scale`` that maps it onto E4M3's largest value (TensorRT-LLM's and
ModelOpt's max calibration). The default text is the documentation that ships with
Python (``pydoc_data``), the corpus the bundled model was trained on; its held-out topics
(every 20th, the accuracy measurement's text) are left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tqdm import tqdm

from ...ir import Graph, Node, Value, dtypes, interpret
from ...ir.opdefs.quantized import FP8_MAX

_TINY = 1e-12


def default_corpus(count: int = 64) -> list[str]:
    """``count`` documentation topics that ship with Python, held-out ones excluded."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held_out = set(names[::20])
    return [topics[n] for n in names if n not in held_out][:count]


def _static_candidates(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if n.op == "linear_fp8" and (len(n.inputs) < 4 or n.inputs[3] is None)]


def input_absmax(graph: Graph, values: Sequence[Value], batches: Iterable[torch.Tensor]) -> list[float]:
    """The absolute maximum of each of ``values`` over runs of ``graph`` on ``batches``."""
    outputs = graph.outputs
    graph.outputs = list(values)
    amax = [0.0] * len(values)
    try:
        constants = {name: v.tensor() for name, v in graph.constants.items() if v.uses or v in graph.outputs}
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibrating", unit="text", disable=None, leave=False):
                for i, x in enumerate(interpret(graph, [batch], constants=constants)):
                    amax[i] = max(amax[i], x.abs().max().item())
    finally:
        graph.outputs = outputs
    return amax


def calibrate_fp8_inputs(graph: Graph, batches: Iterable[torch.Tensor]) -> int:
    """Give every ``linear_fp8`` without a static input scale the scale that its inputs'
    absolute maximum over ``batches`` calls for (layers that read one value share one
    scale, so that they still fuse); return how many layers got one."""
    nodes = _static_candidates(graph)
    if not nodes:
        return 0
    inputs_read = list({id(n.inputs[0]): n.inputs[0] for n in nodes}.values())
    scales = {id(value): graph.scalar(max(amax / FP8_MAX, _TINY), dtypes.float32)
              for value, amax in zip(inputs_read, input_absmax(graph, inputs_read, batches))}
    for node in nodes:
        inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
        inputs[3] = scales[id(node.inputs[0])]
        with graph.inserting_before(node):
            new = graph.call("linear_fp8", inputs, location=node.location)
        node.result.replace_all_uses_with(new.result)
        graph.erase_node(node)
    return len(nodes)
