"""What each backend cannot build yet, checked before an engine is built.

A backend's kernel table covers ops, and the CUDA backend runs the ops it has no kernel
of its own for through torch, which is right for views and gathers but not for an
attention whose reference reads sizes back to the host (no CUDA graph could capture it).
Such ops are refused here by name (none is now: multi-head latent attention, the last,
has its kernels in ``cuda/mla_attention.py``); so are attributes that ask a kernel for
something it does not implement (none is now either: the CUDA attention kernels serve ALiBi's
biases, Llama 4's chunked attention and its input-weighed experts). Each refusal names the
op, where it occurs and the reason, so that ``kiln.compile(target="h100")`` fails at build
rather than at the first step. (TensorRT and ONNX refuse what their lowering
tables lack in the same spirit: ``backends/tensorrt/table.py``, ``backends/onnx/table.py``.)
"""

from __future__ import annotations

from ..ir import Graph

# backend -> op -> why it is refused
REFUSED_OPS: dict[str, dict[str, str]] = {}

# backend -> op -> attribute -> the feature a set value (not None, not False) asks for, as users know it
REFUSED_ATTRIBUTES: dict[str, dict[str, dict[str, str]]] = {}


class BackendSupportError(ValueError):
    """A graph holds ops (or op attributes) that the chosen backend cannot run."""


def check_backend_support(graph: Graph, backend: str, target: str) -> None:
    """Raise ``BackendSupportError`` naming everything in ``graph`` that ``backend``
    refuses: each op once, at the first place it occurs, with its reason."""
    ops, attributes = REFUSED_OPS.get(backend, {}), REFUSED_ATTRIBUTES.get(backend, {})
    found: dict[str, str] = {}
    for node in graph.nodes:
        where = node.location or "<top level>"
        if node.op in ops:
            found.setdefault(node.op, f"{node.op} (at {where}): {ops[node.op]}")
        for attr, feature in attributes.get(node.op, {}).items():
            if node.attrs.get(attr) not in (None, False):
                found.setdefault(f"{node.op}.{attr}",
                                 f"{node.op} (at {where}, {attr}={node.attrs[attr]}): {feature}")
    if found:
        lines = "\n".join(f"  - {problem}" for problem in found.values())
        raise BackendSupportError(f"target {target!r} cannot build graph @{graph.name}: the {backend} backend "
                                  f"refuses\n{lines}\ntarget 'cpu' serves it with the reference backend")
