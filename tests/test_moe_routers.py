"""DeepSeek-V2's and PhiMoE's routers: the routing reference against transformers' routers,
each router raised into one ``moe`` from the model's imported graph with transformers'
logits, and the config values kiln refuses named. (Logits, greedy tokens and mixed paged
batches against transformers are in test_frontend_hf.py and test_paged.py.)"""

import pytest
import torch
import transformers
from hf_models import VOCAB, random_model

import kiln
from kiln.frontends import FrontendError
from kiln.ir.opdefs.moe import route
from kiln.passes import GROUPED_MOE_RULES, MOE_RULES, SPARSEMIXER_RULES, pipeline_manager, rewrite


def _sorted(weights, indices):
    order = indices.argsort(-1)
    return weights.gather(-1, order), indices.gather(-1, order)


@pytest.mark.parametrize("method, groups, kept", [("greedy", 1, 1), ("group_limited_greedy", 4, 2),
                                                  ("group_limited_greedy", 8, 3)])
def test_softmax_routing_matches_deepseek_v2(method, groups, kept):
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    config = transformers.DeepseekV2Config(hidden_size=16, num_attention_heads=4, n_routed_experts=16,
                                           num_experts_per_tok=4, topk_method=method, n_group=groups,
                                           topk_group=kept, routed_scaling_factor=2.5)
    router = DeepseekV2TopkRouter(config)
    torch.manual_seed(3)
    torch.nn.init.normal_(router.weight)
    logits, want_w, want_i = router(torch.randn(13, 16))
    got_w, got_i = route(logits, None, 4, "softmax", False, 2.5, groups, kept)
    torch.testing.assert_close(_sorted(got_w, got_i), _sorted(want_w, want_i))


@pytest.mark.parametrize("eps", [0.01, 0.3])
def test_sparsemixer_routing_matches_phimoe(eps):
    from transformers.models.phimoe.modeling_phimoe import PhimoeTopKRouter

    router = PhimoeTopKRouter(transformers.PhimoeConfig(hidden_size=16, num_local_experts=6,
                                                        router_jitter_noise=eps)).eval()
    torch.manual_seed(4)
    torch.nn.init.normal_(router.weight)
    with torch.no_grad():
        logits, want_w, want_i = router(torch.randn(17, 16))
    got_w, got_i = route(logits, None, 2, "sparsemixer", False, 1.0, 1, 1, eps)
    torch.testing.assert_close((got_w, got_i), (want_w, want_i))  # in transformers' order: best first
    plain_w, _ = route(logits, None, 2, "softmax", False, 1.0, 1, 1)
    assert not torch.allclose(got_w, plain_w)  # the masking changes the weights


@pytest.mark.parametrize("name, rule, attrs", [
    ("deepseek-v2", "raise_moe_group_limited_greedy_scaled",
     dict(scoring="softmax", num_groups=2, topk_groups=1, scale=2.0, normalize=False)),
    ("deepseek-v2", "raise_moe_group_limited_greedy",  # a scale of 1 leaves no multiplication to match
     dict(scoring="softmax", num_groups=2, topk_groups=1, scale=1.0, normalize=False)),
    ("phimoe", "raise_moe_sparsemixer", dict(scoring="sparsemixer", top_k=2, normalize=False)),
])
def test_router_is_raised_into_one_moe_per_layer(name, rule, attrs):
    from kiln.frontends.huggingface import import_model
    from kiln.ir import interpret

    model = random_model(name)
    if name == "deepseek-v2":
        for layer in model.model.layers[model.config.first_k_dense_replace:]:
            layer.mlp.gate.routed_scaling_factor = attrs["scale"]
    graph = import_model(model).graph
    pipeline_manager("cleanup").run(graph)
    layers = sum(1 for layer in model.model.layers if hasattr(layer.mlp, "experts"))
    assert rewrite(graph, MOE_RULES + GROUPED_MOE_RULES + SPARSEMIXER_RULES) == {rule: layers}
    assert "moe_experts" not in graph.op_counts()
    for node in (n for n in graph.nodes if n.op == "moe"):
        assert {k: node.attrs[k] for k in attrs} == attrs
    if name == "phimoe":
        assert node.attrs["jitter_eps"] == pytest.approx(model.config.router_jitter_noise)
    for batch, seq in ((2, 9), (1, 1)):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            want = model(input_ids=ids, use_cache=False).logits
        assert (interpret(graph, [ids])[0] - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name, setting, message", [
    ("deepseek-v2", dict(topk_method="noaux_tc"), r"topk_method='noaux_tc' \(transformers' DeepSeek-V2 router knows "
                                                  r"greedy, group_limited_greedy\)"),
    ("deepseek-v2", dict(n_group=3), r"topk_method='group_limited_greedy' with n_group=3 and topk_group=1"),
    ("deepseek-v2-lite", dict(norm_topk_prob=True), r"norm_topk_prob=True \(transformers' DeepSeek-V2 router "
                                                    r"ignores it"),
    ("phimoe", dict(num_experts_per_tok=3), r"num_experts_per_tok=3 \(PhiMoE's sparsemixer always routes to 2"),
    ("phimoe", dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
     r"rope_parameters rope_type='dynamic' \(PhiMoE's rotary picks its scale by the largest position"),
])
def test_unsupported_config_values_are_named(name, setting, message):
    model = random_model(name)
    for key, value in setting.items():
        setattr(model.config, key, value)
    with pytest.raises(FrontendError, match=rf"kiln does not support this \w+ config yet:\n  - {message}"):
        kiln.compile(model, max_seq_len=64)


def test_phimoe_longrope_beyond_its_original_context():
    """Within original_max_position_embeddings (8192 here) longrope is static and verified
    with every architecture; past it, its scale would depend on the rest of the batch, unless
    the short and long scales are equal."""
    model = random_model("phimoe")
    with pytest.raises(FrontendError, match=r"max_seq_len 8193 exceeds this PhiMoE's original_max_position_embeddings "
                                            r"8192: .* compile with max_seq_len <= 8192"):
        kiln.compile(model, max_seq_len=8193)
    assert model.model.rotary_emb.forward.__func__ is type(model.model.rotary_emb).forward  # left as it was
    model.config.rope_parameters["long_mscale"] = model.config.rope_parameters["short_mscale"]
    engine = kiln.compile(model, max_seq_len=8193)
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    assert (engine.logits(ids) - want).abs().max().item() <= 1e-5
