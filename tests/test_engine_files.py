"""Engine directories: what they hold, build in one process and load in another, and
clear refusals of engines that must not load."""

import json
import re
import shutil
import subprocess
import sys
import time

import pytest
from hf_models import BUNDLED

import kiln
from kiln.runtime import EngineLoadError


def test_the_directory_holds_the_promised_files(saved_engine):
    manifest = json.loads((saved_engine / "manifest.json").read_text())
    assert manifest["kiln_version"] == kiln.__version__ and manifest["target"] == "cpu"
    assert {"graph.kiln", "executor.py", "weights.safetensors", "tokenizer.json", "config.json"} <= set(manifest["files"])
    assert manifest["profiles"]["cuda_graph_batch_sizes"][0] == 1
    executor = (saved_engine / "executor.py").read_text()
    assert "v15, v16, v17 = qkv_rotary(" in executor and "paged_attention(" in executor
    assert not any(p.suffix in (".pkl", ".pt", ".bin") for p in saved_engine.iterdir())


@pytest.fixture
def engine_copy(saved_engine, tmp_path):
    return shutil.copytree(saved_engine, tmp_path / "copy")


def _rewrite_manifest(path, **changes):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_load_refuses_a_changed_file(engine_copy):
    weights = engine_copy / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(EngineLoadError, match="weights.safetensors does not match its hash"):
        kiln.load(engine_copy)


def test_load_refuses_an_executor_that_is_not_generated_from_the_graph(engine_copy):
    from kiln.runtime.engine_files import _sha256

    executor = engine_copy / "executor.py"
    executor.write_text(executor.read_text() + "\nimport os\n")
    manifest = json.loads((engine_copy / "manifest.json").read_text())
    _rewrite_manifest(engine_copy, files={**manifest["files"], "executor.py": _sha256(executor)})
    with pytest.raises(EngineLoadError, match="is not the executor kiln generates"):
        kiln.load(engine_copy)


def test_load_refuses_another_version_target_or_no_engine(engine_copy, tmp_path):
    with pytest.raises(EngineLoadError, match="built for target 'cpu', not 'h100'"):
        kiln.load(engine_copy, target="h100")
    _rewrite_manifest(engine_copy, kiln_version="0.0.1")
    with pytest.raises(EngineLoadError, match="built by kiln 0.0.1; this is kiln"):
        kiln.load(engine_copy)
    with pytest.raises(EngineLoadError, match="is not a kiln engine: it has no manifest.json"):
        kiln.load(tmp_path)


def _kiln(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_build_then_generate_in_fresh_processes(tmp_path):
    start = time.perf_counter()
    built = _kiln("build", str(BUNDLED), "-o", str(tmp_path / "e"), "--max-seq-len", "256", "--max-batch-size", "8")
    build_seconds = time.perf_counter() - start
    assert built.returncode == 0, built.stderr
    assert re.search(r"built LlamaForCausalLM for cpu in [0-9.]+ s; saved to", built.stdout)
    start = time.perf_counter()
    generated = _kiln("generate", str(tmp_path / "e"), "--max-tokens", "12")
    generate_seconds = time.perf_counter() - start
    assert generated.returncode == 0, generated.stderr
    assert "The for statement is used to specify cleanup" in generated.stdout
    print(f"kiln build: {build_seconds:.1f} s; kiln generate from the engine: {generate_seconds:.1f} s")


def test_generate_reports_a_bad_engine(engine_copy):
    (engine_copy / "graph.kiln").write_text("garbage")
    result = _kiln("generate", str(engine_copy))
    assert result.returncode == 1 and "graph.kiln does not match its hash" in result.stderr


def test_load_refuses_a_file_the_manifest_does_not_list(engine_copy):
    (engine_copy / "evil_tokenizer.py").write_text("import os\n")
    with pytest.raises(EngineLoadError, match=r"holds \['evil_tokenizer.py'\], which its manifest.json does not"):
        kiln.load(engine_copy)


@pytest.mark.parametrize("name", ["../outside.json", "/etc/hostname", "sub/x", ".."])
def test_load_refuses_a_listed_name_outside_the_directory(engine_copy, name):
    manifest = json.loads((engine_copy / "manifest.json").read_text())
    _rewrite_manifest(engine_copy, files={**manifest["files"], name: "0" * 64})
    with pytest.raises(EngineLoadError, match="which is not a file name of the engine"):
        kiln.load(engine_copy)


def test_load_refuses_a_link_and_an_engine_whose_manifest_leaves_out_the_weights(engine_copy, tmp_path):
    from kiln.runtime.engine_files import _sha256

    config = engine_copy / "config.json"
    outside = tmp_path / "outside.json"
    outside.write_text(config.read_text())
    config.unlink()
    config.symlink_to(outside)
    with pytest.raises(EngineLoadError, match="config.json is not a regular file"):
        kiln.load(engine_copy)
    config.unlink()
    config.write_text(outside.read_text())
    manifest = json.loads((engine_copy / "manifest.json").read_text())
    (engine_copy / "weights.safetensors").unlink()
    _rewrite_manifest(engine_copy, files={n: d for n, d in manifest["files"].items() if n != "weights.safetensors"})
    with pytest.raises(EngineLoadError, match="is missing weights.safetensors"):
        kiln.load(engine_copy)
    assert _sha256(config) == manifest["files"]["config.json"]
