"""Recognition and fusion passes: each rule on a small IR graph (count, ops before and
after, numerics at two batch sizes); each fires on the imported graph of every verified
architecture that has its structure; semantics preserved on random graphs with the
pattern planted."""

import textwrap

import pytest
import torch
from hf_models import ARCHITECTURES, VOCAB, random_model
from hypothesis import given
from hypothesis import strategies as st

from kiln.frontends.huggingface import import_model
from kiln.ir import interpret, ops
from kiln.passes import FUSION_RULES, RAISE_RULES, ROTARY_RULES, fuse, pipeline_manager, raise_ops, rewrite
from kiln.testing import assert_preserves, graph_from_text, graphs_with_inputs, random_inputs

# What the reference pipeline leaves, per architecture (2 layers each): raised norms,
# residual+norm fusions, gated activations, and linears (4 per layer + lm_head when QKV
# and gate/up are fused). Architectures without RMSNorm or gated MLPs show zeros there.
PRE_NORM_SWIGLU = {"rms_norm": 1, "add_rms_norm": 4, "gated_activation": 2, "linear": 9}
EXPECTED = {
    **{name: PRE_NORM_SWIGLU for name in ("llama", "llama-2-mha", "llama-3.1", "mistral", "qwen2", "smollm3",
                                          "granite", "gemma")},
    "qwen3": {**PRE_NORM_SWIGLU, "rms_norm": 5},  # + q and k norms per layer
    "gemma2": {**PRE_NORM_SWIGLU, "rms_norm": 5},  # + pre/post feed-forward norms
    "gemma3": {**PRE_NORM_SWIGLU, "rms_norm": 9},
    "olmo2": {"rms_norm": 8, "add_rms_norm": 1, "gated_activation": 2, "linear": 9},  # post-norm blocks
    "phi3": {"rms_norm": 1, "add_rms_norm": 4, "gated_activation": 0, "linear": 9},  # ships gate_up fused
    "glm": {"rms_norm": 1, "add_rms_norm": 4, "gated_activation": 0, "linear": 9},  # ships gate_up fused
    "cohere": {"add_rms_norm": 0, "gated_activation": 2, "linear": 9},  # layer norm, parallel block
    "stablelm": {"add_rms_norm": 0, "gated_activation": 2, "linear": 9},  # layer norm
    **{name: {"rms_norm": 0, "add_rms_norm": 0, "gated_activation": 0, "linear": 9}
       for name in ("gpt-neox", "phi", "starcoder2")},  # layer norm, plain MLP; QKV fused
    "gpt2": {"rms_norm": 0, "add_rms_norm": 0, "gated_activation": 0, "linear": 1},  # Conv1D as matmuls
    # squared ReLU (ungated: nemotron, persimmon, arcee; gated: bitnet, with sub-norms) and xIELU (apertus)
    **{name: {"rms_norm": 0, "add_rms_norm": 0, "gated_activation": 0, "linear": 9}
       for name in ("nemotron", "persimmon")},  # layer norm
    "arcee": {"rms_norm": 1, "add_rms_norm": 4, "gated_activation": 0, "linear": 9},
    "bitnet": {"rms_norm": 5, "add_rms_norm": 4, "gated_activation": 0, "linear": 11},
    "apertus": {"rms_norm": 5, "add_rms_norm": 4, "gated_activation": 0, "linear": 9},  # + q/k norms
    "opt": {"rms_norm": 0, "add_rms_norm": 0, "gated_activation": 0, "linear": 9},  # learned positions
    # mixture of experts: QKV, o_proj and the router per layer; experts in one moe op
    **{name: {"rms_norm": 1, "add_rms_norm": 4, "gated_activation": 0, "linear": 7, "moe": 2}
       for name in ("mixtral", "granitemoe")},
    "olmoe": {"rms_norm": 5, "add_rms_norm": 4, "gated_activation": 0, "linear": 7, "moe": 2},  # q/k norms
    "qwen3-moe": {"rms_norm": 5, "add_rms_norm": 4, "gated_activation": 1, "linear": 8, "moe": 1},  # layer 0 dense
    # + a shared expert (gate/up fused) and its sigmoid gate per layer
    "qwen2-moe": {"rms_norm": 1, "add_rms_norm": 4, "gated_activation": 2, "linear": 9, "moe": 2},
    # attention written out by the model (ALiBi), raised to one attention op per layer; layer norm, plain MLP
    **{name: {"rms_norm": 0, "add_rms_norm": 0, "gated_activation": 0, "linear": 9} for name in ("bloom", "mpt")},
    # (MPT's layer norms have no bias, which the residual + layer norm fusion does not take)
    "falcon": {"rms_norm": 0, "add_rms_norm": 0, "gated_activation": 0, "linear": 9},  # x @ w.T as linears
    # sparsemixer routing raised into moe; layer norms with biases; a biased LM head
    "phimoe": {"rms_norm": 0, "add_rms_norm": 0, "gated_activation": 0, "linear": 7, "moe": 2},
}


NO_HALF_ROTARY = {"cohere", "glm", "gpt2", "opt", "bloom", "mpt"}  # interleaved pairs (cohere, glm); learned
# positions (gpt2, opt); ALiBi (bloom, mpt)
# Rotary stays apart from the QKV split where something sits between them: q/k norms
# (gemma3, olmo2, qwen3), heads interleaved as [heads, 3, head_dim] (gpt-neox), a shipped
# fused QKV cut with slices rather than a split (phi3).
ROTARY_APART = {"gemma3", "olmo2", "qwen3", "gpt-neox", "phi3", "qwen3-moe", "olmoe", "persimmon", "apertus",
                "falcon"}  # Falcon: heads interleaved as [heads, 3, head_dim], as GPT-NeoX
ADD_LAYER_NORMS = {"gpt2": 5, "stablelm": 4, "starcoder2": 4, "gpt-neox": 2, "phi": 2, "nemotron": 4,
                   "persimmon": 4, "opt": 1, "bloom": 4, "falcon": 2, "phimoe": 4}  # parallel blocks: 2
for _name, _expected in EXPECTED.items():
    _fused = _name not in NO_HALF_ROTARY | ROTARY_APART
    EXPECTED[_name] = {"moe": 0, **_expected, "rotary": 4 if _name in ROTARY_APART else 0,
                       "qkv_rotary": 2 if _fused else 0,
                       "add_layer_norm": ADD_LAYER_NORMS.get(_name, 0)}
# multi-head latent attention: q_a, q_b (with the q_a norm between), kv_a, kv_b, o_proj per layer, kv_b inside
# paged_mla_attention; the kv_a norm; interleaved rotary (not raised); layer 0 dense, layer 1 routed (its grouped
# router raised into moe) + a shared expert
EXPECTED["deepseek-v3"] = {"rms_norm": 5, "add_rms_norm": 4, "gated_activation": 2, "linear": 14, "moe": 1,
                           "rotary": 0, "qkv_rotary": 0, "add_layer_norm": 0, "paged_mla_attention": 2}
# DeepSeek-V2: the same, its complex rotary raised (q and k of each layer), queries without a low-rank
# projection in the Lite form (one linear and one norm fewer per layer)
EXPECTED["deepseek-v2"] = {**EXPECTED["deepseek-v3"], "rotary": 4}
EXPECTED["deepseek-v2-lite"] = {**EXPECTED["deepseek-v2"], "rms_norm": 3, "linear": 12}
# Llama 4: complex rotary raised (interleaved) on layer 0's q and k, then L2 q/k norms (apart from the QKV split);
# layer 0 dense, layer 1 a shared expert (gate/up fused) beside the experts, run on every token by the model,
# raised into moe (no batched matmul left)
EXPECTED["llama4"] = {"rms_norm": 3, "add_rms_norm": 4, "gated_activation": 2, "linear": 10, "moe": 1, "rotary": 2,
                      "qkv_rotary": 0, "add_layer_norm": 0, "matmul": 0}


def test_every_architecture_has_expectations():
    assert set(EXPECTED) == set(ARCHITECTURES)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_fusions_fire_on_every_architecture(name):
    graph = import_model(random_model(name)).graph
    pipeline_manager("reference", debug=True).run(graph)
    counts = graph.op_counts()
    assert {op: counts.get(op, 0) for op in EXPECTED[name]} == EXPECTED[name]


def test_bf16_norms_are_recognized_through_their_casts():
    model = random_model("llama").to(torch.bfloat16)
    graph = import_model(model).graph
    pipeline_manager("cleanup").run(graph)
    counts = rewrite(graph, RAISE_RULES)
    assert counts["rms_norm_cast_weight"] == 5 and "pow" not in graph.op_counts()
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits.float()
    got = interpret(graph, [ids])[0].float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2


def _graph(body: str, inputs: str = "%x: f32[batch, 8]"):
    return graph_from_text(f"graph @g({inputs}) {{\n{textwrap.dedent(body).strip()}\n}}\n")


CASES = {
    "raise_rotary": (RAISE_RULES, """
        %cos = constant : f32[8]
        %sin = constant : f32[8]
        %0 = slice(%x) {dim = -1, end = 4} : f32[batch, 4]
        %1 = slice(%x) {dim = 1, start = 4} : f32[batch, 4]
        %2 = neg(%1) : f32[batch, 4]
        %3 = concat(%2, %0) {dim = -1} : f32[batch, 8]
        %4 = mul(%x, %cos) : f32[batch, 8]
        %5 = mul(%sin, %3) : f32[batch, 8]
        %6 = add(%4, %5) : f32[batch, 8]
        return %6""", {"rotary": 1}),
    "raise_partial_rotary": (RAISE_RULES, """
        %cos = constant : f32[4]
        %sin = constant : f32[4]
        %0 = slice(%x) {dim = -1, end = 4} : f32[batch, 4]
        %1 = rotary(%0, %cos, %sin) : f32[batch, 4]
        %2 = slice(%x) {dim = 1, start = 4} : f32[batch, 4]
        %3 = concat(%1, %2) {dim = -1} : f32[batch, 8]
        return %3""", {"rotary": 1}),
    "raise_rms_norm": (RAISE_RULES, """
        %eps = constant [1e-05] : f32[]
        %two = constant [2.0] : f32[]
        %0 = pow(%x, %two) : f32[batch, 8]
        %1 = mean(%0) {dims = [-1], keepdim = true} : f32[batch, 1]
        %2 = add(%1, %eps) : f32[batch, 1]
        %3 = rsqrt(%2) : f32[batch, 1]
        %4 = mul(%x, %3) : f32[batch, 8]
        return %4""", {"rms_norm": 1}),
    "rms_norm_weight": (RAISE_RULES, """
        %w = constant : f32[8]
        %0 = rms_norm(%x) {eps = 1e-05} : f32[batch, 8]
        %1 = mul(%w, %0) : f32[batch, 8]
        return %1""", {"rms_norm": 1}),
    "add_rms_norm": (FUSION_RULES, """
        %w = constant : f32[8]
        %0 = add(%x, %x) : f32[batch, 8]
        %1 = rms_norm(%0, %w) {eps = 1e-05} : f32[batch, 8]
        %2 = mul(%1, %0) : f32[batch, 8]
        return %2""", {"add_rms_norm": 1, "mul": 1}),
    "add_layer_norm": (FUSION_RULES, """
        %w = constant : f32[8]
        %b = constant : f32[8]
        %0 = add(%x, %x) : f32[batch, 8]
        %1 = layer_norm(%0, %w, %b) : f32[batch, 8]
        %2 = mul(%1, %0) : f32[batch, 8]
        return %2""", {"add_layer_norm": 1, "mul": 1}),
    "fuse_qkv": (FUSION_RULES, """
        %wq = constant : f32[8, 8]
        %wk = constant : f32[4, 8]
        %wv = constant : f32[4, 8]
        %0 = linear(%x, %wq) : f32[batch, 8]
        %1 = linear(%x, %wk) : f32[batch, 4]
        %2 = linear(%x, %wv) : f32[batch, 4]
        return %0, %1, %2""", {"concat": 1, "linear": 1, "split": 1}),
    "fuse_qkv_bias": (FUSION_RULES, """
        %wq = constant : f32[8, 8]
        %wk = constant : f32[4, 8]
        %wv = constant : f32[4, 8]
        %bq = constant : f32[8]
        %bk = constant : f32[4]
        %bv = constant : f32[4]
        %0 = linear(%x, %wq, %bq) : f32[batch, 8]
        %1 = linear(%x, %wk, %bk) : f32[batch, 4]
        %2 = linear(%x, %wv, %bv) : f32[batch, 4]
        return %0, %1, %2""", {"concat": 2, "linear": 1, "split": 1}),
    "fuse_swiglu": (FUSION_RULES, """
        %g = constant : f32[16, 8]
        %u = constant : f32[16, 8]
        %0 = linear(%x, %g) : f32[batch, 16]
        %1 = silu(%0) : f32[batch, 16]
        %2 = linear(%x, %u) : f32[batch, 16]
        %3 = mul(%2, %1) : f32[batch, 16]
        return %3""", {"concat": 1, "linear": 1, "gated_activation": 1}),
    "fuse_geglu": (FUSION_RULES, """
        %g = constant : f32[16, 8]
        %u = constant : f32[16, 8]
        %0 = linear(%x, %g) : f32[batch, 16]
        %1 = gelu(%0) {approximate = "tanh"} : f32[batch, 16]
        %2 = linear(%x, %u) : f32[batch, 16]
        %3 = mul(%1, %2) : f32[batch, 16]
        return %3""", {"concat": 1, "linear": 1, "gated_activation": 1}),
    "rotary_before_transpose": (ROTARY_RULES, """
        %cos = constant : f32[1, 1, 3, 8]
        %sin = constant : f32[1, 1, 3, 8]
        %0 = transpose(%x) {dim0 = 1, dim1 = 2} : f32[batch, 2, 3, 8]
        %1 = rotary(%0, %cos, %sin) : f32[batch, 2, 3, 8]
        return %1""", {"transpose": 3, "rotary": 1}, "%x: f32[batch, 3, 2, 8]"),
    "fuse_qkv_rotary": (ROTARY_RULES, """
        %cos = constant : f32[3, 1, 8]
        %sin = constant : f32[3, 1, 8]
        %0, %1, %2 = split(%x) {dim = -1, sizes = [16, 8, 8]} : f32[batch, 3, 16], f32[batch, 3, 8], f32[batch, 3, 8]
        %3 = reshape(%0) {shape = [batch, 3, -1, 8]} : f32[batch, 3, 2, 8]
        %4 = rotary(%3, %cos, %sin) : f32[batch, 3, 2, 8]
        %5 = reshape(%4) {shape = [3*batch, 2, 8]} : f32[3*batch, 2, 8]
        %6 = reshape(%1) {shape = [batch, 3, 1, 8]} : f32[batch, 3, 1, 8]
        %7 = rotary(%6, %cos, %sin) : f32[batch, 3, 1, 8]
        %8 = reshape(%7) {shape = [3*batch, 1, 8]} : f32[3*batch, 1, 8]
        %9 = reshape(%2) {shape = [3*batch, 1, 8]} : f32[3*batch, 1, 8]
        return %5, %8, %9""", {"qkv_rotary": 1}, "%x: f32[batch, 3, 32]"),
}


def test_every_rule_has_a_case():
    assert {r.label for r in RAISE_RULES + FUSION_RULES + ROTARY_RULES} - set(CASES) == {"rms_norm_cast_weight"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule(name):
    rules, body, after, *inputs = CASES[name]
    graph = _graph(body, *inputs)
    for batch in (1, 5):
        result = assert_preserves(lambda g: rewrite(g, rules), graph, random_inputs(graph, batch))
    assert rewrite(graph.clone(), rules)[name] == 1
    assert result.op_counts() == after
    if name == "fuse_geglu":
        assert result.nodes[-1].attrs["activation"] == "gelu_tanh"


def _norm_site(draft):
    x = draft.value(lambda v: v.type.rank >= 1 and isinstance(v.shape[-1], int))
    if x is None:
        return None
    normed = x * ops.rsqrt(ops.mean(ops.pow(x, 2.0), dims=(-1,), keepdim=True) + 1e-5)
    return normed * draft.constant((x.shape[-1],)) if draft.draw(st.booleans()) else normed


def _residual_site(draft):
    x = draft.value(lambda v: v.type.rank >= 1 and isinstance(v.shape[-1], int))
    if x is None:
        return None
    total = x + draft.constant(x.shape[-1:])
    return ops.rms_norm(total, draft.constant(x.shape[-1:]), eps=1e-6) + total


def _projection_site(draft):
    x = draft.value(lambda v: v.type.rank >= 1 and isinstance(v.shape[-1], int))
    if x is None:
        return None
    d = x.shape[-1]
    q, k, v = (ops.linear(x, draft.constant((d, d))) for _ in range(3))
    gated = ops.silu(ops.linear(x, draft.constant((d, d)))) * ops.linear(x, draft.constant((d, d)))
    return q + k * v + gated


def _rotary_site(draft):
    x = draft.value(lambda v: v.type.rank >= 1 and isinstance(v.shape[-1], int) and v.shape[-1] % 2 == 0
                    and v.shape[-1] >= 2)
    if x is None:
        return None
    d = x.shape[-1]
    cos, sin = draft.constant((d,)), draft.constant((d,))
    rotated = ops.concat([ops.neg(ops.slice(x, dim=-1, start=d // 2)), ops.slice(x, dim=-1, end=d // 2)], dim=-1)
    return x * cos + rotated * sin


def _qkv_rotary_site(draft):
    x = draft.value(lambda v: v.type.rank >= 1 and isinstance(v.shape[-1], int) and v.type.dtype.is_float)
    if x is None:
        return None
    q_heads, kv_heads = draft.draw(st.sampled_from([(2, 1), (2, 2), (3, 1)]))
    head_dim, lead = 4, x.shape[:-1]
    qkv = ops.linear(x, draft.constant(((q_heads + 2 * kv_heads) * head_dim, x.shape[-1])))
    q, k, v = ops.split(qkv, dim=-1, sizes=(q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim))
    rotated = draft.draw(st.sampled_from([2, 4]))
    cos, sin = (draft.constant((1,) * len(lead) + (1, rotated)) for _ in range(2))
    q, k = (ops.reshape(ops.rotary(ops.reshape(t, shape=(*lead, -1, head_dim)), cos, sin), shape=(-1, n, head_dim))
            for t, n in ((q, q_heads), (k, kv_heads)))
    return ops.sum(q, dims=(1, 2)) + ops.sum(k, dims=(1, 2)) * ops.sum(ops.reshape(v, shape=(-1, kv_heads, head_dim)),
                                                                      dims=(1, 2))


SITES = {"rotary_site": _rotary_site, "norm_site": _norm_site, "residual_site": _residual_site, "projection_site": _projection_site}


@given(graphs_with_inputs(extra_generators=SITES))
def test_raise_preserves_semantics(case):
    graph, inputs = case
    assert_preserves(raise_ops, graph, inputs)


@given(graphs_with_inputs(extra_generators=SITES))
def test_fuse_preserves_semantics(case):
    graph, inputs = case
    assert_preserves(fuse, graph, inputs)


@given(graphs_with_inputs(extra_generators={"qkv_rotary_site": _qkv_rotary_site}))
def test_fuse_rotary_preserves_semantics(case):
    from kiln.passes import fuse_rotary

    graph, inputs = case
    assert_preserves(fuse_rotary, graph, inputs)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_the_lm_head_runs_only_on_selected_tokens(name):
    from kiln.ir import sym

    graph = import_model(random_model(name)).graph
    pipeline_manager("reference", debug=True).run(graph)
    heads = [n for n in graph.nodes if n.op in ("linear", "matmul") and n.results[0].shape[-1] == VOCAB]
    assert heads and all(sym("num_logits") in n.results[0].shape for n in heads)


def _selection_site(draft):
    x = draft.value(lambda v: v.type.rank >= 2 and isinstance(v.shape[0], int) and v.shape[0] >= 1
                    and isinstance(v.shape[-1], int))
    if x is None:
        return None
    d = x.shape[-1]
    rows = draft.draw(st.lists(st.integers(0, x.shape[0] - 1), min_size=1, max_size=3))
    index = draft.graph.add_constant(torch.tensor(rows), name="rows")
    head = ops.tanh(ops.linear(ops.rms_norm(x, draft.constant((d,)), eps=1e-5), draft.constant((3, d))) / 2.0)
    return ops.mean(ops.index_select(head * 0.5, index, dim=0), dims=(0,))


@given(graphs_with_inputs(extra_generators={"selection_site": _selection_site}))
def test_select_logits_preserves_semantics(case):
    from kiln.passes import select_logits

    graph, inputs = case
    assert_preserves(select_logits, graph, inputs)
