"""The ``kiln`` command, run as a user runs it: in a subprocess."""

import re
import subprocess
import sys

from hf_models import BUNDLED

import pytest

GRAPH = """graph @g(%x: f32[batch, 4]) {
  %0 = neg(%x) : f32[batch, 4]
  %1 = neg(%0) : f32[batch, 4]
  %2 = relu(%1) : f32[batch, 4]
  %3 = relu(%1) : f32[batch, 4]
  %4 = add(%2, %3) : f32[batch, 4]
  return %4
}
"""


def kiln(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def graph_file(tmp_path):
    path = tmp_path / "g.kiln"
    path.write_text(GRAPH)
    return path


def test_ir_prints_the_verified_graph(graph_file):
    result = kiln("ir", str(graph_file))
    assert result.returncode == 0, result.stderr
    assert result.stdout == GRAPH


def test_ir_runs_a_pipeline_and_dumps_after_a_pass(graph_file):
    result = kiln("ir", str(graph_file), "--pipeline", "cleanup", "--after", "canonicalize",
                  "--after", "dce", "--timing")
    assert result.returncode == 0, result.stderr
    assert "// after canonicalize" in result.stdout and "// after dce" in result.stdout
    final = result.stdout.split("// after dce\n")[1]
    assert final == ("graph @g(%x: f32[batch, 4]) {\n  %0 = relu(%x) : f32[batch, 4]\n"
                     "  %1 = add(%0, %0) : f32[batch, 4]\n  return %1\n}\n")
    assert "canonicalize" in result.stderr and "changes" in result.stderr


def test_ir_dot_output_from_stdin():
    result = kiln("ir", "-", "--format", "dot", stdin=GRAPH)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('digraph "g" {') and "n4 -> out0" in result.stdout


def test_ir_reports_parse_and_verification_errors(tmp_path):
    bad = tmp_path / "bad.kiln"
    bad.write_text(GRAPH.replace("%1 = neg(%0)", "%1 = neg(%9)"))
    result = kiln("ir", str(bad))
    assert result.returncode == 1
    assert "kiln ir: error: line 3, column 12: unknown value %9" in result.stderr
    bad.write_text(GRAPH.replace("%4 = add(%2, %3) : f32[batch, 4]", "%4 = add(%2, %3) : f32[batch, 5]"))
    result = kiln("ir", str(bad))
    assert result.returncode == 1 and "result 0 is typed f32[batch, 5], the op gives f32[batch, 4]" in result.stderr


def test_main_job_compiles_the_bundled_model_and_generates():
    result = subprocess.run(["kiln", "--max-tokens", "12"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "built the bundled LlamaForCausalLM for cpu" in result.stdout
    assert "The for statement is used to specify cleanup" in result.stdout
    assert re.search(r"12 tokens in [0-9.]+ s: [0-9.]+ tokens/s", result.stdout)


def test_ir_of_a_checkpoint_directory():
    result = kiln("ir", str(BUNDLED), "--pipeline", "reference", "--after", "dce", "--after", "paged_attention")
    assert result.returncode == 0, result.stderr
    dumps = dict(part.split("\n", 1) for part in result.stdout.split("// after ")[1:])
    imported, paged = dumps["dce"], dumps["paged_attention"]
    assert "graph @LlamaForCausalLM(%ids: i64[batch, seq]) {" in imported and "= attention(" in imported
    assert paged.startswith("graph @LlamaForCausalLM(%ids: i64[num_tokens], %positions: i64[num_tokens]")
    assert paged.count("= paged_attention(") == 4 and 'loc("model.layers.3.self_attn")' in paged
