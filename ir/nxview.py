"""Graph algorithms through networkx: a dataflow view, stable topological order, DOT text."""

from __future__ import annotations

import json

import networkx as nx

from .graph import Graph, Node
from .printer import Namer, format_attr, format_type


def to_networkx(graph: Graph) -> nx.MultiDiGraph:
    """A dataflow multigraph: one vertex per node (keyed by its index in ``graph.nodes``)
    and per input or constant (keyed by its printed name); an edge per operand use."""
    name = Namer(graph)
    g = nx.MultiDiGraph(name=graph.name)
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    for value in [*graph.inputs, *graph.constants.values()]:
        g.add_node(name(value), kind="constant" if value.is_constant else "input", type=format_type(value))
    for i, node in enumerate(graph.nodes):
        g.add_node(i, kind="node", op=node.op, node=node)
        for operand, value in enumerate(node.inputs):
            if value is None:
                continue
            source = index[id(value.producer)] if value.producer is not None else name(value)
            g.add_edge(source, i, operand=operand, value=name(value), type=format_type(value))
    return g


def topological_order(graph: Graph) -> list[Node]:
    """The nodes in an order where every operand comes first, as close as possible to
    their current order (ties broken by current position)."""
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    g = nx.DiGraph()
    g.add_nodes_from(range(len(graph.nodes)))
    for i, node in enumerate(graph.nodes):
        for value in node.inputs:
            if value is not None and value.producer is not None and id(value.producer) in position:
                g.add_edge(position[id(value.producer)], i)
    if not nx.is_directed_acyclic_graph(g):
        raise ValueError(f"graph @{graph.name} has a cycle")
    return [graph.nodes[i] for i in nx.lexicographical_topological_sort(g)]


def to_dot(graph: Graph) -> str:
    """Graphviz DOT text of the dataflow, for pictures (``dot -Tsvg``)."""
    g = to_networkx(graph)
    lines = [f"digraph {json.dumps(graph.name)} {{", "  node [fontname=monospace];"]
    for key, data in g.nodes(data=True):
        if data["kind"] == "node":
            node = data["node"]
            attrs = ", ".join(f"{k}={format_attr(v)}" for k, v in node.attrs.items())
            label = node.op + (f"\n{attrs}" if attrs else "")
            lines.append(f"  n{key} [shape=box, label={json.dumps(label)}];")
        else:
            shape = "ellipse" if data["kind"] == "input" else "note"
            label = f"{key}: {data['type']}"
            lines.append(f"  {json.dumps(str(key))} [shape={shape}, label={json.dumps(label)}];")
    for source, target, data in g.edges(data=True):
        src = f"n{source}" if isinstance(source, int) else json.dumps(str(source))
        lines.append(f"  {src} -> n{target} [label={json.dumps(data['type'])}];")
    name = Namer(graph)
    for i, value in enumerate(graph.outputs):
        lines.append(f"  out{i} [shape=ellipse, label={json.dumps('return ' + name(value))}];")
        src = f"n{graph.nodes.index(value.producer)}" if value.producer is not None else json.dumps(name(value))
        lines.append(f"  {src} -> out{i};")
    lines.append("}")
    return "\n".join(lines) + "\n"
