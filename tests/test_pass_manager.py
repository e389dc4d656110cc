"""The pass manager: debug verification, dumps after named passes, records."""

import pytest
import torch

from kiln.ir import Graph, TensorType, ops
from kiln.passes import Pass, PassError, PassManager, format_records, pipeline


def _graph():
    g = Graph("t")
    x = g.add_input("x", TensorType("f32", (3,)))
    g.set_outputs([ops.neg(ops.neg(x)) * 1.0])
    return g


def test_records_and_dumps():
    dumps = []
    manager = PassManager(pipeline("cleanup"), dump_after=["canonicalize"],
                          dump=lambda name, g: dumps.append((name, str(g))))
    records = manager.run(_graph())
    assert [r.name for r in records] == ["canonicalize", "fold_constants", "cse", "dce"]
    assert records[0].changes == 2 and records[0].nodes_before == 3 and records[0].nodes_after == 0
    assert dumps == [("canonicalize", "graph @t(%x: f32[3]) {\n  %c = constant [1.0] : f32[]\n  return %x\n}\n")]
    table = format_records(records)
    assert table.splitlines()[1].split()[:4] == ["canonicalize", "1", "2", "3->0"]


def test_until_stable_repeats_a_pipeline_to_its_fixpoint():
    g = Graph("t")
    x = g.add_input("x", TensorType("f32", (3,)))
    inner = ops.neg(x)
    g.set_outputs([ops.neg(inner), ops.neg(inner)])  # neg(neg(x)) only after CSE merges them
    records = PassManager(pipeline("cleanup"), until_stable=True).run(g)
    assert [(r.name, r.round, r.changes) for r in records if r.changes] == [("cse", 1, 1), ("canonicalize", 2, 1)]
    assert g.outputs == [x, x] and not g.nodes


def test_debug_mode_names_the_pass_that_broke_the_graph():
    def vandal(graph):
        graph.nodes.reverse()
        return 1

    with pytest.raises(PassError, match="pass vandal left an invalid graph"):
        PassManager([Pass("vandal", vandal)], debug=True).run(_graph())
    PassManager([Pass("vandal", vandal)], debug=False).run(_graph())  # not checked without debug


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="cannot dump after \\['fuse'\\]"):
        PassManager(pipeline("cleanup"), dump_after=["fuse"])
    with pytest.raises(KeyError, match="unknown pipeline 'fast'"):
        pipeline("fast")


def test_a_plain_function_is_a_pass():
    calls = []
    PassManager([Pass("count", lambda g: calls.append(len(g.nodes)) or 0)]).run(_graph())
    assert calls == [3] and torch.ones(1).item() == 1.0
