"""The quantize stage: weight quantizers (error bounds), the quantized ops' references,
the pass (counts, ops before and after, LM head and skip list, numerics against the
unquantized graph at two batch sizes, laziness, text round trip), the fusions of quantized
projections, and engines built, saved, loaded and run with each scheme."""

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hf_models import BUNDLED
from hypothesis import given
from hypothesis import strategies as st

import kiln
from kiln.frontends.huggingface import load_checkpoint
from kiln.ir import LazyData, ShapeError, interpret, parse, verify
from kiln.ir.opdefs.quantized import dequantize_int4
from kiln.passes import QuantConfig, pipeline_manager
from kiln.passes.quantization import lm_heads, quantize_linears
from kiln.passes.quantization.weights import (int4_group_size, quantize_fp8_weight, quantize_int4,
                                              quantize_int8)
from kiln.testing import graph_from_text, random_inputs

SCHEMES = ("int8", "int4", "fp8")
MLP = textwrap.dedent("""\
    graph @mlp(%x: f32[batch, 64]) {
      %w1 = constant : f32[128, 64]
      %w2 = constant : f32[32, 128]
      %b2 = constant : f32[32]
      %0 = linear(%x, %w1) : f32[batch, 128] loc("mlp.up")
      %1 = silu(%0) : f32[batch, 128]
      %2 = linear(%1, %w2, %b2) : f32[batch, 32] loc("lm_head")
      return %2
    }
""")


def _weights(seed=0, shape=(48, 256)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@given(st.integers(1, 8), st.integers(1, 6), st.integers(0, 99))
def test_int8_error_is_at_most_half_a_step(rows, cols, seed):
    w = _weights(seed, (rows, cols * 8))
    codes, scale = quantize_int8(w)
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127
    assert ((codes.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_error_is_at_most_half_a_step_per_group(symmetric, dtype):
    w = _weights().to(dtype)
    qweight, scales, zeros = quantize_int4(w, 64, symmetric)
    assert qweight.shape == (48, 128) and scales.shape == zeros.shape == (48, 4) and scales.dtype == dtype
    assert (zeros == 8).all() == symmetric
    error = (dequantize_int4(qweight, scales, zeros) - w.float()).abs()
    step = scales.float().repeat_interleave(64, dim=1)
    assert (error <= step / 2 * 1.01 + 1e-6).all()


def test_fp8_weights_keep_three_mantissa_bits():
    w = _weights()
    codes, scale = quantize_fp8_weight(w)
    assert codes.dtype == torch.float8_e4m3fn and codes.float().abs().amax(1).eq(448).all()
    relative = (codes.float() * scale[:, None] - w).abs() / w.abs().clamp(min=scale[:, None] * 2 ** -6)
    assert relative.max() <= 2 ** -4


def test_int4_group_size_falls_back_to_a_divisor():
    assert int4_group_size(4096, 128) == 128
    assert int4_group_size(576, 128) == 96
    with pytest.raises(ValueError, match="odd"):
        int4_group_size(33, 128)


def test_reference_ops_compute_with_the_dequantized_weight():
    x, w, bias = torch.randn(3, 256), _weights(), torch.randn(48)
    q8, s8 = quantize_int8(w)
    expected = F.linear(x, q8.float() * s8[:, None], bias)
    torch.testing.assert_close(kiln.ir.REGISTRY["linear_int8"].reference(x, q8, s8, None, bias), expected)
    q4, s4, z4 = quantize_int4(w, 128, False)
    expected = F.linear(x, dequantize_int4(q4, s4, z4), bias)
    torch.testing.assert_close(kiln.ir.REGISTRY["linear_int4"].reference(x, q4, s4, z4, bias), expected)
    # FP8 rounds the input too: per token (dynamic) or by a static scale
    q8f, sf = quantize_fp8_weight(w)
    token_scale = x.abs().amax(-1, keepdim=True) / 448
    x_rounded = (x / token_scale).to(torch.float8_e4m3fn).float() * token_scale
    expected = F.linear(x_rounded, q8f.float() * sf[:, None])
    torch.testing.assert_close(kiln.ir.REGISTRY["linear_fp8"].reference(x, q8f, sf, None, None), expected)
    static = torch.tensor(0.01)
    x_static = (x / static).clamp(-448, 448).to(torch.float8_e4m3fn).float() * static
    torch.testing.assert_close(kiln.ir.REGISTRY["linear_fp8"].reference(x, q8f, sf, static, None),
                               F.linear(x_static, q8f.float() * sf[:, None]))


@pytest.mark.parametrize("bad, message", [
    ("%s = constant : f32[128]", "f32\\[32\\]"),  # int8 scale of the wrong length
    ("%s = constant : f16[32]", "f32\\[32\\]"),
])
def test_shape_rules_name_the_bad_operand(bad, message):
    text = textwrap.dedent(f"""\
        graph @g(%x: f32[batch, 64]) {{
          %q = constant : i8[32, 64]
          {bad}
          %0 = linear_int8(%x, %q, %s) : f32[batch, 32]
          return %0
        }}
    """)
    with pytest.raises(Exception, match=message):
        verify(parse(text))


def test_int4_shape_rule_checks_groups_and_zero_points():
    from kiln.ir import TensorType
    from kiln.ir.opdefs.quantized import _linear_int4

    x, q = TensorType("f32", (4, 64)), TensorType("u8", (8, 32))
    assert _linear_int4(x, q, TensorType("f32", (8, 2)), TensorType("u8", (8, 2)), None).shape == (4, 8)
    with pytest.raises(ShapeError, match="groups"):
        _linear_int4(x, q, TensorType("f32", (8, 3)), TensorType("u8", (8, 3)), None)
    with pytest.raises(ShapeError, match="zero points"):
        _linear_int4(x, q, TensorType("f32", (8, 2)), TensorType("i8", (8, 2)), None)


@given(rows=st.integers(1, 3), group=st.sampled_from([8, 16, 32]), groups=st.integers(1, 3),
       with_zeros=st.booleans(), with_bias=st.booleans(), seed=st.integers(0, 99))
def test_int8_zero_points_run_in_the_interpreter(rows, group, groups, with_zeros, with_bias, seed):
    """``linear_int8`` with grouped scales, optional f32 zero points and optional bias (``none``
    where zero points are left out before it) round-trips as text and computes
    ``x @ ((q - zero) * scale).T + bias`` per group in the interpreter."""
    k, n = group * groups, 12
    operands = ["%q", "%s", "%z" if with_zeros else "none", "%b" if with_bias else "none"]
    while operands[-1] == "none":
        operands.pop()
    text = textwrap.dedent(f"""\
        graph @g(%x: f32[batch, {k}]) {{
          %q = constant : i8[{n}, {k}]
          %s = constant : f32[{n}, {groups}]
          %z = constant : f32[{n}, {groups}]
          %b = constant : f32[{n}]
          %0 = linear_int8(%x, {", ".join(operands)}) : f32[batch, {n}]
          return %0
        }}
    """)
    graph = parse(text)
    graph.remove_unused_constants()
    g = torch.Generator().manual_seed(seed)
    data = {"q": torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8),
            "s": torch.rand(n, groups, generator=g), "z": torch.randn(n, groups, generator=g) * 20,
            "b": torch.randn(n, generator=g)}
    graph.bind_constants({name: data[name] for name in graph.constants})
    verify(graph)
    assert str(parse(str(graph))) == str(graph)
    zeros = data["z"] if with_zeros else torch.zeros(n, groups)
    weight = (data["q"].float() - zeros.repeat_interleave(group, 1)) * data["s"].repeat_interleave(group, 1)
    x = torch.randn(rows, k, generator=g)
    expected = F.linear(x, weight, data["b"] if with_bias else None)
    torch.testing.assert_close(interpret(graph, [x])[0], expected, rtol=1e-5, atol=1e-4)


def test_int8_zero_point_shape_rule():
    from kiln.ir import TensorType
    from kiln.ir.opdefs.quantized import _linear_int8

    x, q, scales = TensorType("f32", (4, 64)), TensorType("i8", (8, 64)), TensorType("f32", (8, 2))
    assert _linear_int8(x, q, scales, TensorType("f32", (8, 2)), None).shape == (4, 8)
    for zeros, scale in (("f16", scales), ("u8", scales), ("f32", TensorType("f32", (8,)))):
        with pytest.raises(ShapeError, match="zero points must be f32 of the grouped scales' shape"):
            _linear_int8(x, q, scale, TensorType(zeros, scale.shape), None)
    with pytest.raises(ShapeError, match="zero points"):
        _linear_int8(x, q, scales, TensorType("f32", (8, 4)), None)


def _relative_error(graph, other, batch, seed=0):
    inputs = random_inputs(graph, batch, seed)
    (expected,), (actual,) = interpret(graph, inputs), interpret(other, inputs)
    return ((actual - expected).norm() / expected.norm()).item()


# relative error of the MLP's output against unquantized weights (measured: 0.004, 0.08, 0.03)
TOLERANCE = {"int8": 0.01, "int4": 0.12, "fp8": 0.05}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_pass_quantizes_all_but_the_lm_head(scheme):
    graph = graph_from_text(MLP)
    result = graph.clone()
    assert quantize_linears(result, QuantConfig(scheme)) == 1
    verify(result)
    assert result.op_counts() == {f"linear_{scheme}": 1, "silu": 1, "linear": 1}
    assert [n.location for n in lm_heads(result)] == ["lm_head"]
    for batch in (3, 7):
        assert 0 < _relative_error(graph, result, batch, seed=batch) < TOLERANCE[scheme]
    assert quantize_linears(result, QuantConfig(scheme)) == 0  # idempotent


def test_lm_head_and_skip_list():
    graph = graph_from_text(MLP)
    assert quantize_linears(graph, QuantConfig("int8", lm_head=True, skip=("mlp.*",))) == 1
    assert graph.op_counts() == {"linear": 1, "silu": 1, "linear_int8": 1}
    head = next(n for n in graph.nodes if n.op == "linear_int8")
    assert head.location == "lm_head" and head.inputs[-1].name == "b2"  # the bias is kept


def test_quantized_weights_stay_lazy():
    graph = graph_from_text(MLP)
    reads = []
    w1 = graph.constants["w1"]
    tensor = w1.tensor()
    w1.data = LazyData(lambda: reads.append(1) or tensor)
    quantize_linears(graph, QuantConfig("int4"))
    pipeline_manager("cleanup").run(graph)
    text = str(graph)
    assert reads == [] and "u8[128, 32]" in text and "f32[128, 1]" in text
    interpret(graph, random_inputs(graph, 2))
    assert reads == [1]  # codes, scales and zero points computed together


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_quantizing_a_models_parameters_keeps_no_autograd_graph(scheme):
    """The weights of an in-memory model are parameters that require grad: the quantized
    parts must not carry an autograd graph (it would keep float32 copies of every weight
    alive: the 8B shape's INT8 engine ran out of an H100's memory so)."""
    graph = graph_from_text(MLP)
    w1 = graph.constants["w1"]
    parameter = torch.nn.Parameter(w1.tensor().clone())
    w1.data = LazyData(lambda: parameter)
    quantize_linears(graph, QuantConfig(scheme))
    parts = [v.tensor() for name, v in graph.constants.items() if name.startswith("w1.")]
    assert parts and all(not t.requires_grad and t.grad_fn is None for t in parts)


def test_quantized_graph_text_round_trips():
    graph = graph_from_text(MLP)
    quantize_linears(graph, QuantConfig("fp8", lm_head=True))
    assert str(parse(str(graph))) == str(graph)


def test_config_refuses_bad_options():
    with pytest.raises(ValueError, match="unknown quantization 'int3'.*int8"):
        QuantConfig("int3")
    with pytest.raises(ValueError, match="even"):
        QuantConfig("int4", group_size=7)
    with pytest.raises(ValueError, match="list of layer patterns"):
        QuantConfig("int8", skip="lm_head")
    assert QuantConfig.of(QuantConfig("int4", skip=("a",)).to_dict()) == QuantConfig("int4", skip=("a",))


@pytest.fixture(scope="module")
def bundled_graph():
    return load_checkpoint(str(BUNDLED)).graph


@pytest.mark.parametrize("scheme", SCHEMES)
def test_projections_fuse_after_quantization(bundled_graph, scheme):
    graph = bundled_graph.clone()
    pipeline_manager("reference", QuantConfig(scheme), debug=True).run(graph)
    counts = graph.op_counts()
    # 4 layers: fused QKV, o_proj, fused gate/up, down_proj; the LM head stays a linear; FP8 GEMMs after a norm
    # read its codes (test_activation_quant.py)
    assert counts[f"linear_{scheme}"] + counts.get("scaled_linear", 0) == 16 and counts["linear"] == 1
    assert counts["qkv_rotary"] == 4 and counts["gated_activation"] == 4


@pytest.mark.parametrize("scheme", SCHEMES)
def test_engines_build_save_load_and_generate(scheme, tmp_path, bundled_engine):
    engine = kiln.compile(str(BUNDLED), max_batch_size=4, max_seq_len=128, quantization=scheme)
    engine.save(tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["quantization"]["scheme"] == scheme
    loaded = kiln.load(tmp_path / "q")
    assert loaded.info.quantization == QuantConfig(scheme).to_dict()
    params = kiln.SamplingParams(max_tokens=16, temperature=0)
    prompts = ["The for statement", "Python uses the"]
    quantized = kiln.LLM(loaded).generate(prompts, params)
    full = kiln.LLM(bundled_engine).generate(prompts, params)
    agree = sum(a == b for q, f in zip(quantized, full) for a, b in zip(q.token_ids, f.token_ids))
    assert agree >= 28  # of 32 greedy tokens (measured: 32 for each scheme)


def test_compile_refuses_quantizing_a_plain_module():
    with pytest.raises(ValueError, match="causal LMs"):
        kiln.compile(torch.nn.Linear(4, 4), example_inputs=[torch.randn(2, 4)], quantization="int8")


def test_cli_shows_the_quantized_graph_and_builds_quantized_engines(tmp_path, capsys):
    from kiln.cli import main

    assert main(["ir", str(BUNDLED), "--pipeline", "reference", "--quantization", "fp8", "--after", "quantize",
                 "--quantize-skip", "*.down_proj"]) == 0
    dump = capsys.readouterr().out
    assert dump.count("= linear_fp8(") == 6 * 4 and dump.count("= linear(") == 4 + 1  # down_proj, LM head
    assert main(["ir", str(BUNDLED), "--quantization", "fp8"]) == 0  # the reference pipeline's step graph
    step = capsys.readouterr().out
    assert "= add_rms_norm_quant(" in step and "= scaled_linear(" in step and "= paged_attention(" in step
    assert main(["build", str(BUNDLED), "-o", str(tmp_path / "e"), "--max-seq-len", "64", "--max-batch-size", "2",
                 "--quantization", "int4", "--group-size", "64", "--symmetric"]) == 0
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["quantization"] == {"scheme": "int4", "group_size": 64, "symmetric": True, "lm_head": False,
                                        "skip": [], "activations": "dynamic"}
    assert "u8[1024, 96]" in (tmp_path / "e" / "graph.kiln").read_text()  # fused gate/up, codes two a byte


def test_static_fp8_scales_come_from_calibration(bundled_graph):
    from kiln.passes.quantization import calibrate_fp8_inputs
    from kiln.passes.quantization.calibration import input_absmax

    graph = bundled_graph.clone()
    quantize_linears(graph, QuantConfig("fp8"))
    batches = [torch.tensor([[5, 17, 300, 42, 9]]), torch.tensor([[1000, 7, 8, 2, 3, 4, 99]])]
    first = next(n for n in graph.nodes if n.op == "linear_fp8")
    (amax,) = input_absmax(graph, [first.inputs[0]], batches)
    assert calibrate_fp8_inputs(graph, batches) == 28 and calibrate_fp8_inputs(graph, batches) == 0
    layers = [n for n in graph.nodes if n.op == "linear_fp8"]
    assert layers[0].inputs[3].tensor().item() == pytest.approx(amax / 448)
    assert len({id(n.inputs[3]) for n in layers}) == 4 * 4  # q/k/v and gate/up share their input's scale
    pipeline_manager("reference").run(graph)
    assert graph.op_counts()["linear_fp8"] == 16  # and still fuse


def test_engines_with_static_fp8_scales_generate(bundled_engine):
    config = QuantConfig("fp8", activations="static")
    engine = kiln.compile(str(BUNDLED), max_batch_size=2, max_seq_len=64, quantization=config,
                          calibration=["The for statement executes a suite for each item.", "x = [1, 2, 3]"])
    assert engine.info.quantization["activations"] == "static"
    assert all(len(n.inputs) > 3 and n.inputs[3] is not None for n in engine.graph.nodes if n.op == "linear_fp8")
    params = kiln.SamplingParams(max_tokens=8, temperature=0)
    static = kiln.LLM(engine).generate(["The for statement"], params)[0].token_ids
    assert static == kiln.LLM(bundled_engine).generate(["The for statement"], params)[0].token_ids


def test_calibration_options_are_checked():
    with pytest.raises(ValueError, match="fp8 only"):
        QuantConfig("int8", activations="static")
    with pytest.raises(ValueError, match="static activation scales only"):
        kiln.compile(str(BUNDLED), quantization="int8", calibration=["text"])


def test_a_layer_int4_cannot_hold_is_named():
    graph = graph_from_text(MLP.replace("f32[128, 64]", "f32[128, 63]").replace("f32[batch, 64]", "f32[batch, 63]"))
    with pytest.raises(ValueError, match="cannot quantize mlp.up to int4: .*63 input features is odd.*skip"):
        quantize_linears(graph, QuantConfig("int4"))
    assert quantize_linears(graph, QuantConfig("int4", skip=("mlp.up",))) == 0
