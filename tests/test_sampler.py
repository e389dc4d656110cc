"""The batched sampler on crafted logits: greedy, truncation, penalties, seeds, logprobs."""

import math

import pytest
import torch

from kiln.runtime.sampler import sample
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.sequence import Sequence

LOGITS = torch.tensor([[1.0, 3.0, 2.0, 0.5, -1.0]])


def seq(prompt=(0,), output=(), **params):
    s = Sequence("r", None, list(prompt), SamplingParams(**params))
    s.tokens += list(output)
    return s


def tokens(logits, seqs, eos=()):
    return [t for t, _ in sample(logits, seqs, eos)]


def test_greedy_and_top_k_1_take_the_argmax():
    assert tokens(LOGITS, [seq(temperature=0)]) == [1]
    assert tokens(LOGITS, [seq(temperature=5.0, top_k=1, seed=0)]) == [1]


@pytest.mark.parametrize("params, allowed", [
    (dict(top_k=2), {1, 2}), (dict(top_p=0.5), {1}), (dict(top_p=0.8), {1, 2}), (dict(min_p=0.3), {1, 2}),
])
def test_truncation_keeps_only_the_likely_tokens(params, allowed):
    seen = {t for s in range(200) for t in tokens(LOGITS, [seq(seed=s, **params)])}
    assert seen == allowed


def test_penalties_move_the_argmax():
    assert tokens(LOGITS, [seq(prompt=(1,), temperature=0, repetition_penalty=2.0)]) == [2]  # 3/2 < 2
    assert tokens(LOGITS, [seq(output=(1,), temperature=0, presence_penalty=1.5)]) == [2]
    assert tokens(LOGITS, [seq(output=(1, 1), temperature=0, frequency_penalty=0.6)]) == [2]
    assert tokens(LOGITS, [seq(output=(1,), temperature=0, frequency_penalty=0.6)]) == [1]


def test_min_tokens_suppresses_the_stop_tokens():
    assert tokens(LOGITS, [seq(temperature=0, min_tokens=2)], eos=[1]) == [2]
    assert tokens(LOGITS, [seq(temperature=0, min_tokens=2, ignore_eos=True, stop_token_ids=[2])], eos=[1]) == [1]


def test_a_seeded_row_samples_the_same_beside_any_rows():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    alone = [tokens(logits[1:2], [seq(seed=5, temperature=1.0)])[0] for _ in range(1)]
    for companions in range(3):
        rows = [seq(seed=companions, temperature=0.7), seq(seed=5, temperature=1.0), seq(temperature=0)]
        assert tokens(logits, rows)[1] == alone[0]


def test_logprobs_are_of_the_model_distribution():
    (token, info), = sample(LOGITS, [seq(temperature=0, logprobs=2)])
    expected = torch.log_softmax(LOGITS[0], -1)
    assert token == info.token_id == 1 and math.isclose(info.logprob, expected[1].item(), rel_tol=1e-6)
    assert list(info.top) == [1, 2] and math.isclose(info.top[2], expected[2].item(), rel_tol=1e-6)
