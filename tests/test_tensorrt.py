"""The TensorRT backend: real networks lowered from kiln graphs and real plans built on
the CPU by the TensorRT at hand (CI installs tensorrt-rtx-cu13). Plans are built and
checked here, never executed: no GPU here runs them."""

import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from torch import nn

import kiln
from kiln.backends.tensorrt import (LOWERINGS, PLAN_FILE, TensorRT, TensorRTUnavailableError, UnsupportedOpsError,
                                    build_plan, find_tensorrt, lower, step_ranges)
from kiln.cli import BUNDLED_MODEL, main
from kiln.ir import REGISTRY, Graph, OpDef, TensorType, parse
from kiln.runtime import EngineLoadError, RuntimeConfig
from kiln.backends.tensorrt.table import NOT_LOWERED
from kiln.testing import PORTABLE_GENERATORS, graph_from_text, graphs

try:
    TRT = find_tensorrt()
except TensorRTUnavailableError as exc:  # a machine without TensorRT still runs the rest of the suite
    pytest.skip(str(exc), allow_module_level=True)

MODEL = str(BUNDLED_MODEL)


def _assert_shapes_agree(graph: Graph, nb) -> int:
    """Every node result's TensorRT shape and dtype agree with kiln's type; returns how many."""
    checked = 0
    for node in graph.nodes:
        for value in node.results:
            tensor = nb.tensors[value]
            expected = tuple(d if isinstance(d, int) else -1 for d in value.shape)
            assert tuple(tensor.shape) == expected, f"{node.op} -> {value.name}: {tuple(tensor.shape)} != {expected}"
            assert nb.torch_dtype(tensor) == value.dtype.torch_dtype, f"{node.op}: {tensor.dtype}"
            checked += 1
    return checked


def test_the_module_is_found_and_probed():
    assert TRT.name in ("tensorrt", "tensorrt_rtx")
    assert {"attention", "strongly_typed"} <= TRT.features
    with pytest.raises(ValueError, match="must be one of"):
        find_tensorrt("tensorrt_llm")
    with pytest.raises(KeyError, match="unknown TensorRT feature"):
        TRT.has("plugins")


def test_every_registered_op_has_a_lowering_or_a_stated_refusal():
    assert set(LOWERINGS) | set(NOT_LOWERED) == set(REGISTRY.names())
    assert not set(LOWERINGS) & set(NOT_LOWERED)


@pytest.fixture(scope="module")
def mlp():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8), nn.LogSoftmax(-1)).eval()
    compiled = kiln.compile(model, example_inputs=[torch.randn(4, 16)],
                            dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    return compiled.graph


def test_a_plain_module_builds_a_plan_with_its_profiles(mlp):
    nb = lower(mlp, TRT)
    assert _assert_shapes_agree(mlp, nb) == len(mlp.nodes)
    plan = build_plan(mlp, [{"batch": (1, 4, 16)}, {"batch": (17, 32, 64)}], TRT)
    assert len(plan.data) > 10_000 and plan.tensorrt == str(TRT)
    (x,), (out,) = plan.inputs, plan.outputs
    assert (x.dtype, x.dims, out.dtype, out.dims) == ("f32", (-1, 16), "f32", (-1, 8))
    assert plan.profiles == ({x.name: ((1, 16), (4, 16), (16, 16))}, {x.name: ((17, 16), (32, 16), (64, 16))})


def test_a_profile_must_give_every_dynamic_dim(mlp):
    with pytest.raises(ValueError, match="dims batch that no profile range gives"):
        build_plan(mlp, [{"seq": (1, 2, 3)}], TRT)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The bundled model built by `kiln build --target tensorrt` and loaded back."""
    directory = tmp_path_factory.mktemp("engine") / "tiny-trt.kiln"
    assert main(["build", MODEL, "-o", str(directory), "--target", "tensorrt", "--max-batch-size", "4",
                 "--max-seq-len", "64"]) == 0
    return kiln.load(directory, target="tensorrt")


def test_the_whole_decoder_lowers_layer_by_layer_as_kiln_types_it(engine):
    graph = engine.graph
    nb = lower(graph, TRT)
    assert _assert_shapes_agree(graph, nb) == sum(len(n.results) for n in graph.nodes)
    layers = [nb.network.get_layer(i) for i in range(nb.network.num_layers)]
    attention_layers = {layer.name.split("#")[0] for layer in layers if "ATTENTION" in layer.type.name}
    paged = [n for n in graph.nodes if n.op == "paged_attention"]
    assert len(paged) == 4 and len(attention_layers) == 4  # one native attention per decoder layer
    assert sum(layer.type.name == "SCATTER" for layer in layers) == 8  # the key and value cache writes


def test_the_engine_holds_a_plan_of_the_profile_pass_profiles(engine):
    info = engine.artifact_info
    assert engine.artifacts[PLAN_FILE] and info["tensorrt"] == str(TRT)
    assert [t["name"] for t in info["inputs"]] == [v.name for v in engine.graph.inputs]
    assert len(info["outputs"]) == 9  # logits and the updated key and value caches of 4 layers
    decode, prefill = (info["profiles"][p.name] for p in engine.info.profiles.profiles)
    assert decode["k_cache_0"] == [[1, 64, 2, 32], [4, 64, 2, 32], [4, 64, 2, 32]]
    assert decode["ids"] == [[1], [2], [4]] and prefill["ids"][2] == [engine.info.max_num_tokens]
    assert decode["query_start"][2] == [5]  # num_seqs + 1
    ranges = step_ranges(engine.info.profiles, 4, 64)
    assert [sorted(r) for r in ranges] == [sorted(["num_tokens", "num_seqs", "num_logits", "max_seq_len",
                                                   "num_slots"])] * 2


def test_the_plan_is_saved_under_the_manifest_hashes_and_loads_back(engine, tmp_path):
    engine.save(tmp_path / "e")
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["artifacts"] == [PLAN_FILE] and PLAN_FILE in manifest["files"]
    loaded = kiln.load(tmp_path / "e", target="tensorrt")
    assert loaded.artifacts == engine.artifacts and loaded.artifact_info == engine.artifact_info
    # the runtime serves the same step graph with the reference kernels where no GPU runs the plan
    params = kiln.SamplingParams(max_tokens=6, temperature=0)
    tokens = kiln.LLM(loaded, RuntimeConfig(device="cpu")).generate(["def main"], params)[0].token_ids
    reference = kiln.compile(MODEL, max_batch_size=4, max_seq_len=64)
    assert tokens == kiln.LLM(reference).generate(["def main"], params)[0].token_ids
    shutil.copytree(tmp_path / "e", tmp_path / "changed")
    plan = tmp_path / "changed" / PLAN_FILE
    plan.write_bytes(plan.read_bytes()[:-1] + b"\0")
    with pytest.raises(EngineLoadError, match="tensorrt.plan does not match its hash"):
        kiln.load(tmp_path / "changed")


def test_ops_tensorrt_cannot_express_are_refused_by_name_before_building():
    graph = graph_from_text("""
graph @g(%q: f32[b, 4, 8, 16], %k: f32[b, 2, 8, 16]) {
  %0 = attention(%q, %k, %k) {causal = true, softcap = 30.0} : f32[b, 4, 8, 16]
  return %0
}""")
    with pytest.raises(UnsupportedOpsError, match=r"attention\(%q, %k, %k\).*has no softcap"):
        lower(graph, TRT)
    without_attention = TensorRT(TRT.module, TRT.name, TRT.version, TRT.features - {"attention"})
    causal = parse(str(graph).replace(", softcap = 30.0", ""))
    with pytest.raises(UnsupportedOpsError, match="needs TensorRT's native attention layer"):
        lower(causal, without_attention)
    doubles = parse("graph @d(%x: f32[4]) {\n  %0 = cast(%x) {dtype = f64} : f64[4]\n  return %0\n}")
    with pytest.raises(UnsupportedOpsError, match="dtype f64 has no TensorRT data type"):
        lower(doubles, TRT)
    custom = REGISTRY.extended([OpDef("my_op", ("x",), lambda x: x, lambda x: x)])
    g = Graph("custom", registry=custom)
    x = g.add_input("x", TensorType("f32", (3,)))
    g.set_outputs([g.call("my_op", [x])])
    with pytest.raises(UnsupportedOpsError, match="op my_op has no TensorRT lowering"):
        lower(g, TRT)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs(generators=PORTABLE_GENERATORS))
def test_random_graphs_lower_with_tensorrt_shapes_equal_to_kiln_types(graph):
    assume(not any(n.attrs.get("softcap") is not None or n.attrs.get("sliding_window") is not None
                   or any(v.dtype.name == "f64" for v in n.results) for n in graph.nodes))
    _assert_shapes_agree(graph, lower(graph, TRT))
