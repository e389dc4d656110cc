"""Disaggregated prefill and decode on real processes (gloo on the CPU): prompts prefilled
by a worker whose KV blocks come back layer by layer give the greedy tokens of one
process, through ``kiln.LLM`` (engines of one rank, and of two ranks on both sides, tp=2
or pp=2: four processes) and ``kiln serve`` with the openai client; the transfer is
reported; a prompt whose prefix is cached has only the rest computed and sent; a request
aborted while prefilling is dropped on every rank; a killed prefill rank ends the run with
an error naming it."""

import pytest
from test_distributed import PROMPTS, greedy, kill_worker, serve_and_compare  # noqa: F401 - greedy is a fixture
from test_distributed_pipeline import with_stages

import kiln
from kiln.runtime.distributed import WorkerError

LONG = "The for statement in Python iterates over the items of any sequence, such as a list or a string"  # 21 tokens
REPEATED = LONG + ", in the order"  # 25 tokens, the long prompt's first 20 among them
RUNTIME = kiln.RuntimeConfig(prefill_workers=1, num_blocks=128, block_size=4)


@pytest.fixture(scope="module")
def expected(saved_engine, greedy):
    """The greedy tokens of one process for ``PROMPTS``, "A" (one token: nothing to
    prefill), ``LONG`` and ``REPEATED``."""
    params, want = greedy
    more = kiln.LLM(saved_engine).generate(["A", LONG, REPEATED], params)
    return [o.token_ids for o in [*want, *more]]


def generate_and_reuse_a_prefix(llm, params, expected) -> None:
    """``llm`` (one prefill worker, blocks of 4 tokens) gives one process's tokens, reports
    its prefills, and computes and sends only what its prefix cache lacks of a prompt that
    repeats a prefix."""
    prompts = [*PROMPTS, "A", LONG]
    assert [o.token_ids for o in llm.generate(prompts, params)] == expected[:-1]
    stats = llm.prefill_stats()
    assert stats.requests == len(PROMPTS) + 1 and stats.prefill_s > 0 and 0 <= stats.hidden <= 1
    assert stats.exposed_s <= stats.transfer_s
    # the long prompt's blocks are cached on rank 0 and held by the worker: neither computed nor sent again
    got = llm.generate([REPEATED], params)[0]
    again, size = llm.prefill_stats(), len(got.prompt_token_ids)
    assert got.token_ids == expected[-1]
    assert got.cached_tokens == 20  # the 5 full blocks of the long prompt's 20 first tokens
    assert again.blocks - stats.blocks == -(-size // 4) - 5  # only the blocks rank 0 lacked
    assert again.tokens - stats.tokens == size - 1 - 20  # the worker held the prefix too


def abort_while_prefilling(llm, params, expected) -> None:
    """A request aborted while a worker prefills it has its blocks drained, not landed, on
    every decode rank; the next requests still give one process's tokens."""
    engine = llm.llm_engine
    engine.add_request("A", params, "running")  # one token: it runs at once, so nothing waits for the prefill
    engine.step()
    engine.add_request("Hello world, a prompt that nobody has sent before, none of it cached", params, "aborted")
    engine.step()  # dispatches the long prompt
    assert [t.seq.request_id for t in engine.scheduler.prefilling] == ["aborted"]
    landed = llm.prefill_stats().requests
    engine.abort("aborted")
    while engine.has_unfinished():
        engine.step()
    assert llm.prefill_stats().requests == landed
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == expected[:len(PROMPTS)]


def test_prefilled_elsewhere_generates_what_one_process_does_and_a_killed_worker_is_named(saved_engine, greedy,
                                                                                           expected):
    llm = kiln.LLM(saved_engine, RUNTIME)
    try:
        generate_and_reuse_a_prefix(llm, greedy[0], expected)
        abort_while_prefilling(llm, greedy[0], expected)
        kill_worker(llm.llm_engine.prefill.processes, 1)
        with pytest.raises(WorkerError, match="prefill worker failed: rank 1 exited with code -9"):
            llm.generate(["Hello there"], greedy[0])
    finally:
        llm.close()


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_parallel_engines_on_each_side_and_a_killed_prefill_rank_is_named(bundled_engine, bundled_tp2_engine, greedy,
                                                                          expected, tp, pp):
    engine = with_stages(bundled_tp2_engine if tp == 2 else bundled_engine, pp)
    llm = kiln.LLM(engine, RUNTIME)  # the engine's ranks 0-1, then the prefill worker's ranks 2-3
    try:
        generate_and_reuse_a_prefix(llm, greedy[0], expected)
        abort_while_prefilling(llm, greedy[0], expected)
        kill_worker(llm.llm_engine.workers.processes, 3)  # the prefill worker's second rank
        with pytest.raises(WorkerError, match="prefill worker failed: .*rank 3 exited with code -9"):
            llm.generate(["Hello there"], greedy[0])
    finally:
        llm.close()


def test_kiln_serve_with_a_prefill_worker_answers_the_openai_client(saved_engine, greedy):
    serve_and_compare(saved_engine, ["--prefill-workers", "1"], greedy)
