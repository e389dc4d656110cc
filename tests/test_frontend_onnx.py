"""The ONNX frontend: models exported by torch.onnx.export import into kiln's IR, run
through the passes, and match onnxruntime (and the module) at shapes other than the
traced ones; unsupported ops are refused by domain and name."""

import logging
import warnings

import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from onnx import TensorProto, helper
from torch import nn
from torch.export import Dim

import kiln
from kiln.backends.onnx import OnnxSession, export_onnx
from kiln.frontends import FrontendError, UnsupportedOpsError
from kiln.frontends.onnx import import_onnx
from kiln.ir import interpret, verify
from kiln.testing import PORTABLE_GENERATORS, graphs_with_inputs

from onnx_models import SmallDecoder

pytest.importorskip("onnxscript")  # torch.onnx.export's exporter

MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)),
            lambda b, s: torch.randn(b, 16), {0: "batch"}, {"linear", "gelu"}),
    "conv": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, groups=2),
                                   nn.Flatten(), nn.Linear(4 * 7 * 7, 10)),
             lambda b, s: torch.randn(b, 3, 16, 16), {0: "batch"}, {"conv", "relu", "linear"}),
    "encoder_layer": (lambda: nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
                      lambda b, s: torch.randn(b, s, 32), {0: "batch", 1: "seq"}, {"layer_norm", "softmax"}),
    "decoder": (SmallDecoder, lambda b, s: torch.randint(0, 64, (b, s)), {0: "batch", 1: "seq"},
                {"embedding", "layer_norm", "where", "arange"}),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each model, torch.onnx.export-ed once with dynamic batch (and sequence)."""
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    files = {}
    for name, (make, example, dims, _) in MODELS.items():
        module = make().eval()
        path = tmp_path_factory.mktemp("onnx") / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (example(2, 8),), dynamo=True, verbose=False,
                                        dynamic_shapes=({axis: Dim(d) for axis, d in dims.items()},))
        program.save(str(path))
        files[name] = (module, path)
    logging.disable(logging.NOTSET)
    return files


@pytest.mark.parametrize("name", MODELS)
def test_torch_onnx_exports_import_and_match_onnxruntime(exported, name):
    module, path = exported[name]
    compiled = kiln.compile(path)
    verify(compiled.graph)
    assert MODELS[name][3] <= {n.op for n in compiled.graph.nodes}
    x = MODELS[name][1](3, 11)  # neither the traced batch nor the traced length
    ours = compiled(x)
    (reference,) = OnnxSession(path)(**{compiled.graph.inputs[0].name: x})
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, module(x).detach(), atol=1e-5, rtol=1e-5)


def test_unsupported_ops_are_refused_by_domain_and_name(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    nodes = [helper.make_node("FusedMatMul", ["x", "x"], ["a"], domain="com.microsoft", name="fused"),
             helper.make_node("CumSum", ["a", "axis"], ["y"], name="running")]
    axis = helper.make_tensor("axis", TensorProto.INT64, [], [0])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [axis]),
                              opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(UnsupportedOpsError) as error:
        kiln.compile(tmp_path / "m.onnx")
    assert "com.microsoft::FusedMatMul (from fused)" in str(error.value)
    assert "ai.onnx::CumSum (from running)" in str(error.value)


def test_an_unnamed_dynamic_dim_is_refused():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])]))
    with pytest.raises(FrontendError, match="unnamed dynamic dim at axis 0"):
        import_onnx(model)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs_with_inputs(generators=PORTABLE_GENERATORS))
def test_kiln_graphs_exported_to_onnx_import_back_to_the_same_results(case):
    graph, inputs = case
    if any(n.op == "paged_attention" for n in graph.nodes):  # its ScatterND form has no importer
        return
    back = import_onnx(export_onnx(graph))
    for got, want in zip(interpret(back, inputs), interpret(graph, inputs)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True)
