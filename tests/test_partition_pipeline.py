"""Pipeline parallelism: the cost model's cuts balance the stages, the stages run in
order give the graph's outputs (the bundled model alone and over tensor-parallel ranks,
random graphs with planted blocks exactly), and the schedule of micro-batches gives the
textbook bubble."""

import itertools

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_partition import PLANTED

from kiln.ir import interpret
from kiln.passes import PartitionError, eliminate_dead_code
from kiln.passes.partition_pipeline import _balanced_cuts, pipeline_schedule, run_stages, split_pipeline
from kiln.runtime.batch import SequenceStep, step_inputs
from kiln.testing import graphs, inputs


def _feed(graph):
    ids = torch.randint(0, 2048, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    caches = {v.name: torch.zeros((1, 16, *v.shape[2:])) for v in graph.inputs if "cache" in v.name}
    return {**step_inputs([SequenceStep(ids, 0, [0])], 16, all_logits=True), **caches}


@pytest.mark.parametrize("pp, layers", [(2, [2, 2]), (3, [2, 1, 1]), (4, [1, 2, 1, 0])])
def test_stages_balance_the_cost_and_compute_the_whole_graph(bundled_engine, pp, layers):
    graph = bundled_engine.graph
    feed = _feed(graph)
    split = split_pipeline(graph, pp)
    assert [s.op_counts().get("paged_attention", 0) for s in split.stages] == layers  # the LM head weighs a layer
    assert max(split.seconds) <= 1.2 * sum(split.seconds) / pp
    for got, want in zip(run_stages(split, feed), interpret(graph, feed)):
        assert torch.equal(got, want)


def test_tensor_and_pipeline_parallel_together(bundled_engine, bundled_tp2_engine):
    tp2 = bundled_tp2_engine.graph
    feed = _feed(bundled_engine.graph)
    want = interpret(bundled_engine.graph, feed)[0]
    got = run_stages(split_pipeline(tp2, 2), {**feed, **_feed(tp2)}, tp=2)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_more_stages_than_places_to_cut_is_refused(bundled_engine):
    with pytest.raises(PartitionError, match="places to cut between its layers; 500 stages need 499"):
        split_pipeline(bundled_engine.graph, 500)


@given(st.lists(st.floats(0, 10), min_size=3, max_size=9), st.data())
def test_the_cuts_minimize_the_costliest_stage(costs, data):
    candidates = sorted(data.draw(st.sets(st.integers(1, len(costs) - 1), min_size=1)))
    pp = data.draw(st.integers(2, len(candidates) + 1))
    cuts = _balanced_cuts(costs, candidates, pp)

    def worst(chosen):
        bounds = [0, *chosen, len(costs)]
        return max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))

    assert len(cuts) == pp - 1 and set(cuts) <= set(candidates)
    assert worst(cuts) == pytest.approx(min(worst(c) for c in itertools.combinations(candidates, pp - 1)))


@given(st.integers(1, 8), st.integers(1, 16))
def test_equal_stages_idle_the_textbook_bubble(stages, microbatches):
    makespan, bubble = pipeline_schedule([1.0] * stages, microbatches)
    assert makespan == pytest.approx((microbatches + stages - 1) / microbatches)
    assert bubble == pytest.approx((stages - 1) / (microbatches + stages - 1))


@settings(max_examples=60)  # most drawn graphs are too small to cut: each example costs a few draws
@given(st.data(), st.sampled_from([2, 3]))
def test_stages_preserve_random_graphs_with_planted_blocks(data, pp):
    graph = data.draw(graphs(max_steps=8, extra_generators=PLANTED))
    feed = dict(zip((v.name for v in graph.inputs), data.draw(inputs(graph))))
    eliminate_dead_code(graph)
    try:
        split = split_pipeline(graph, pp)
    except PartitionError:
        assume(False)  # too few places to cut
    for got, want in zip(run_stages(split, feed), interpret(graph, feed)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # the same ops on the same values
