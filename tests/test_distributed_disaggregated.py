"""Disaggregated prefill and decode on real processes (gloo on the CPU): prompts prefilled
by a worker whose KV blocks come back layer by layer give the greedy tokens of one
process, through ``kiln.LLM`` and ``kiln serve`` with the openai client; the transfer is
reported; a killed prefill worker ends the run with an error naming it."""

import os
import signal

import pytest
from test_distributed import PROMPTS, greedy, serve_and_compare  # noqa: F401 - greedy is a fixture

import kiln
from kiln.runtime.distributed import WorkerError


def test_prefilled_elsewhere_generates_what_one_process_does_and_a_killed_worker_is_named(saved_engine, greedy):
    params, want = greedy
    llm = kiln.LLM(saved_engine, kiln.RuntimeConfig(prefill_workers=1, num_blocks=64))
    try:
        prompts = [*PROMPTS, "A"]  # one token: nothing to prefill
        expected = [*(o.token_ids for o in want), kiln.LLM(saved_engine).generate(["A"], params)[0].token_ids]
        assert [o.token_ids for o in llm.generate(prompts, params)] == expected
        stats = llm.prefill_stats()
        assert stats.requests == len(PROMPTS) and stats.prefill_s > 0 and 0 <= stats.hidden <= 1
        assert stats.exposed_s <= stats.transfer_s
        worker = llm.llm_engine.prefill.processes[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        with pytest.raises(WorkerError, match="prefill worker failed: rank 1 exited with code -9"):
            llm.generate(["Hello there"], params)
    finally:
        llm.close()


def test_kiln_serve_with_a_prefill_worker_answers_the_openai_client(saved_engine, greedy):
    serve_and_compare(saved_engine, ["--prefill-workers", "1"], greedy)
