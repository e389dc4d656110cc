"""Tensor parallelism on real processes (gloo on the CPU): ``kiln.LLM`` and ``kiln serve``
over a tp=2 engine start a worker for rank 1 and give the greedy tokens of one rank; a
killed worker ends the run with an error naming it; ``bench/parallel.py`` runs alone and
under torchrun. Starting processes is slow on two cores, so these tests are few."""

import json
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from live_server import serve_subprocess

import kiln
from kiln.cli import main as kiln_main

PROMPTS = ["The for statement", "Python uses the"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tp2_engine(bundled_tp2_engine, tmp_path_factory):
    path = tmp_path_factory.mktemp("tp2") / "tiny-tp2.kiln"
    bundled_tp2_engine.save(path)
    return path


@pytest.fixture(scope="module")
def greedy(bundled_engine):
    params = kiln.SamplingParams(max_tokens=6, temperature=0)
    return params, kiln.LLM(bundled_engine).generate(PROMPTS, params)


def test_two_ranks_generate_what_one_does_and_a_killed_worker_is_named(tp2_engine, greedy):
    params, want = greedy
    llm = kiln.LLM(tp2_engine)
    try:
        engine = llm.llm_engine  # each rank sized its cache after its weights; all took the same count
        assert engine.workers.num_blocks == len(engine.blocks.blocks) == 16 * 256 // 16  # every sequence at full length
        assert [o.token_ids for o in llm.generate(PROMPTS, params)] == [o.token_ids for o in want]
        assert_a_killed_worker_is_named(llm, 1, params)
    finally:
        llm.close()


def kill_worker(processes, rank: int) -> None:
    """Kill the worker of ``rank`` (``processes`` are those of ranks 1..) and wait for it to end."""
    worker = processes[rank - 1]
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(timeout=10)


def assert_a_killed_worker_is_named(llm, rank: int, params) -> None:
    """Kill ``llm``'s parallel worker of ``rank``: its next request ends with an error naming that rank."""
    kill_worker(llm.llm_engine.workers.processes, rank)
    out = llm.generate(["Hello"], params)[0]
    assert out.finish_reason == "error" and f"rank {rank} exited with code -9" in out.error


def serve_and_compare(engine_dir, options, greedy):
    """``kiln serve ENGINE OPTIONS`` answers the openai client with the greedy texts of one rank."""
    params, want = greedy
    with serve_subprocess(engine_dir, *options, "--num-blocks", "64") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        for prompt, expected in zip(PROMPTS, want):
            got = client.completions.create(model=engine_dir.name, prompt=prompt, max_tokens=params.max_tokens,
                                            temperature=0)
            assert got.choices[0].text == expected.text


def test_kiln_serve_over_two_ranks_answers_the_openai_client(tp2_engine, greedy):
    serve_and_compare(tp2_engine, ["--tp", "2"], greedy)


def test_the_parallel_benchmark_runs_alone_and_under_torchrun(saved_engine, tp2_engine, tmp_path, monkeypatch,
                                                                capsys):
    options = ["--input-len", "8", "--output-len", "4", "--concurrency", "2"]
    script = ROOT / "bench" / "parallel.py"
    alone, report = tmp_path / "tp1.json", tmp_path / "tp2.json"
    monkeypatch.setattr(sys, "argv", [str(script), str(saved_engine), "--tp", "1", *options, "--json", str(alone)])
    runpy.run_path(str(script), run_name="__main__")  # world size 1, in this process
    assert "tp=1 pp=1 concurrency=2:" in capsys.readouterr().out
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                               str(script), str(tp2_engine), "--tp", "2", *options,
                               "--json", str(report)], capture_output=True, text=True, timeout=300)
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    tp1, tp2 = json.loads(alone.read_text()), json.loads(report.read_text())
    assert tp2["results"][0]["output_tokens"] == 8
    assert len(tp1["greedy"]) == 4 and tp2["greedy"] == tp1["greedy"]  # the same fixed prompts, the same tokens


def test_kiln_bench_under_torchrun_measures_on_rank_0(tp2_engine):
    """``torchrun -m kiln.cli bench`` over a tp=2 engine: rank 1 serves rank 0's steps, rank 0
    prints the report, and both exit 0."""
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "kiln.cli",
                          "bench", str(tp2_engine), "--input-len", "8", "--output-len", "4", "--concurrency", "2",
                          "--json"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout[run.stdout.index("{"):])
    assert report["runs"][0]["concurrency"] == 2 and report["runs"][0]["output_tokens"] == 8


def test_under_torchrun_a_checkpoint_is_refused_with_what_to_build(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert kiln_main(["bench", str(ROOT / "models")]) == 1
    assert "is not an engine directory: under torchrun every rank loads the same engine" in capsys.readouterr().err
