"""Activation memory planned by liveness, as TensorRT plans its workspace: walking the
final graph in execution order, each result is live from its node to its last use (the
executor frees it there), and the workspace a profile needs is the peak of the live
bytes with every dynamic dim at the profile's maximum.

Results that alias an operand (the caches that ``paged_attention`` updates in place) and
results nothing reads are not counted; views are counted as copies, so the figure is an
upper bound. The runtime
keeps that much device memory free when it sizes the KV cache.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..ir import Graph, sym
from ..ir.shapes import evaluate_shape
from .profiles import ProfilePlan

# op -> the results that are its operands updated in place
IN_PLACE = {"paged_attention": (1, 2), "paged_mla_attention": (1,)}


def peak_activation_bytes(graph: Graph, dims: Mapping[str, int]) -> int:
    """The most bytes of intermediate values live at once when ``graph`` runs with its
    dynamic dims bound to ``dims``."""
    env = {sym(name): value for name, value in dims.items()}
    outputs = {id(v) for v in graph.outputs}
    last_use = {id(v): i for i, node in enumerate(graph.nodes) for v in node.inputs if v is not None}
    sizes: dict[int, int] = {}
    live = peak = 0
    for index, node in enumerate(graph.nodes):
        aliases = IN_PLACE.get(node.op, ())
        for position, result in enumerate(node.results):
            if position not in aliases and (result.uses or id(result) in outputs):
                shape = evaluate_shape(result.shape, env)
                count = 1
                for d in shape:
                    count *= d
                sizes[id(result)] = count * result.dtype.bits // 8
                live += sizes[id(result)]
        peak = max(peak, live)
        for value in {id(v): v for v in node.inputs if v is not None}.values():
            if last_use[id(value)] == index and id(value) not in outputs:
                live -= sizes.pop(id(value), 0)
    return peak


def plan_workspace(graph: Graph, plan: ProfilePlan) -> dict[str, int]:
    """Workspace bytes of each profile of ``plan`` (its dims at their maximum)."""
    return {profile.name: peak_activation_bytes(graph, {d: r.max for d, r in profile.dims.items()})
            for profile in plan.profiles}
