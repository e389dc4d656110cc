"""Tensor parallelism: the partition pass keeps every graph's results (random graphs with
planted attention and MLP blocks, every verified architecture) when its ranks run in the
simulated multi-rank interpreter, splits what it should, and refuses what it cannot split."""

import os

import pytest
import torch
from hf_models import ARCHITECTURES, BUNDLED, VOCAB, random_model
from hypothesis import given
from hypothesis import strategies as st

import kiln
from kiln.frontends.huggingface import import_model, load_checkpoint
from kiln.ir import Graph, ShardData, TensorData, TensorType, for_rank, interpret, ops, sym, verify
from kiln.ir.opdefs.collective import CollectiveError
from kiln.passes import PartitionError, eliminate_dead_code, run_pipeline
from kiln.passes.partition import partition_tensor_parallel
from kiln.passes.partition_pipeline import run_stages, split_pipeline
from kiln.passes.partition_simulator import simulate_ranks
from kiln.runtime.batch import SequenceStep, step_inputs
from kiln.testing import GraphDraft, graphs, inputs

RANKS = st.sampled_from([2, 4])


def _hidden_input(b: GraphDraft, heads: int, head_dim: int):
    """A [batch, seq, heads * head_dim] value made from a drawn value of rank 2 or 3."""
    x = b.value(lambda v: v.type.rank in (2, 3) and isinstance(v.shape[-1], int))
    if x is None:
        return None
    if x.type.rank == 2:
        x = ops.unsqueeze(x, dim=0)
    return ops.linear(x, b.constant((heads * head_dim, x.shape[-1])))


def _planted_attention(b: GraphDraft):
    """A Llama/Qwen-style attention block: q/k/v projections (biases drawn), heads, rotary,
    grouped-query attention, the output projection and the residual add."""
    heads = b.draw(st.sampled_from([4, 8]))
    kv_heads = b.draw(st.sampled_from([h for h in (1, 2, 4, 8) if heads % h == 0]))
    head_dim = b.draw(st.sampled_from([2, 4]))
    x = _hidden_input(b, heads, head_dim)
    if x is None:
        return None
    bias = b.draw(st.booleans())
    batch, seq, hidden = x.shape
    cos, sin = b.constant((1, head_dim)), b.constant((1, head_dim))

    def project(n):
        y = ops.linear(ops.rms_norm(x, eps=1e-5), b.constant((n * head_dim, hidden)),
                       b.constant((n * head_dim,)) if bias else None)
        return ops.transpose(ops.reshape(y, shape=(batch, seq, n, head_dim)), dim0=1, dim1=2)

    q, k, v = project(heads), project(kv_heads), project(kv_heads)
    q, k = ops.rotary(q, cos, sin), ops.rotary(k, cos, sin)
    out = ops.attention(q, k, v, causal=b.draw(st.booleans()))
    out = ops.reshape(ops.transpose(out, dim0=1, dim1=2), shape=(batch, seq, hidden))
    return x + ops.linear(out, b.constant((hidden, hidden)), b.constant((hidden,)) if bias else None)


def _planted_mlp(b: GraphDraft):
    """A gated (SwiGLU/GeGLU) or plain MLP block with its residual add."""
    x = b.value(lambda v: v.type.rank >= 1 and v.shape[-1] in (4, 8))
    if x is None:
        return None
    hidden, inner = x.shape[-1], b.draw(st.sampled_from([8, 16]))
    act = b.draw(st.sampled_from(["silu", "gelu"]))
    h = ops.layer_norm(x) if b.draw(st.booleans()) else ops.rms_norm(x)
    up = ops.linear(h, b.constant((inner, hidden)))
    if b.draw(st.booleans()):
        up = ops.call(act, ops.linear(h, b.constant((inner, hidden)))) * up
    else:
        up = ops.call(act, up)
    return x + ops.linear(up, b.constant((hidden, inner)), b.constant((hidden,)))


PLANTED = {"planted_attention": _planted_attention, "planted_mlp": _planted_mlp}


def _assert_ranks_match(graph: Graph, want: list[torch.Tensor], ranks: int, feed) -> None:
    for rank, outputs in enumerate(simulate_ranks(graph, ranks, feed)):
        for got, expected in zip(outputs, want):
            assert got.shape == expected.shape, f"rank {rank}"
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, equal_nan=True, msg=f"rank {rank}")


@given(st.data(), RANKS)
def test_partitioning_preserves_random_graphs_with_planted_blocks(data, ranks):
    graph = data.draw(graphs(max_steps=8, extra_generators=PLANTED))
    feed = data.draw(inputs(graph))
    want = interpret(graph, feed)
    eliminate_dead_code(graph)
    heads = [(n.inputs[0].shape[1], n.inputs[1].shape[1]) for n in graph.nodes if n.op == "attention"]
    partition_tensor_parallel(graph, ranks)
    verify(graph)
    splittable = [q % ranks == 0 and (kv % ranks == 0 or ranks % kv == 0) for q, kv in heads]
    local = [n.inputs[0].shape[1] for n in graph.nodes if n.op == "attention"]
    assert local == [q // ranks if ok else q for (q, _), ok in zip(heads, splittable)]
    _assert_ranks_match(graph, want, ranks, feed)


def _step_feed(graph: Graph, ids: list[int]) -> dict[str, torch.Tensor]:
    blocks = -(-len(ids) // 4)
    caches = {v.name: torch.zeros((blocks, 4, *v.shape[2:])) for v in graph.inputs if "cache" in v.name}
    return {**step_inputs([SequenceStep(ids, 0, list(range(blocks)))], 4, all_logits=True), **caches}


# One architecture of each kind the rules must get right: grouped-query heads (replicated
# over 4 ranks), biases and tied embeddings, q/k norms, soft-capping and a scaled
# embedding, shipped fused QKV and gate/up, LayerNorm with learned positions, interleaved
# heads with partial rotary, scaling multipliers. KILN_ALL_ARCHITECTURES=1 runs all of them.
SPLIT_ARCHITECTURES = sorted(ARCHITECTURES) if os.environ.get("KILN_ALL_ARCHITECTURES") else [
    "llama", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "gpt-neox", "granite"]


@pytest.mark.parametrize("name", SPLIT_ARCHITECTURES)
def test_verified_architectures_split_over_2_and_4_ranks_and_2_stages(name):
    model = random_model(name)
    imported = import_model(model)  # the import (torch.export) takes most of the time; partitioning is quick
    ids = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    for ranks in (2, 4):
        graph = imported.graph.clone()
        run_pipeline("reference", graph, ranks)
        attention = [n for n in graph.nodes if n.op == "paged_attention"]
        assert [n.inputs[0].shape[1] for n in attention] == [model.config.num_attention_heads // ranks] * len(attention)
        feed = _step_feed(graph, ids)
        for rank, outputs in enumerate(simulate_ranks(graph, ranks, feed)):
            diff = (outputs[0] - want).abs().max().item()
            assert diff <= 1e-4, f"{name}, {ranks} ranks, rank {rank}: max abs diff {diff:.2e}"
        logits = run_stages(split_pipeline(graph, 2), feed, tp=ranks)[0]  # and in two pipeline stages
        assert (logits - want).abs().max().item() <= 1e-4, f"{name}, {ranks} ranks x 2 stages"


def test_the_bundled_model_over_two_ranks_is_column_then_row_parallel(bundled_tp2_engine):
    graph = bundled_tp2_engine.graph
    counts = graph.op_counts()
    # per layer: the attention's and the MLP's partial sums reduced; the embedding's too; the LM head gathered
    assert (counts["all_reduce"], counts["all_gather"]) == (9, 1)
    assert counts["qkv_rotary"] == counts["gated_activation"] == 4  # fusions fire on the sharded graph
    qkv = next(n for n in graph.nodes if n.op == "qkv_rotary")
    assert (qkv.attrs["q_heads"], qkv.attrs["kv_heads"]) == (3, 1)
    shapes = {name: v.shape for name, v in graph.constants.items()}
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (192, 96)  # row-parallel
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (192, 256)
    assert shapes["model.layers.0.mlp.gate_proj.weight_concat"] == (512, 192)  # column-parallel gate and up
    assert shapes["lm_head.weight"] == (1024, 192)  # vocabulary-parallel, tied to the embedding
    assert graph.inputs[-1].shape[2] == 1  # one key/value head per rank in the cache


def test_an_engine_directory_holds_each_ranks_weights(bundled_tp2_engine, tmp_path):
    engine = bundled_tp2_engine
    engine.save(tmp_path / "e")
    assert {p.name for p in (tmp_path / "e").glob("weights*")} == {"weights.rank0.safetensors",
                                                                  "weights.rank1.safetensors"}
    loaded = [kiln.load(tmp_path / "e", rank=r) for r in (0, 1)]
    for rank, engine_of_rank in enumerate(loaded):
        for name, tensor in engine_of_rank.weights().items():
            assert torch.equal(tensor, for_rank(engine.graph.constants[name].data, rank).materialize()), name
    with pytest.raises(ValueError, match="holds only that rank's weights"):
        loaded[1].save(tmp_path / "again")


def test_a_model_whose_heads_cannot_be_split_is_refused():
    graph = load_checkpoint(BUNDLED, None, 4, 64).graph
    for ranks, reason in [(4, "has 6 query and 2 key/value heads: the query heads must divide among 4 ranks"),
                          (3, "the key/value heads divide among them or divide the ranks")]:
        with pytest.raises(PartitionError, match=reason):
            run_pipeline("reference", graph.clone(), ranks)
    with pytest.raises(ValueError, match="pipeline parallelism .pp > 1. is not available for target 'tensorrt'"):
        kiln.compile(str(BUNDLED), target="tensorrt", pp=2)


def test_collectives_meet_every_ranks_tensor():
    g = Graph("c")
    x = g.add_input("x", TensorType("f32", (sym("n"), 3)))
    a, b = torch.randn(1, 3), torch.randn(1, 3)
    own = g.add_constant(ShardData(TensorData(torch.cat([a, b])), 0, 2, 2), TensorType("f32", (1, 3)))
    g.set_outputs([ops.all_reduce(x * own, ranks=2), ops.all_gather(x * own, dim=1, ranks=2)])
    assert str(g.outputs[1].type) == "f32[n, 6]"
    with pytest.raises(Exception, match="needs the other ranks") as error:
        interpret(g, [torch.ones(2, 3)])
    assert isinstance(error.value.__cause__, CollectiveError)
    ones = torch.ones(2, 3)
    for reduced, gathered in simulate_ranks(g, 2, [ones]):
        assert torch.equal(reduced, (a + b).expand(2, 3))
        assert torch.equal(gathered, torch.cat([a, b], 1).expand(2, 6))
