"""Every built-in pass, and the whole cleanup pipeline, preserves what the interpreter
computes on random graphs and random inputs (hypothesis; example counts per profile)."""

import pytest
from hypothesis import given

from kiln.passes import PASSES, PIPELINES, pipeline_manager
from kiln.testing import assert_preserves, graphs_with_inputs


SAME_SIGNATURE = sorted(name for name, p in PASSES.items() if not p.changes_signature)
SAME_SIGNATURE_PIPELINES = sorted(name for name, passes in PIPELINES.items()
                                  if not any(PASSES[p].changes_signature for p in passes))


@pytest.mark.parametrize("name", SAME_SIGNATURE)
@given(case=graphs_with_inputs())
def test_pass_preserves_semantics(name, case):
    graph, inputs = case
    assert_preserves(PASSES[name], graph, inputs)


@pytest.mark.parametrize("name", SAME_SIGNATURE_PIPELINES)
@given(case=graphs_with_inputs(max_steps=16))
def test_pipeline_preserves_semantics(name, case):
    graph, inputs = case
    result = assert_preserves(pipeline_manager(name, debug=True).run, graph, inputs)
    assert len(result.nodes) <= len(graph.nodes)


@given(case=graphs_with_inputs())
def test_cleanup_reaches_a_fixpoint(case):
    graph, _ = case
    manager = pipeline_manager("cleanup")
    manager.run(graph)
    text = str(graph)
    assert sum(r.changes for r in manager.run(graph)) == 0
    assert str(graph) == text
