"""ONNX export: kiln graphs as standard ONNX (opset 23), run by onnxruntime on the CPU and
compared with the module, the interpreter and kiln's greedy tokens."""

import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn

import kiln
from kiln.backends.onnx import OPSET, OnnxSession, UnsupportedOpsError, export_onnx
from kiln.cli import BUNDLED_MODEL, main
from kiln.ir import REGISTRY, Graph, OpDef, TensorType, interpret
from kiln.runtime.batch import SequenceStep, step_inputs
from kiln.testing import PORTABLE_GENERATORS, graphs_with_inputs


def test_a_module_exports_and_runs_in_onnxruntime_at_another_batch(tmp_path):
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(approximate="tanh"), nn.LayerNorm(32), nn.Linear(32, 8),
                          nn.Softmax(-1)).eval()
    compiled = kiln.compile(model, example_inputs=[torch.randn(4, 16)],
                            dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    compiled.export_onnx(tmp_path / "mlp.onnx")
    proto = onnx.load(tmp_path / "mlp.onnx")
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == OPSET and {o.domain for o in proto.opset_import} == {""}
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = torch.randn(11, 16)
    (out,) = OnnxSession(tmp_path / "mlp.onnx")(**{compiled.graph.inputs[0].name: x})
    torch.testing.assert_close(out, model(x).detach(), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=["cpu", "tensorrt"])
def engine(request):
    """The bundled model for the paged (cpu) and the linear (tensorrt) cache layout."""
    return kiln.compile(str(BUNDLED_MODEL), target=request.param, max_batch_size=4, max_seq_len=64)


def test_the_step_graph_decodes_in_onnxruntime_to_kiln_greedy_tokens(engine, tmp_path):
    engine.export_onnx(tmp_path / "step.onnx")
    proto = onnx.load(tmp_path / "step.onnx")
    ops = {n.op_type for n in proto.graph.node}
    assert {"Attention", "RMSNormalization", "ScatterND"} <= ops
    session = OnnxSession(tmp_path / "step.onnx")
    assert session.output_names == ["logits", *(f"{n}_out" for n in engine.cache_spec.names)]
    linear = engine.cache_spec.linear
    block = 64 if linear else 4
    blocks = [2] if linear else [5, 1, 7, 0, 3, 2, 6, 4, 9, 8, 11, 10, 13, 12, 15, 14]  # out of order
    caches = {k: v.fill_(float("nan")) for k, v in engine.cache_spec.allocate(4 if linear else 16, block,
                                                                              "cpu").items()}
    prompt = engine.encode("The for statement")
    new, cached, tokens = prompt, 0, []
    for _ in range(10):
        logits, *updated = session(**step_inputs([SequenceStep(new, cached, blocks)], block), **caches)
        caches = dict(zip(engine.cache_spec.names, updated))
        cached += len(new)
        new = [int(logits[-1].argmax())]
        tokens += new
    params = kiln.SamplingParams(max_tokens=10, temperature=0)
    expected = kiln.LLM(engine, kiln.RuntimeConfig(device="cpu")).generate([prompt], params)[0].token_ids
    assert tokens == list(expected)


def test_a_mixed_step_gives_the_executor_logits(engine):
    session = OnnxSession(export_onnx(engine.graph))
    linear = engine.cache_spec.linear
    block = 64 if linear else 4
    steps = [SequenceStep(list(range(5, 12)), 0, [0] if linear else [0, 1]),
             SequenceStep([40, 41], 3, [1] if linear else [2, 3]), SequenceStep([70], 9, [2] if linear else [4, 5, 6])]
    caches = {k: torch.randn_like(v) for k, v in engine.cache_spec.allocate(3 if linear else 8, block, "cpu").items()}
    inputs = step_inputs(steps, block, all_logits=True)
    expected = engine.step_function("cpu")(**inputs, **{k: v.clone() for k, v in caches.items()})
    for got, want in zip(session(**inputs, **caches), expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_kiln_export_writes_the_step_graph(tmp_path, capsys):
    assert main(["export", str(BUNDLED_MODEL), "--format", "onnx", "-o", str(tmp_path / "m.onnx"),
                 "--max-seq-len", "64", "--max-batch-size", "2"]) == 0
    assert "exported the step graph" in capsys.readouterr().out
    onnx.checker.check_model(onnx.load(tmp_path / "m.onnx"), full_check=True)


def test_ops_onnx_cannot_express_are_refused_by_name():
    custom = REGISTRY.extended([OpDef("my_op", ("x",), lambda x: x, lambda x: x)])
    g = Graph("custom", registry=custom)
    x = g.add_input("x", TensorType("f32", (3,)))
    packed = g.add_input("w", TensorType("i4", (3,)))
    g.set_outputs([g.call("my_op", [x]), g.call("reshape", [packed], {"shape": (1, 3)})])
    with pytest.raises(UnsupportedOpsError) as error:
        export_onnx(g)
    assert "op my_op has no ONNX form" in str(error.value) and "dtype i4 has no ONNX element type" in str(error.value)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs_with_inputs(generators=PORTABLE_GENERATORS))
def test_random_graphs_run_in_onnxruntime_as_in_the_interpreter(case):
    graph, inputs = case
    outputs = OnnxSession(export_onnx(graph))(**{v.name: t for v, t in zip(graph.inputs, inputs)})
    expected = interpret(graph, inputs)
    expected = expected if isinstance(expected, (list, tuple)) else [expected]
    for got, want in zip(outputs, expected):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, equal_nan=True)


def test_log1p_and_floor_run_in_onnxruntime_as_torch():
    """log1p keeps its precision near 0 (Goldberg's formula), where log(1 + x) loses it."""
    g = Graph("g")
    x = g.add_input("x", TensorType("f32", (6,)))
    g.set_outputs([g.call("log1p", [x]).result, g.call("floor", [x]).result])
    values = torch.tensor([1e-9, -3e-8, 2.5e-4, 0.75, 12.0, -0.5])
    log1p, floor = OnnxSession(export_onnx(g))(x=values)
    torch.testing.assert_close(log1p, torch.log1p(values), rtol=1e-6, atol=0)
    assert torch.equal(floor, torch.floor(values))
