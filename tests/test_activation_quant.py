"""Activation quantization fused into the norm that makes the activation: the ops
(``rms_norm_quant``, ``add_rms_norm_quant``, ``scaled_linear``) against the unfused
references, the ``fuse_activation_quant`` rules (match counts, ops before and after, the
interpreter's results unchanged at two batch sizes, the graph still verifying), and the
bundled model's quantized pipelines."""

import textwrap

import pytest
import torch
from hf_models import BUNDLED

from kiln.ir import REGISTRY, ShapeError, TensorType, dtypes, interpret, verify
from kiln.passes import QuantConfig, fuse_activation_quant, pipeline_manager
from kiln.passes.quantization.weights import quantize_fp8_weight, quantize_int8
from kiln.testing import graph_from_text, random_inputs

BLOCK = textwrap.dedent("""\
    graph @block(%x: f32[batch, 64], %r: f32[batch, 64]) {{
      %w1 = constant : f32[64]
      %w2 = constant : f32[64]
      %q = constant : {code}[96, 64]
      %s = constant : f32[96]
      %b = constant : f32[96]
      %q2 = constant : {code}[64, 96]
      %s2 = constant : f32[64]
      %0 = rms_norm(%x, %w1) {{eps = 1e-06}} : f32[batch, 64]
      %1 = {op}(%0, %q, %s{static}) : f32[batch, 96]
      %2 = silu(%1) : f32[batch, 96]
      %3 = {op}(%2, %q2, %s2{static}) : f32[batch, 64]
      %4, %5 = add_rms_norm(%3, %x, %w2) {{eps = 1e-06}} : f32[batch, 64], f32[batch, 64]
      %6 = {op}(%4, %q, %s{static}, %b) : f32[batch, 96]
      return %6, %5
    }}
""")
SCHEMES = {"fp8": ("linear_fp8", "f8e4m3", ", none"), "w8a8": ("linear_w8a8", "i8", "")}


def _block(scheme: str):
    op, code, static = SCHEMES[scheme]
    return graph_from_text(BLOCK.format(op=op, code=code, static=static))


@pytest.mark.parametrize("qdtype", [dtypes.float8_e4m3fn, dtypes.int8])
def test_fused_references_compose_the_unfused_ones(qdtype):
    gen = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(2, 5, 64, generator=gen, dtype=torch.float32) for _ in range(2))
    weight, w = torch.randn(64, generator=gen), torch.randn(48, 64, generator=gen)
    bias = torch.randn(48, generator=gen)
    linear = "linear_fp8" if qdtype == dtypes.float8_e4m3fn else "linear_w8a8"
    qweight, scale = (quantize_fp8_weight if linear == "linear_fp8" else quantize_int8)(w)
    static = [None] if linear == "linear_fp8" else []
    normed, total = REGISTRY["add_rms_norm"].reference(x, residual, weight, 1e-6)
    codes, scales, fused_total = REGISTRY["add_rms_norm_quant"].reference(x, residual, weight, 1e-6, qdtype)
    assert codes.dtype == qdtype.torch_dtype and scales.shape == (2, 5, 1) and torch.equal(fused_total, total)
    want = REGISTRY[linear].reference(normed, qweight, scale, *static, bias)
    assert torch.equal(REGISTRY["scaled_linear"].reference(codes, scales, qweight, scale, bias, dtypes.float32), want)
    codes, scales = REGISTRY["rms_norm_quant"].reference(x, weight, 1e-6, qdtype)
    want = REGISTRY[linear].reference(REGISTRY["rms_norm"].reference(x, weight, 1e-6), qweight, scale, *static, None)
    assert torch.equal(REGISTRY["scaled_linear"].reference(codes, scales, qweight, scale, None, dtypes.float32), want)


def test_shape_rules_name_the_bad_operand():
    f32, f8 = dtypes.float32, dtypes.float8_e4m3fn
    x = TensorType(f32, (4, 64))
    with pytest.raises(ShapeError, match="quantized to"):
        REGISTRY["rms_norm_quant"].infer(x, None, 1e-6, dtypes.int4)
    codes, scales = TensorType(f8, (4, 64)), TensorType(f32, (4, 1))
    qweight, weight_scale = TensorType(f8, (32, 64)), TensorType(f32, (32,))
    rule = REGISTRY["scaled_linear"]
    assert rule.infer(codes, scales, qweight, weight_scale, None, dtypes.bfloat16) == TensorType(dtypes.bfloat16,
                                                                                                  (4, 32))
    for operands, message in [([codes, scales, TensorType(dtypes.int8, (32, 64)), weight_scale], "same dtype"),
                              ([codes, TensorType(f32, (4,)), qweight, weight_scale], "token scales"),
                              ([codes, scales, qweight, TensorType(f32, (16,))], "weight scales")]:
        with pytest.raises(ShapeError, match=message):
            rule.infer(*operands, None, f32)
    with pytest.raises(ShapeError, match="floating-point output"):
        rule.infer(codes, scales, qweight, weight_scale, None, f8)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_norms_feeding_w8a8_layers_emit_their_codes(scheme):
    graph = _block(scheme)
    fused = graph.clone()
    counts = fuse_activation_quant.run(fused)
    verify(fused)
    op = SCHEMES[scheme][0]
    assert counts == 2
    assert fused.op_counts() == {"rms_norm_quant": 1, "add_rms_norm_quant": 1, "scaled_linear": 2, op: 1, "silu": 1}
    for batch in (3, 8):  # the same bits as the unfused graph, at two batch sizes
        inputs = random_inputs(graph, batch, seed=batch)
        for want, got in zip(interpret(graph, inputs), interpret(fused, inputs)):
            assert torch.equal(want, got)
    assert fuse_activation_quant.run(fused) == 0


def test_static_scales_and_shared_norms_are_left_alone():
    graph = graph_from_text(BLOCK.format(op="linear_fp8", code="f8e4m3", static=", %is").replace(
        "%s2 = constant : f32[64]", "%s2 = constant : f32[64]\n  %is = constant : f32[]"))
    assert fuse_activation_quant.run(graph) == 0  # a static input scale: the layer's own quantization
    text = BLOCK.format(op="linear_w8a8", code="i8", static="").replace("return %6, %5", "return %6, %5, %0")
    graph = graph_from_text(text)
    assert fuse_activation_quant.run(graph) == 1  # the first norm's output is a graph output too: kept


@pytest.fixture(scope="module")
def bundled_graph():
    from kiln.frontends.huggingface import load_checkpoint

    return load_checkpoint(str(BUNDLED)).graph


def test_the_quantized_pipeline_fuses_the_norms_before_w8a8_gemms(bundled_graph):
    graph = bundled_graph.clone()
    pipeline_manager("reference", QuantConfig("fp8"), debug=True).run(graph)
    counts = graph.op_counts()
    # 4 layers: each QKV GEMM and the first 3 gate/up GEMMs read their norm's codes; o_proj, down_proj and the
    # last gate/up (the logits rows are selected between its norm and it) quantize their input
    assert counts["scaled_linear"] == 7 and counts["linear_fp8"] == 9 and counts["linear"] == 1
    assert counts["rms_norm_quant"] == 1 and counts["add_rms_norm_quant"] == 6 and counts["add_rms_norm"] == 2
