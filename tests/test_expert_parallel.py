"""Expert parallelism: mixture-of-experts layers with their experts split across the ranks
keep every graph's results in the simulated multi-rank interpreter (random graphs with
planted routed MLPs, Mixtral and Qwen2-MoE), hold 1/ranks of the experts on
each rank, and give one rank's greedy tokens on two gloo processes."""

import pytest
import torch
from hf_models import VOCAB, random_model, write_checkpoint
from hypothesis import given
from hypothesis import strategies as st

import kiln
from kiln.frontends.huggingface import import_model
from kiln.ir import interpret, ops, verify
from kiln.passes import PartitionError, eliminate_dead_code, run_pipeline
from kiln.passes.partition import partition_tensor_parallel
from kiln.passes.partition_simulator import simulate_ranks
from kiln.runtime.batch import SequenceStep, step_inputs
from kiln.testing import GraphDraft, graphs, inputs


def _planted_moe(b: GraphDraft):
    """A routed MLP over 4 or 8 experts with its residual add: a raised ``moe`` (softmax, or
    DeepSeek's grouped sigmoid with a correction bias), or ``moe_experts`` fed by a router
    written in primitives."""
    x = b.value(lambda v: v.type.rank == 2 and v.shape[-1] in (4, 8) and v.dtype.is_float)
    if x is None:
        return None
    hidden, experts, inner = x.shape[-1], b.draw(st.sampled_from([4, 8])), b.draw(st.sampled_from([4, 8]))
    top_k = b.draw(st.integers(1, 2))
    logits = ops.linear(x, b.constant((experts, hidden)))
    gate_up, down = b.constant((experts, 2 * inner, hidden)), b.constant((experts, hidden, inner))
    form = b.draw(st.sampled_from(["softmax", "sigmoid", "primitives"]))
    if form == "primitives":
        weights, indices = ops.topk(ops.softmax(logits, dim=-1), k=top_k, dim=-1)
        out = ops.moe_experts(x, weights, indices, gate_up, down, activation="silu")
    elif form == "softmax":
        out = ops.moe(x, logits, gate_up, down, top_k=top_k, normalize=b.draw(st.booleans()), activation="gelu")
    else:
        out = ops.moe(x, logits, gate_up, down, b.constant((experts,)), top_k=top_k, scoring="sigmoid",
                      normalize=True, scale=2.5, num_groups=2, topk_groups=1)
    return x + out


@given(st.data(), st.sampled_from([2, 4]))
def test_expert_parallelism_preserves_random_graphs_with_planted_moe(data, ranks):
    graph = data.draw(graphs(max_steps=6, extra_generators={"planted_moe": _planted_moe}))
    feed = data.draw(inputs(graph))
    want = interpret(graph, feed)
    eliminate_dead_code(graph)
    experts = [n.inputs[3].shape[0] for n in graph.nodes if n.op in ("moe", "moe_experts")]
    partition_tensor_parallel(graph, ranks, expert_parallel=True)
    verify(graph)
    local = [n.inputs[3].shape[0] for n in graph.nodes if n.op == "moe_experts" or n.op == "moe"]
    assert local == [e // ranks if e % ranks == 0 else e for e in experts]  # experts that do not divide stay whole
    for rank, outputs in enumerate(simulate_ranks(graph, ranks, feed)):
        for got, expected in zip(outputs, want):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, equal_nan=True, msg=f"rank {rank}")


def _step_feed(graph, ids):
    blocks = -(-len(ids) // 4)
    caches = {v.name: torch.zeros((blocks, 4, *v.shape[2:])) for v in graph.inputs if "cache" in v.name}
    return {**step_inputs([SequenceStep(ids, 0, list(range(blocks)))], 4, all_logits=True), **caches}


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe", "llama4"])
def test_moe_architectures_split_their_experts_over_2_and_4_ranks(name):
    model = random_model(name)
    imported = import_model(model)
    ids = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    experts = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    for ranks in (2, 4):
        graph = imported.graph.clone()
        run_pipeline("reference", graph, ranks, ep=ranks)
        local = [n.inputs[3].shape[0] for n in graph.nodes if n.op == "moe_experts"]
        assert local and set(local) == {experts // ranks}, f"{name}: {local}"
        for rank, outputs in enumerate(simulate_ranks(graph, ranks, _step_feed(graph, ids))):
            diff = (outputs[0] - want).abs().max().item()
            assert diff <= 1e-4, f"{name}, {ranks} ranks, rank {rank}: max abs diff {diff:.2e}"


def test_experts_that_do_not_divide_are_refused():
    graph = import_model(random_model("mixtral")).graph  # 4 experts
    with pytest.raises(PartitionError, match="4 experts do not split among 3 ranks"):
        run_pipeline("reference", graph, 3, ep=3)
    with pytest.raises(ValueError, match="ep must be 1 or tp"):
        run_pipeline("reference", graph, 2, ep=4)


def test_two_gloo_ranks_generate_what_one_does(tmp_path):
    model = random_model("mixtral")
    checkpoint = write_checkpoint(model, tmp_path / "mixtral")
    prompts = [[5, 9, 200, 31, 7], [1000, 3, 77]]
    params = kiln.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in kiln.LLM(kiln.compile(checkpoint, dtype="float32", max_seq_len=64))
            .generate(prompts, params)]
    engine = kiln.compile(checkpoint, dtype="float32", max_seq_len=64, tp=2, ep=2)
    assert {n.inputs[3].shape[0] for n in engine.graph.nodes if n.op == "moe_experts"} == {2}
    engine.save(tmp_path / "mixtral-ep2.kiln")
    llm = kiln.LLM(str(tmp_path / "mixtral-ep2.kiln"))
    try:
        assert [o.token_ids for o in llm.generate(prompts, params)] == want
    finally:
        llm.close()
