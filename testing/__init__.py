"""Helpers that users import to test their passes (``kiln.testing``): hypothesis
strategies for random graphs and inputs, verifier corruptions, ``assert_preserves``, and
hypothesis profiles (``dev``, and ``ci`` with hundreds of examples per property).

``testing`` imports ``ir`` and ``passes``.
"""

from hypothesis import HealthCheck, settings

from .helpers import assert_preserves, bind_random_constants, graph_from_text, random_inputs
from .corruptions import CORRUPTIONS, corrupted_graphs
from .strategies import GENERATORS, PORTABLE_GENERATORS, GraphDraft, graphs, graphs_with_inputs, inputs


def register_profiles() -> None:
    """Register the ``dev`` (fast) and ``ci`` (thorough, derandomized) hypothesis profiles."""
    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("dev", max_examples=40, **common)
    settings.register_profile("ci", max_examples=300, derandomize=True, print_blob=True, **common)


__all__ = ["CORRUPTIONS", "GENERATORS", "PORTABLE_GENERATORS", "GraphDraft", "assert_preserves", "bind_random_constants", "graph_from_text", "corrupted_graphs", "graphs",
           "graphs_with_inputs", "inputs", "random_inputs", "register_profiles"]
