"""Tensor parallelism on real processes: kiln.LLM(..., tp=2) starts a gloo worker for
rank 1, generates the same greedy tokens as one rank, and fails with the rank's name
when that worker is killed. (One test: starting processes is slow on two cores.)"""

import os
import signal

import kiln
from hf_models import BUNDLED

PROMPTS = ["The for statement", [5, 6, 7, 8]]


def test_two_ranks_generate_what_one_does_and_a_killed_worker_is_named(bundled_engine):
    params = kiln.SamplingParams(max_tokens=6, temperature=0)
    want = [o.token_ids for o in kiln.LLM(bundled_engine).generate(PROMPTS, params)]
    llm = kiln.LLM(str(BUNDLED), tp=2, max_batch_size=16, max_seq_len=256, max_num_tokens=256)
    try:
        assert [o.token_ids for o in llm.generate(PROMPTS, params)] == want
        worker = llm.llm_engine.workers.processes[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        out = llm.generate(["Hello"], params)[0]
        assert out.finish_reason == "error" and "rank 1 exited with code -9" in out.error
    finally:
        llm.close()
