"""Parallel engines on several GPUs (NCCL, one process per GPU under torchrun, through
``bench/parallel.py``): the bundled model built for the cuda target gives, at tp=2, pp=2
and tp=2 x pp=2, the greedy tokens of one GPU, with the tensor-parallel decode steps
replayed from CUDA graphs captured on every rank (and run eagerly). Skipped where fewer
GPUs are present than a layout needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "parallel.py"
OPTIONS = ["--target", "cuda", "--dtype", "float32", "--input-len", "24", "--output-len", "16",
           "--concurrency", "1", "8"]


def _run(tmp_path: Path, tp: int, pp: int, graphs: str) -> dict:
    report = tmp_path / f"tp{tp}-pp{pp}-{graphs}.json"
    command = [sys.executable, str(SCRIPT)] if tp * pp == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp * pp), str(SCRIPT)]
    done = subprocess.run([*command, str(ROOT / "models"), "--tp", str(tp), "--pp", str(pp), *OPTIONS,
                           "--engine-dir", str(tmp_path / f"engine-tp{tp}-pp{pp}"), "--cuda-graphs", graphs,
                           "--json", str(report)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NCCL_NVLS_ENABLE": "0"})
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def one_gpu(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("tp1"), 1, 1, "all")["greedy"]


@pytest.mark.gpu
@pytest.mark.parametrize("tp, pp, graphs", [(2, 1, "all"), (2, 1, "off"), (1, 2, "all"), (2, 2, "all")])
def test_parallel_layouts_give_the_greedy_tokens_of_one_gpu(request, tmp_path, tp, pp, graphs):
    if torch.cuda.device_count() < tp * pp:
        pytest.skip(f"tp={tp} x pp={pp} needs {tp * pp} GPUs; {torch.cuda.device_count()} are present")
    one_gpu = request.getfixturevalue("one_gpu")
    report = _run(tmp_path, tp, pp, graphs)
    assert len(one_gpu) == 4 and report["greedy"] == one_gpu
    assert all(r["output_tokens"] == r["concurrency"] * 16 for r in report["results"])
