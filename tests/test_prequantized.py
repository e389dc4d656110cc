"""Pre-quantized checkpoints (GPTQ, AWQ, FP8) load in their bits: kiln's logits equal
transformers' on the dequantized weights, engines generate, bad configs are refused by
name; and the grouped/float-zero forms of the weight-only ops."""

import json

import pytest
import torch
import torch.nn.functional as F
from hf_models import VOCAB, random_model
from quantized_checkpoints import pack_words, write_awq, write_fp8, write_gptq

import kiln
from kiln.frontends import FrontendError
from kiln.frontends.prequantized import unpack_int32
from kiln.ir import REGISTRY, ShapeError, TensorType
from kiln.ir.opdefs.quantized import _linear_int4, _linear_int8
from kiln.passes.quantization.weights import pack_int4_codes

TOLERANCE = 1e-4


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _check_against(model, directory, ops, quantization=None):
    engine = kiln.compile(directory, dtype="float32", max_seq_len=64, quantization=quantization)
    counts = {op: sum(n.op == op for n in engine.graph.nodes) for op in ops}
    assert all(counts.values()), counts
    ids = torch.randint(0, VOCAB, (3, 13), generator=torch.Generator().manual_seed(1))
    diff = (engine.logits(ids) - _logits(model, ids)).abs().max().item()
    assert diff <= TOLERANCE, f"max abs diff {diff:.2e}"
    return engine


def _generates_like(model, engine):
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                              pad_token_id=0)[0, 6:].tolist()
    params = kiln.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    assert kiln.LLM(engine).generate([prompt[0].tolist()], params)[0].token_ids == want


def test_packing_helpers_round_trip():
    codes = torch.randint(0, 16, (6, 40))
    assert torch.equal(unpack_int32(pack_words(codes.numpy(), 4), 4, dim=1), codes.int())
    assert torch.equal(unpack_int32(pack_words(codes.numpy(), 4).T.contiguous(), 4, dim=0), codes.int().T)
    wide = torch.randint(0, 256, (3, 8))
    assert torch.equal(unpack_int32(pack_words(wide.numpy(), 8), 8, dim=1), wide.int())


@pytest.mark.parametrize("v1, sym", [(True, False), (False, False), (True, True), (False, True)])
def test_gptq_zero_layouts(v1, sym, tmp_path):
    model = random_model("llama")
    engine = _check_against(model, write_gptq(model, tmp_path, sym=sym, v1=v1), ["linear_int4"])
    assert engine.info.quantization == {"checkpoint": {
        "method": "gptq", "bits": 4, "group_size": 32, "sym": sym, "desc_act": False,
        "checkpoint_format": "gptq" if v1 else "gptq_v2"}}
    if v1 and not sym:
        _generates_like(model, engine)


def test_gptq_act_order_gathers_the_input(tmp_path):
    model = random_model("llama")
    engine = _check_against(model, write_gptq(model, tmp_path / "ckpt", act_order=True),
                            ["linear_int4", "index_select"])
    _generates_like(model, engine)
    engine.save(tmp_path / "engine")
    ids = torch.randint(0, VOCAB, (1, 5))
    assert torch.equal(kiln.load(tmp_path / "engine").logits(ids), engine.logits(ids))


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_eight_bits(sym, tmp_path):
    """8-bit GPTQ: ``linear_int8`` with grouped scales; asymmetric layers with f32 zero points."""
    model = random_model("llama")
    engine = _check_against(model, write_gptq(model, tmp_path, bits=8, sym=sym, group=64), ["linear_int8"])
    layers = [n for n in engine.graph.nodes if n.op == "linear_int8"]
    assert all((len(n.inputs) > 3 and n.inputs[3] is not None) != sym for n in layers)


def test_awq(tmp_path):
    model = random_model("llama")
    engine = _check_against(model, write_awq(model, tmp_path), ["linear_int4"])
    assert engine.info.quantization["checkpoint"]["method"] == "awq"
    _generates_like(model, engine)


def test_quantize_stage_leaves_checkpoint_layers_alone(tmp_path):
    model = random_model("llama")
    engine = _check_against(model, write_awq(model, tmp_path), ["linear_int4"], quantization="int8")
    assert engine.info.quantization["scheme"] == "int8" and engine.info.quantization["checkpoint"]
    assert not any(n.op == "linear_int8" for n in engine.graph.nodes)  # only the kept LM head was a candidate


def _fp8_reference(model, static):
    """Each projection quantizes its input to E4M3 as the format says: per token (dynamic,
    absolute maximum onto 448) or by the layer's calibrated scale (static)."""
    for layer in model.model.layers:
        for linear in [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]:
            def forward(x, linear=linear):
                scale = linear.input_scale if static else x.abs().amax(-1, keepdim=True) / 448
                rounded = (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
                return F.linear(rounded, linear.weight)
            linear.forward = forward


@pytest.mark.parametrize("per_channel, static, compressed", [
    (False, False, False), (True, True, False), (True, False, True), (False, True, True)])
def test_fp8(per_channel, static, compressed, tmp_path):
    model = random_model("llama")
    directory = write_fp8(model, tmp_path, per_channel, static, compressed)
    _fp8_reference(model, static)
    engine = _check_against(model, directory, ["linear_fp8"])
    activations = "static" if static else "dynamic"
    assert engine.info.quantization["checkpoint"] == (
        {"method": "compressed-tensors", "weights": "channel" if per_channel else "tensor", "activations": activations}
        if compressed else {"method": "fp8", "activation_scheme": activations})


@pytest.mark.parametrize("change, message", [
    ({"bits": 3}, "bits: 3"),
    ({"checkpoint_format": "marlin"}, "checkpoint_format: 'marlin'"),
    ({"quant_method": "bitsandbytes"}, "quant_method: 'bitsandbytes'"),
])
def test_unservable_gptq_configs_are_refused_by_name(change, message, tmp_path):
    write_gptq(random_model("llama"), tmp_path)
    _edit_config(tmp_path, change)
    with pytest.raises(FrontendError, match=message):
        kiln.compile(tmp_path, max_seq_len=64)


@pytest.mark.parametrize("write, change, message", [
    (write_awq, {"version": "gemv"}, "version: 'gemv'"),
    (write_awq, {"zero_point": False}, "zero_point: False"),
    (lambda m, d: write_fp8(m, d, True, False), {"weight_block_size": [128, 128]}, "weight_block_size"),
    (lambda m, d: write_fp8(m, d, True, False), {"activation_scheme": "static"}, "need a scalar input_scale"),
    (lambda m, d: write_fp8(m, d, True, False, compressed=True), {"format": "pack-quantized"},
     "format: 'pack-quantized'"),
    (lambda m, d: write_fp8(m, d, True, False, compressed=True), {"config_groups": {"group_0": {
        "weights": {"num_bits": 4, "type": "int", "strategy": "group"}}}}, "group_0.weights.num_bits: 4"),
])
def test_unservable_awq_and_fp8_configs_are_refused_by_name(write, change, message, tmp_path):
    write(random_model("llama"), tmp_path)
    _edit_config(tmp_path, change)
    with pytest.raises(FrontendError, match=message):
        kiln.compile(tmp_path, max_seq_len=64).graph.constants  # noqa: B018


def _edit_config(directory, change):
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"].update(change)
    (directory / "config.json").write_text(json.dumps(config))


def test_grouped_int8_scales_and_float_int4_zeros():
    x, generator = torch.randn(3, 64), torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (16, 64), generator=generator, dtype=torch.int8)
    scale = torch.rand(16, 4, generator=generator)
    weight = codes.float() * scale.repeat_interleave(16, dim=1)
    torch.testing.assert_close(REGISTRY["linear_int8"].reference(x, codes, scale, None, None), F.linear(x, weight))
    nibbles = torch.randint(0, 16, (16, 64), generator=generator)
    scales, zeros = torch.rand(16, 2, generator=generator), torch.randn(16, 2, generator=generator) * 8
    weight = (nibbles - zeros.repeat_interleave(32, dim=1)) * scales.repeat_interleave(32, dim=1)
    torch.testing.assert_close(REGISTRY["linear_int4"].reference(x, pack_int4_codes(nibbles), scales, zeros, None),
                               F.linear(x, weight))


def test_grouped_shape_rules():
    x = TensorType("f16", (4, 64))
    assert _linear_int8(x, TensorType("i8", (8, 64)), TensorType("f32", (8, 2)), None, None).shape == (4, 8)
    with pytest.raises(ShapeError, match="groups"):
        _linear_int8(x, TensorType("i8", (8, 64)), TensorType("f32", (8, 3)), None, None)
    with pytest.raises(ShapeError, match="grouped scales"):
        _linear_int8(x, TensorType("i8", (8, 64)), TensorType("f16", (8, 2)), None, None)
    q, scales = TensorType("u8", (8, 32)), TensorType("f16", (8, 2))
    for zeros in ("u8", "f32", "f16"):
        assert _linear_int4(x, q, scales, TensorType(zeros, (8, 2)), None).shape == (4, 8)
    with pytest.raises(ShapeError, match="zero points"):
        _linear_int4(x, q, scales, TensorType("bf16", (8, 2)), None)
