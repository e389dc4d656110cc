"""``logit_bias``: added to the logits before sampling, checked against the engine's own
logits plus the bias, through ``kiln.LLM`` and through ``kiln serve``'s OpenAI API."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln import SamplingParams
from kiln.runtime import LLM, RuntimeConfig

PROMPT = [5, 60, 300, 17]


@pytest.fixture(scope="module")
def llm(bundled_engine):
    return LLM(bundled_engine, RuntimeConfig(num_blocks=64))


@settings(max_examples=10, deadline=None)
@given(bias=st.dictionaries(st.integers(0, 2047), st.floats(-100, 100), min_size=1, max_size=4))
def test_the_first_greedy_token_is_the_argmax_of_the_biased_logits(llm, bundled_engine, bias):
    logits = bundled_engine.logits(torch.tensor([PROMPT]))[0, -1].double()
    for token, amount in bias.items():
        logits[token] += amount
    expected = int(logits.argmax())
    if logits.topk(2).values.diff().abs().item() < 1e-4:
        return  # a tie within float32 noise: either token is right
    out = llm.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0, logit_bias=bias))[0]
    assert out.token_ids == [expected]


def test_a_bias_of_100_forces_its_token_and_out_of_vocabulary_is_refused(llm):
    out = llm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0.8, seed=1, ignore_eos=True,
                                                logit_bias={42: 100}))[0]
    assert out.token_ids == [42] * 6
    with pytest.raises(ValueError, match=r"logit_bias \[5000\] are outside the vocabulary of 2048"):
        llm.generate([PROMPT], SamplingParams(logit_bias={5000: 1.0}))
    with pytest.raises(ValueError, match="logit_bias values must be numbers in"):
        SamplingParams(logit_bias={1: 101})
