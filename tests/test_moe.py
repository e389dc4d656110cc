"""Mixture of experts: the routing reference against transformers' routers (DeepSeek-V3's
grouped, bias-corrected one included), the experts reference against transformers' eager
experts, each router form raised into ``moe`` with its numerics kept, expert weights
loaded from per-expert and stacked checkpoints. (Logits and greedy tokens of each MoE
family against transformers are in test_frontend_hf.py, with every architecture's.)"""

import textwrap

import pytest
import torch
import transformers
from hf_models import VOCAB, random_model, write_checkpoint
from safetensors.torch import save_file

import kiln
from kiln.ir.opdefs.moe import moe_experts_reference, route
from kiln.passes import GROUPED_MOE_RULES, MOE_RULES, rewrite
from kiln.testing import assert_preserves, graph_from_text, random_inputs

def _sorted(weights, indices):
    order = indices.argsort(-1)
    return weights.gather(-1, order), indices.gather(-1, order)


@pytest.mark.parametrize("norm", [True, False])
def test_softmax_routing_matches_qwen_and_mixtral(norm):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    config = transformers.Qwen3MoeConfig(hidden_size=16, num_experts=8, num_experts_per_tok=3, norm_topk_prob=norm)
    router = Qwen3MoeTopKRouter(config)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(11, 16)
    logits, want_w, want_i = router(x)
    got_w, got_i = route(logits, None, 3, "softmax", norm, 1.0, 1, 1)
    torch.testing.assert_close(_sorted(got_w, got_i), _sorted(want_w, want_i))


def test_granite_topk_then_softmax_is_normalized_softmax_routing():
    from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeTopKRouter

    router = GraniteMoeTopKRouter(transformers.GraniteMoeConfig(hidden_size=16, num_local_experts=6,
                                                                num_experts_per_tok=2))
    torch.nn.init.normal_(router.weight)
    logits, want_w, want_i = router(torch.randn(9, 16))
    got_w, got_i = route(logits, None, 2, "softmax", True, 1.0, 1, 1)
    torch.testing.assert_close(_sorted(got_w, got_i), _sorted(want_w, want_i))


@pytest.mark.parametrize("groups, kept, norm", [(4, 2, True), (1, 1, False), (8, 3, True)])
def test_grouped_sigmoid_routing_matches_deepseek_v3(groups, kept, norm):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = transformers.DeepseekV3Config(hidden_size=16, n_routed_experts=16, num_experts_per_tok=4, n_group=groups,
                                           topk_group=kept, norm_topk_prob=norm, routed_scaling_factor=2.5)
    router = DeepseekV3TopkRouter(config)
    torch.manual_seed(1)
    torch.nn.init.normal_(router.weight)
    router.e_score_correction_bias.normal_()
    logits, want_w, want_i = router(torch.randn(13, 16))
    got_w, got_i = route(logits, router.e_score_correction_bias, 4, "sigmoid", norm, 2.5, groups, kept)
    torch.testing.assert_close(_sorted(got_w, got_i), _sorted(want_w, want_i))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_experts_reference_matches_transformers_eager_experts(dtype, tolerance):
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = transformers.MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=5)
    config._experts_implementation = "eager"
    experts = MixtralExperts(config).to(dtype)
    torch.manual_seed(2)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(7, 16, dtype=dtype)
    weights, indices = torch.rand(7, 2, dtype=dtype), torch.randint(0, 5, (7, 2))
    indices[:, 1] = (indices[:, 0] + 1) % 5  # two different experts per token
    want = experts(x, indices, weights)
    got = moe_experts_reference(x, weights, indices, experts.gate_up_proj, experts.down_proj, "silu")
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=tolerance, rtol=tolerance)


def test_moe_shape_rule_names_the_problem():
    from kiln.ir import Graph, TensorType, ops, sym

    graph, tokens = Graph("g"), sym("tokens")
    x = graph.add_input("x", TensorType("f32", [tokens, 16]))
    logits = graph.add_input("logits", TensorType("f32", [tokens, 4]))
    gate_up = graph.add_input("gate_up", TensorType("f32", [4, 48, 16]))
    down = graph.add_input("down", TensorType("f32", [4, 16, 24]))
    assert ops.moe(x, logits, gate_up, down, top_k=2).type == x.type
    with pytest.raises(Exception, match="top_k 5 must be between 1 and the number of experts, 4"):
        ops.moe(x, logits, gate_up, down, top_k=5)
    with pytest.raises(Exception, match="do not split into 3 groups"):
        ops.moe(x, logits, gate_up, down, top_k=2, num_groups=3)
    with pytest.raises(Exception, match="down .* is not \\[4, 16, 24\\]"):
        ops.moe(x, logits, gate_up, gate_up, top_k=2)


ROUTERS = {
    "softmax_topk": ("", """
        %p = softmax(%logits) {dim = -1} : f32[t, 4]
        %w, %i = topk(%p) {k = 2} : f32[t, 2], i64[t, 2]"""),
    "softmax_topk_normalized": ("", """
        %p = softmax(%logits) {dim = -1} : f32[t, 4]
        %v, %i = topk(%p) {k = 2} : f32[t, 2], i64[t, 2]
        %s = sum(%v) {dims = [-1], keepdim = true} : f32[t, 1]
        %w = div(%v, %s) : f32[t, 2]"""),
    "topk_softmax": ("", """
        %v, %i = topk(%logits) {k = 2, dim = 1} : f32[t, 2], i64[t, 2]
        %w = softmax(%v) {dim = 1} : f32[t, 2]"""),
    "topk_softmax_cast_weights": ("bf16", """
        %l = cast(%logits) {dtype = f32} : f32[t, 4]
        %v, %i = topk(%l) {k = 2} : f32[t, 2], i64[t, 2]
        %u = softmax(%v) {dim = -1} : f32[t, 2]
        %w = cast(%u) {dtype = bf16} : bf16[t, 2]"""),
    "softmax_topk_normalized_cast_weights": ("bf16", """
        %l = cast(%logits) {dtype = f32} : f32[t, 4]
        %p = softmax(%l) {dim = -1} : f32[t, 4]
        %v, %i = topk(%p) {k = 2} : f32[t, 2], i64[t, 2]
        %s = sum(%v) {dims = [-1], keepdim = true} : f32[t, 1]
        %u = div(%v, %s) : f32[t, 2]
        %w = cast(%u) {dtype = bf16} : bf16[t, 2]"""),
    "softmax_topk_scaled": ("", """
        %scale = constant [2.5] : f32[]
        %p = softmax(%logits) {dim = -1} : f32[t, 4]
        %v, %i = topk(%p) {k = 2} : f32[t, 2], i64[t, 2]
        %w = mul(%v, %scale) : f32[t, 2]"""),
    "softmax_topk_cast_weights": ("bf16", """
        %l = cast(%logits) {dtype = f32} : f32[t, 4]
        %p = softmax(%l) {dim = -1} : f32[t, 4]
        %v, %i = topk(%p) {k = 2} : f32[t, 2], i64[t, 2]
        %w = cast(%v) {dtype = bf16} : bf16[t, 2]"""),
}


@pytest.mark.parametrize("form", sorted(ROUTERS))
def test_each_router_form_is_raised_into_moe(form):
    dtype, router = ROUTERS[form]
    dt = dtype or "f32"
    text = textwrap.dedent(f"""\
        graph @g(%x: {dt}[t, 8], %logits: {dt}[t, 4]) {{
          %gate_up = constant : {dt}[4, 12, 8]
          %down = constant : {dt}[4, 8, 6]
        {textwrap.indent(textwrap.dedent(router).strip(), "  ")}
          %out = moe_experts(%x, %w, %i, %gate_up, %down) : {dt}[t, 8]
          return %out
        }}
        """)
    graph = graph_from_text(text)
    assert rewrite(graph.clone(), MOE_RULES) == {f"raise_moe_{form}": 1}
    tolerance = 2e-2 if dtype else 1e-6
    for tokens in (1, 6):
        result = assert_preserves(lambda g: rewrite(g, MOE_RULES), graph, random_inputs(graph, tokens),
                                  atol=tolerance, rtol=tolerance)
    assert result.op_counts() == ({"moe": 1, "cast": 1} if dtype else {"moe": 1})  # the logits' cast stays
    attrs = result.nodes[-1].attrs
    assert attrs.get("normalize", False) == form.startswith(("softmax_topk_normalized", "topk_softmax"))
    assert attrs.get("scale", 1.0) == (2.5 if "scaled" in form else 1.0)


def test_routing_along_another_dim_is_left_alone():
    graph = graph_from_text("""
        graph @g(%x: f32[4, 8], %logits: f32[4, 4]) {
          %gate_up = constant : f32[4, 12, 8]
          %down = constant : f32[4, 8, 6]
          %p = softmax(%logits) {dim = 0} : f32[4, 4]
          %w, %i = topk(%p) {k = 2} : f32[4, 2], i64[4, 2]
          %out = moe_experts(%x, %w, %i, %gate_up, %down) : f32[4, 8]
          return %out
        }
        """)
    assert sum(rewrite(graph, MOE_RULES).values()) == 0


def _stacked_checkpoint(model, directory):
    """The layout of checkpoints that ship stacked experts: the model's own parameter names."""
    write_checkpoint(model, directory)
    (directory / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors",
              metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize("layout", ["per-expert", "stacked"])
def test_expert_weights_load_from_either_checkpoint_layout(tmp_path, layout):
    model = random_model("mixtral")
    directory = write_checkpoint(model, tmp_path) if layout == "per-expert" else _stacked_checkpoint(model, tmp_path)
    engine = kiln.compile(directory, dtype="float32", max_seq_len=64)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    assert (engine.logits(ids) - want).abs().max().item() <= 1e-4


def test_a_missing_expert_is_named(tmp_path):
    from safetensors.torch import load_file

    from kiln.frontends import FrontendError

    write_checkpoint(random_model("mixtral"), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FrontendError, match=r"cannot merge the checkpoint's 4 x experts.\*.w1.weight and "
                                            r"3 x experts.\*.w3.weight into model.layers.1.mlp.experts.gate_up_proj"):
        kiln.compile(tmp_path, dtype="float32", max_seq_len=64)


@pytest.mark.parametrize("norm, scale", [(False, 1.0), (True, 2.5)])
def test_deepseek_v3_router_is_raised_into_one_moe(norm, scale):
    """The grouped sigmoid router as the frontend imports it (the group mask's scatter as a
    one-hot comparison) becomes ``moe {scoring = sigmoid}``, renormalized or not, scaled or
    not (a scale of 1 leaves no multiplication to match), with transformers' logits."""
    from kiln.frontends.huggingface import import_model
    from kiln.ir import interpret
    from kiln.passes import pipeline_manager

    model = random_model("deepseek-v3")
    model.config.norm_topk_prob = norm
    for layer in model.model.layers[model.config.first_k_dense_replace:]:
        layer.mlp.gate.norm_topk_prob, layer.mlp.gate.routed_scaling_factor = norm, scale
    graph = import_model(model).graph
    pipeline_manager("cleanup").run(graph)
    counts = rewrite(graph, GROUPED_MOE_RULES)
    assert sum(counts.values()) == 1 and "moe_experts" not in graph.op_counts()
    (node,) = [n for n in graph.nodes if n.op == "moe"]
    assert (node.attrs["normalize"], node.attrs["scale"], node.attrs["num_groups"], node.attrs["topk_groups"]) == \
        (norm, scale, 2, 1)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    assert (interpret(graph, [ids])[0] - want).abs().max().item() <= 1e-4


def _llama4_moe(top_k: int):
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    config = transformers.Llama4TextConfig(hidden_size=16, intermediate_size=24, num_local_experts=5,
                                           num_experts_per_tok=top_k)
    torch.manual_seed(3)
    moe = Llama4TextMoe(config).eval()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe


@pytest.mark.parametrize("top_k", [1, 2])
def test_llama4_routing_and_experts_weigh_the_inputs(top_k):
    """Llama 4 scales each expert's input by the sigmoid of its logit (the experts not chosen
    get zeros, which they map to zeros): ``route(scoring="sigmoid")`` and ``weigh_inputs``,
    with the experts' weights transposed to kiln's layout."""
    moe = _llama4_moe(top_k)
    x = torch.randn(7, 16)
    with torch.no_grad():
        want = moe(x)[0] - moe.shared_expert(x)
        weights, indices = route(moe.router(x)[1], None, top_k, "sigmoid", False, 1.0, 1, 1)
        gate_up, down = moe.experts.gate_up_proj.transpose(1, 2), moe.experts.down_proj.transpose(1, 2)
        got = moe_experts_reference(x, weights, indices, gate_up, down, "silu", weigh_inputs=True)
        on_outputs = moe_experts_reference(x, weights, indices, gate_up, down, "silu")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(on_outputs, want, atol=1e-2)


class _Llama4Moe(torch.nn.Module):
    def __init__(self, top_k: int):
        super().__init__()
        self.moe = _llama4_moe(top_k)

    def forward(self, x):
        return self.moe(x)[0]


@pytest.mark.parametrize("top_k, dtype, tolerance", [(1, torch.float32, 1e-6), (2, torch.float32, 1e-6),
                                                     (1, torch.bfloat16, 2e-2)])
def test_llama4_router_and_dense_experts_are_raised_into_one_moe(top_k, dtype, tolerance):
    """The router's scatter of the top-k logits into -inf, its sigmoids (in float32 and cast
    back, in bf16), and every expert run on every token (repeated, weighed, two batched
    matmuls, summed) become one ``moe {scoring = sigmoid, weigh_inputs = true}`` over the
    transposed weights."""
    from kiln.passes import DENSE_MOE_RULES, pipeline_manager

    x = torch.randn(2, 6, 16, dtype=dtype)
    graph = kiln.compile(_Llama4Moe(top_k).to(dtype), example_inputs=[x]).graph
    pipeline_manager("cleanup").run(graph)
    result = assert_preserves(lambda g: rewrite(g, DENSE_MOE_RULES), graph, [x], rtol=tolerance, atol=tolerance)
    counts = result.op_counts()
    assert counts["moe"] == 1 and "matmul" not in counts and "topk" not in counts
    (node,) = [n for n in result.nodes if n.op == "moe"]
    assert (node.attrs["top_k"], node.attrs["scoring"], node.attrs["weigh_inputs"]) == (top_k, "sigmoid", True)
