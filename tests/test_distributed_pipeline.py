"""Pipeline parallelism on real processes (gloo on the CPU): an engine of two stages holds
a graph, an executor and weights per stage; micro-batches give the step's logits;
``kiln.LLM`` over pp=2 and over tp=2 x pp=2 (four ranks), and ``kiln serve`` over pp=2 and
over tp=2 x pp=2, give the greedy tokens of one process; the bubble is reported; a killed
stage worker is named. Starting processes is slow on two cores (four ranks and a server
take most of a minute), so these tests are few."""

import dataclasses
import os

import pytest
import torch
from hf_models import BUNDLED
from test_distributed import (PROMPTS, assert_a_killed_worker_is_named, greedy,  # noqa: F401 - greedy is a fixture
                              serve_and_compare)

import kiln
from kiln.runtime.batch import SequenceStep, step_inputs
from kiln.runtime.pipeline import split_microbatches


@pytest.fixture(scope="module")
def pp2_engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("pp2") / "tiny-pp2.kiln"
    kiln.compile(str(BUNDLED), max_batch_size=16, max_seq_len=256, max_num_tokens=256, pp=2).save(path)
    return path


def with_stages(engine, pp):
    """``engine`` as ``kiln.compile(..., pp=pp)`` builds it: the same final graph, cut into
    stages when saved (compiling again would only repeat the passes)."""
    return dataclasses.replace(engine, info=dataclasses.replace(engine.info, pp=pp))


def test_a_two_stage_engine_holds_a_graph_an_executor_and_weights_per_stage(pp2_engine):
    files = set(os.listdir(pp2_engine))
    per_stage = {f"{kind}.stage{s}.{ext}" for s in (0, 1) for kind, ext in
                 (("graph", "kiln"), ("executor", "py"), ("weights", "safetensors"))}
    assert per_stage <= files and "weights.safetensors" not in files
    engine = kiln.load(pp2_engine)
    assert (engine.info.pp, engine.vocab_size) == (2, 2048)
    with pytest.raises(kiln.runtime.EngineLoadError, match="has 2 ranks; there is no rank 2"):
        kiln.load(pp2_engine, rank=2)


@pytest.mark.parametrize("count", [1, 2, 3, 9])
def test_micro_batches_of_a_mixed_step_give_its_logits(bundled_engine, count):
    steps = [SequenceStep(list(range(3, 12)), 0, [0]), SequenceStep([5], 4, [1]),
             SequenceStep(list(range(20, 40)), 0, [2, 3]), SequenceStep([7, 8], 16, [4, 5])]
    inputs = step_inputs(steps, 16, sampling=[True, True, False, True])
    run = bundled_engine.step_function("cpu")
    with torch.no_grad():
        want = run(**inputs, **bundled_engine.cache_spec.allocate(8, 16, "cpu"))[0]
        caches = bundled_engine.cache_spec.allocate(8, 16, "cpu")
        batches = split_microbatches(inputs, count)
        got = torch.cat([run(**batch, **caches)[0] for batch in batches])
    assert len(batches) == min(count, len(steps)) and all(len(b["ids"]) for b in batches)
    # other row counts block the GEMMs differently (and by the thread count the process has): float32 noise
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_two_stages_generate_what_one_process_does_and_a_killed_worker_is_named(pp2_engine, greedy):
    params, want = greedy
    llm = kiln.LLM(pp2_engine)
    try:
        assert sorted(llm.llm_engine.caches) == ["k_cache_0", "k_cache_1", "v_cache_0", "v_cache_1"]  # stage 0's
        assert [o.token_ids for o in llm.generate(PROMPTS, params)] == [o.token_ids for o in want]
        stats = llm.pipeline_stats()
        assert stats.steps >= params.max_tokens and len(stats.stage_busy_s) == 2
        assert all(s > 0 for s in stats.stage_busy_s) and 0 < stats.bubble < 1 and stats.microbatches == 2
        assert_a_killed_worker_is_named(llm, 1, params)
    finally:
        llm.close()


def test_two_by_two_ranks_generate_what_one_process_does_and_a_killed_worker_is_named(bundled_tp2_engine, greedy):
    params, want = greedy
    llm = kiln.LLM(with_stages(bundled_tp2_engine, 2))  # saved to a scratch directory for its four ranks
    try:
        assert [o.token_ids for o in llm.generate(PROMPTS, params)] == [o.token_ids for o in want]
        assert len(llm.pipeline_stats().stage_busy_s) == 2
        assert_a_killed_worker_is_named(llm, 3, params)  # the last stage's second tensor-parallel rank
    finally:
        llm.close()


def test_kiln_serve_over_two_stages_answers_the_openai_client(pp2_engine, greedy):
    serve_and_compare(pp2_engine, ["--pp", "2"], greedy)


def test_kiln_serve_over_two_by_two_ranks_answers_the_openai_client(bundled_tp2_engine, greedy, tmp_path):
    path = tmp_path / "tiny-tp2-pp2.kiln"
    with_stages(bundled_tp2_engine, 2).save(path)
    assert {f"weights.stage{s}.rank{r}.safetensors" for s in (0, 1) for r in (0, 1)} <= set(os.listdir(path))
    serve_and_compare(path, ["--tp", "2", "--pp", "2"], greedy)

