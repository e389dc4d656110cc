"""Ops that a backend refuses at build, with the reason, before any kernel is chosen.

The reference backend runs every registered op. The CUDA backend runs the others through
torch where it has no kernel of its own, which is right for views and gathers but not for
an attention whose reference kernel reads sizes back to the host (no CUDA graph could
capture it): those are refused here, by name, so that ``kiln.compile(target="h100")``
fails at build rather than serving slowly or not at all. (TensorRT and ONNX refuse what
their lowering tables lack in the same spirit: ``backends/tensorrt/table.py``,
``backends/onnx/table.py``.)
"""

from __future__ import annotations

from ..ir import Graph

REFUSED: dict[str, dict[str, str]] = {
    "cuda": {
        "paged_mla_attention": "multi-head latent attention (DeepSeek-V2/V3) has no CUDA kernel yet; "
                               "build for target='cpu' to serve it with the reference backend",
        "mla_attention": "multi-head latent attention (DeepSeek-V2/V3) has no CUDA kernel yet; "
                         "build for target='cpu' to serve it with the reference backend",
    },
}


class BackendSupportError(ValueError):
    """A graph holds ops that the chosen backend cannot run; names each with its reason."""


def check_backend_support(graph: Graph, backend: str) -> None:
    """Raise ``BackendSupportError`` naming every op of ``graph`` that ``backend`` refuses
    (each op once, with the first place it occurs)."""
    refused = REFUSED.get(backend, {})
    found: dict[str, str] = {}
    for node in graph.nodes:
        if node.op in refused and node.op not in found:
            found[node.op] = node.location or "<top level>"
    if found:
        lines = "\n".join(f"  - {op} (at {where}): {refused[op]}" for op, where in found.items())
        raise BackendSupportError(f"the {backend} backend cannot build graph @{graph.name}:\n{lines}")
