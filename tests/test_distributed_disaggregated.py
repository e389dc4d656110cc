"""Disaggregated prefill and decode on real processes (gloo on the CPU): prompts prefilled
by a worker whose KV blocks come back layer by layer give the greedy tokens of one
process, through ``kiln.LLM`` and ``kiln serve`` with the openai client; the transfer is
reported; a prompt whose prefix is cached has only the rest computed and sent; a killed
prefill worker ends the run with an error naming it."""

import pytest
from test_distributed import PROMPTS, greedy, kill_worker, serve_and_compare  # noqa: F401 - greedy is a fixture

import kiln
from kiln.runtime.distributed import WorkerError

LONG = "The for statement in Python iterates over the items of any sequence, such as a list or a string"  # 21 tokens
REPEATED = LONG + ", in the order"  # 25 tokens, the long prompt's first 20 among them


def test_prefilled_elsewhere_generates_what_one_process_does_and_a_killed_worker_is_named(saved_engine, greedy):
    params, want = greedy
    llm = kiln.LLM(saved_engine, kiln.RuntimeConfig(prefill_workers=1, num_blocks=128, block_size=4))
    one_process = kiln.LLM(saved_engine)
    try:
        prompts = [*PROMPTS, "A", LONG]  # "A": one token, nothing to prefill
        expected = [o.token_ids for o in [*want, *one_process.generate(["A", LONG], params)]]
        assert [o.token_ids for o in llm.generate(prompts, params)] == expected
        stats = llm.prefill_stats()
        assert stats.requests == len(PROMPTS) + 1 and stats.prefill_s > 0 and 0 <= stats.hidden <= 1
        assert stats.exposed_s <= stats.transfer_s

        # the long prompt's blocks are cached on rank 0 and held by the worker: neither computed nor sent again
        got = llm.generate([REPEATED], params)[0]
        assert got.token_ids == one_process.generate([REPEATED], params)[0].token_ids
        again, size = llm.prefill_stats(), len(got.prompt_token_ids)
        assert got.cached_tokens == 20  # the 5 full blocks of the long prompt's 20 first tokens
        assert again.blocks - stats.blocks == -(-size // 4) - 5  # only the blocks rank 0 lacked
        assert again.tokens - stats.tokens == size - 1 - 20  # the worker held the prefix too

        kill_worker(llm.llm_engine.prefill.processes, 1)
        with pytest.raises(WorkerError, match="prefill worker failed: rank 1 exited with code -9"):
            llm.generate(["Hello there"], params)
    finally:
        llm.close()


def test_kiln_serve_with_a_prefill_worker_answers_the_openai_client(saved_engine, greedy):
    serve_and_compare(saved_engine, ["--prefill-workers", "1"], greedy)
