"""Names of a graph's outputs in formats that name them (TensorRT networks, ONNX graphs)."""

from __future__ import annotations

from ..ir import Graph


def output_names(graph: Graph) -> list[str]:
    """Each output's own name where it has one that no input or earlier output takes,
    else ``output_<index>``."""
    taken = {v.name for v in graph.inputs}
    names = []
    for index, value in enumerate(graph.outputs):
        name = value.name if value.name and not value.name.isdigit() and value.name not in taken else None
        name = name or f"output_{index}"
        taken.add(name)
        names.append(name)
    return names
