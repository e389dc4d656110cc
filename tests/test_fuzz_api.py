"""Fuzzing the Python API with hypothesis: ``SamplingParams`` of any types and sizes,
prompts and token ids, interleaved arrivals, steps and aborts, and engine manifests
with corrupted fields (the manifest is what the hashes hang from: a changed field
either loads as it says or is refused). Bad input is refused with ``ValueError`` (``EngineLoadError``)
naming it, never another exception; the engine never runs more than ``max_num_seqs`` and
gives back every block."""

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kiln
from kiln import SamplingParams
from kiln.runtime import EngineLoadError, LLMEngine, RuntimeConfig

_anything = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4) | st.lists(
    st.integers(), max_size=3)
_fields = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
           "frequency_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "min_tokens", "logprobs")


@given(st.dictionaries(st.sampled_from(_fields), _anything, max_size=6))
def test_sampling_params_take_anything_valid_and_refuse_the_rest_by_name(kwargs):
    try:
        params = SamplingParams(**kwargs)
    except ValueError as exc:
        assert any(name in str(exc) for name in kwargs), (kwargs, exc)
        return
    assert params.max_tokens >= 1 and params.temperature >= 0 and all(isinstance(s, str) for s in params.stop)


@pytest.fixture(scope="module")
def llm_engine(bundled_engine):
    return LLMEngine(bundled_engine, RuntimeConfig(num_blocks=24, block_size=16, max_num_seqs=3))


_prompts = st.one_of(st.text(max_size=40), st.lists(st.integers(-5, 2100), max_size=40),
                     st.lists(st.integers(0, 2047), min_size=240, max_size=260))
_actions = st.lists(st.one_of(
    st.tuples(st.just("add"), _prompts, st.integers(1, 12), st.lists(st.integers(-3, 3000), max_size=2)),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 20))), max_size=16)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_actions)
def test_any_arrivals_steps_and_aborts_keep_max_num_seqs_and_free_every_block(llm_engine, actions):
    engine, added, finished = llm_engine, [], set()
    for action in actions:
        if action[0] == "add":
            _, prompt, max_tokens, stops = action
            try:
                added.append(engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                       stop_token_ids=stops)))
            except ValueError as exc:
                assert str(exc)
        elif action[0] == "step":
            for _ in range(action[1]):
                finished |= {out.request_id for out in engine.step() if out.finished}
                assert engine.num_running <= 3
        elif added:
            engine.abort(added[action[1] % len(added)])
    while engine.has_unfinished():
        finished |= {out.request_id for out in engine.step() if out.finished}
        assert engine.num_running <= 3
    assert not engine.sequences and engine.blocks.num_free == len(engine.blocks.blocks)


_corruptions = st.one_of(
    st.tuples(st.sampled_from(["format", "kiln_version", "target", "backend", "dtype", "max_seq_len", "files",
                               "profiles", "stop_token_ids", "max_batch_size"]), _anything),
    st.tuples(st.just("files"), st.dictionaries(st.text(max_size=12), st.text(max_size=8), max_size=3)))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_corruptions)
def test_a_corrupted_manifest_loads_or_is_refused_with_a_message(saved_engine, tmp_path_factory, corruption):
    copy = shutil.copytree(saved_engine, tmp_path_factory.mktemp("engine") / "e")
    manifest = json.loads((copy / "manifest.json").read_text())
    field, value = corruption
    if manifest.get(field) == value:
        return
    manifest[field] = value
    (copy / "manifest.json").write_text(json.dumps(manifest))
    try:
        kiln.load(copy)  # a field that only describes (max_batch_size: 3) is taken as it is
    except EngineLoadError as exc:
        assert str(exc)
