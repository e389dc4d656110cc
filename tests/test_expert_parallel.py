"""Expert parallelism: mixture-of-experts layers with their experts split across the ranks
keep every graph's results in the simulated multi-rank interpreter (random graphs with
planted routed MLPs, Mixtral and Qwen2-MoE), hold 1/ranks of the experts on
each rank, and give one rank's greedy tokens on two gloo processes; with either dispatch
of the tokens: one all-reduce of every rank's partial sums (the default), or each rank's
share of the tokens sent to the experts' ranks and back (``expert_dispatch="all_to_all"``)."""

import threading

import pytest
import torch
from hf_models import VOCAB, random_model, write_checkpoint
from hypothesis import given
from hypothesis import strategies as st

import kiln
from kiln.frontends.huggingface import import_model
from kiln.ir import REGISTRY, Graph, TensorType, interpret, ops, sym, verify
from kiln.ir.shapes import product
from kiln.passes import PartitionError, eliminate_dead_code, run_pipeline
from kiln.passes.partition import partition_tensor_parallel
from kiln.ir.opdefs.moe import moe_experts_reference, route
from kiln.ir.opdefs.moe_all_to_all import exchange_moe
from kiln.passes.partition_simulator import SimulatedExchange, SimulatedGroup, simulate_ranks
from kiln.runtime.batch import SequenceStep, step_inputs
from kiln.testing import GraphDraft, graphs, inputs


def _planted_moe(b: GraphDraft):
    """A routed MLP over 4 or 8 experts with its residual add: a raised ``moe`` (softmax, or
    DeepSeek's grouped sigmoid with a correction bias), or ``moe_experts`` fed by a router
    written in primitives."""
    x = b.value(lambda v: v.type.rank == 2 and v.shape[-1] in (4, 8) and v.dtype.is_float)
    if x is None:  # tokens from any value: its rows, projected to 4 or 8 features
        v = b.value(lambda v: v.type.rank >= 1 and isinstance(v.shape[-1], int))
        if v is None:
            return None
        rows = ops.reshape(v, shape=[product(v.shape[:-1]), v.shape[-1]])
        x = ops.linear(rows, b.constant((b.draw(st.sampled_from([4, 8])), v.shape[-1])))
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


# the ops drawn around the planted mixtures of experts (the built-in ones among them included)
AROUND = ("unary", "binary", "linear", "norm", "movement", "reduce", "attention", "collective", "moe", "moe_route",
          "moe_all_to_all")
EXPERT_OPS = ("moe", "moe_experts", "moe_all_to_all", "moe_experts_all_to_all")
# what each dispatch makes of a mixture of experts whose experts split among the ranks
SPLIT_AS = {"all_reduce": {"moe": "moe_experts", "moe_experts": "moe_experts"},
            "all_to_all": {"moe": "moe_all_to_all", "moe_experts": "moe_experts_all_to_all"}}


def _check_random_graph(data, ranks: int, dispatch: str) -> None:
    graph = data.draw(graphs(max_steps=6, generators=AROUND, extra_generators={"planted_moe": _planted_moe}))
    feed = data.draw(inputs(graph))  # any token count, fewer than the ranks too
    want = interpret(graph, feed)
    eliminate_dead_code(graph)
    before = [(n.op, n.inputs[3].shape[0]) for n in graph.nodes if n.op in EXPERT_OPS]
    partition_tensor_parallel(graph, ranks, expert_parallel=True, expert_dispatch=dispatch)
    verify(graph)
    split = SPLIT_AS[dispatch]
    assert [(n.op, n.inputs[3].shape[0]) for n in graph.nodes if n.op in EXPERT_OPS] == \
        [(split[op], e // ranks) if op in split and e % ranks == 0 else (op, e) for op, e in before]
    for rank, outputs in enumerate(simulate_ranks(graph, ranks, feed)):
        for got, expected in zip(outputs, want):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, equal_nan=True, msg=f"rank {rank}")


@given(st.data(), st.sampled_from([2, 4]))
def test_expert_parallelism_preserves_random_graphs_with_planted_moe(data, ranks):
    _check_random_graph(data, ranks, "all_reduce")


@given(st.data(), st.sampled_from([2, 4]))
def test_all_to_all_dispatch_preserves_random_graphs_with_planted_moe(data, ranks):
    _check_random_graph(data, ranks, "all_to_all")


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("router", ["softmax", "sigmoid", "primitives"])
def test_all_to_all_dispatch_takes_any_token_count(ranks, router):
    """One token (a decode step of one sequence), fewer tokens than ranks, and counts the
    ranks do not divide: the shares differ or are empty, and every rank still gets moe's result."""
    graph = Graph("routed_mlp")
    x = graph.add_input("x", TensorType("f32", (sym("num_tokens"), 8)))
    gen = torch.Generator().manual_seed(ranks)
    weight = lambda *shape: graph.add_constant(torch.randn(shape, generator=gen), name="w")  # noqa: E731
    logits = ops.linear(x, weight(8, 8))
    if router == "primitives":
        scores, indices = ops.topk(ops.softmax(logits, dim=-1), k=2, dim=-1)
        out = ops.moe_experts(x, scores, indices, weight(8, 8, 8), weight(8, 8, 4), activation="silu")
    else:
        out = ops.moe(x, logits, weight(8, 8, 8), weight(8, 8, 4), weight(8) if router == "sigmoid" else None,
                      top_k=2, scoring=router, normalize=True, num_groups=2 if router == "sigmoid" else 1,
                      topk_groups=1)
    graph.set_outputs([out])
    whole = graph.clone()
    partition_tensor_parallel(graph, ranks, strict=True, expert_parallel=True, expert_dispatch="all_to_all")
    counts = graph.op_counts()
    assert counts.get("moe_all_to_all", 0) + counts.get("moe_experts_all_to_all", 0) == 1
    assert "all_reduce" not in counts  # the router's logits are computed whole, not gathered, where moe routes
    assert "all_gather" not in counts if router != "primitives" else counts["all_gather"] == 1
    for tokens in (1, ranks - 1, ranks + 1, 3 * ranks):
        feed = [torch.randn(tokens, 8, generator=gen)]
        want = interpret(whole, feed)[0]
        for rank, (got,) in enumerate(simulate_ranks(graph, ranks, feed)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{tokens} tokens, rank {rank}")


def test_each_rank_runs_only_the_choices_of_its_experts():
    """The all-to-all form moves work, not just results: rank r's experts get exactly the
    (token, choice) pairs routed to them, from every rank's share, and the output is moe's."""
    ranks, experts, tokens = 2, 4, 5
    per = experts // ranks
    gen = torch.Generator().manual_seed(0)
    x, logits = torch.randn(tokens, 8, generator=gen), torch.randn(tokens, experts, generator=gen)
    gate_up, down = torch.randn(experts, 8, 8, generator=gen), torch.randn(experts, 8, 4, generator=gen)
    routing = dict(top_k=2, scoring="softmax", normalize=True, scale=1.0, num_groups=1, topk_groups=1, jitter_eps=0.0)
    group, ran, outputs = SimulatedGroup(ranks), [None] * ranks, [None] * ranks

    def run(rank: int) -> None:
        def experts_of_rank(rows, weights, indices, *args, **attrs):
            ran[rank] = sorted(indices.reshape(-1).tolist())
            return moe_experts_reference(rows, weights, indices, *args, **attrs)

        outputs[rank] = exchange_moe(SimulatedExchange(group, rank), x, logits, gate_up[rank * per:(rank + 1) * per],
                                     down[rank * per:(rank + 1) * per], None, **routing, activation="silu",
                                     weigh_inputs=False, ranks=ranks, group="tp", experts=experts_of_rank)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(ranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    chosen = route(logits, None, **routing)[1].reshape(-1).tolist()
    assert ran == [sorted(e - r * per for e in chosen if e // per == r) for r in range(ranks)]
    want = REGISTRY["moe"].reference(x, logits, gate_up, down, None, **routing, activation="silu", weigh_inputs=False)
    for out in outputs:
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def _step_feed(graph, ids):
    blocks = -(-len(ids) // 4)
    caches = {v.name: torch.zeros((blocks, 4, *v.shape[2:])) for v in graph.inputs if "cache" in v.name}
    return {**step_inputs([SequenceStep(ids, 0, list(range(blocks)))], 4, all_logits=True), **caches}


@pytest.mark.parametrize("name, dispatch", [("mixtral", "all_reduce"), ("qwen2-moe", "all_reduce"),
                                            ("llama4", "all_reduce"), ("mixtral", "all_to_all"),
                                            ("qwen2-moe", "all_to_all"), ("llama4", "all_to_all")])
def test_moe_architectures_split_their_experts_over_2_and_4_ranks(name, dispatch):
    model = random_model(name)
    imported = import_model(model)
    ids = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(0)).tolist()  # 7 tokens: uneven shares
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    experts = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    for ranks in (2, 4):
        graph = imported.graph.clone()
        run_pipeline("reference", graph, ranks, ep=ranks, expert_dispatch=dispatch)
        local = [n.inputs[3].shape[0] for n in graph.nodes if n.op in EXPERT_OPS]
        assert local and set(local) == {experts // ranks}, f"{name}: {local}"
        assert {n.op for n in graph.nodes if n.op in EXPERT_OPS} == {SPLIT_AS[dispatch]["moe"]}
        for rank, outputs in enumerate(simulate_ranks(graph, ranks, _step_feed(graph, ids))):
            diff = (outputs[0] - want).abs().max().item()
            assert diff <= 1e-4, f"{name}, {ranks} ranks, rank {rank}: max abs diff {diff:.2e}"


def test_experts_that_do_not_divide_are_refused():
    graph = import_model(random_model("mixtral")).graph  # 4 experts
    with pytest.raises(PartitionError, match="4 experts do not split among 3 ranks"):
        run_pipeline("reference", graph, 3, ep=3)
    with pytest.raises(ValueError, match="ep must be 1 or tp"):
        run_pipeline("reference", graph, 2, ep=4)


def test_bad_expert_dispatch_is_refused(tmp_path):
    graph = import_model(random_model("mixtral")).graph
    with pytest.raises(ValueError, match="expert_dispatch must be one of 'all_reduce', 'all_to_all', got 'alltoall'"):
        run_pipeline("reference", graph, 2, ep=2, expert_dispatch="alltoall")
    with pytest.raises(ValueError, match="expert_dispatch must be one of"):
        partition_tensor_parallel(graph, 2, expert_parallel=True, expert_dispatch="scatter")
    with pytest.raises(ValueError, match="needs expert parallelism .* got ep=1"):
        kiln.compile(tmp_path / "unread", tp=2, expert_dispatch="all_to_all")  # refused before reading the model


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe"])
def test_two_gloo_ranks_exchanging_tokens_generate_what_one_does(tmp_path, name):
    """Over two processes with the all-to-all dispatch: a prefill of 7 tokens (shares of 4
    and 3), decode steps of 2 tokens, then of 1 token (rank 1's share empty)."""
    checkpoint = write_checkpoint(random_model(name), tmp_path / name)
    batches = [[[5, 9, 200, 31, 7], [1000, 3]], [[42, 17, 8]]]
    params = kiln.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    one = kiln.LLM(kiln.compile(checkpoint, dtype="float32", max_seq_len=64))
    want = [[o.token_ids for o in one.generate(prompts, params)] for prompts in batches]
    llm = kiln.LLM(checkpoint, dtype="float32", max_seq_len=64, tp=2, ep=2, expert_dispatch="all_to_all")
    try:
        assert {n.op for n in llm.engine.graph.nodes if n.op in EXPERT_OPS} == {"moe_all_to_all"}
        assert [[o.token_ids for o in llm.generate(prompts, params)] for prompts in batches] == want
    finally:
        llm.close()


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
