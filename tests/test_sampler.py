"""The batched sampler on crafted logits: greedy, truncation, penalties, seeds, logprobs."""

import math

import pytest
import torch

from kiln.runtime import sampler
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


# batched sampling ----------------------------------------------------------------------

VOCAB = 12
ROW = torch.tensor([2.5, 1.0, 0.3, -0.4, 1.8, -1.5, 0.9, 2.2, -0.8, 0.1, 1.4, -2.0])


def batch_of(seqs):
    return ROW.expand(len(seqs), VOCAB)


def allowed(logits, p):
    """The tokens that temperature, top-k, top-p then min-p keep, by their definitions."""
    scaled = (logits / p.temperature).tolist()
    keep = sorted(range(len(scaled)), key=lambda t: -scaled[t])
    if 0 < p.top_k < len(keep):
        keep = [t for t in keep if scaled[t] >= scaled[keep[p.top_k - 1]]]
    probs = dict(zip(keep, torch.tensor([scaled[t] for t in keep]).softmax(-1).tolist()))
    mass = 0.0
    for i, t in enumerate(keep):
        if mass >= p.top_p:
            keep = keep[:i]
            break
        mass += probs[t]
    return {t for t in keep if probs[t] >= p.min_p * max(probs.values())}


def penalized(logits, s):
    """A row's logits after its penalties, applied by their definitions."""
    p, logits = s.params, logits.clone()
    for t in set(s.tokens):
        logits[t] = logits[t] / p.repetition_penalty if logits[t] > 0 else logits[t] * p.repetition_penalty
    for t in set(s.output_ids):
        logits[t] -= p.frequency_penalty * s.output_ids.count(t) + p.presence_penalty
    return logits


MIXED = [dict(temperature=1.3), dict(temperature=1.3, top_k=4), dict(top_p=0.5), dict(min_p=0.1),
         dict(temperature=0.6, top_k=6, top_p=0.9, min_p=0.1), dict(temperature=0),
         dict(temperature=1.1, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2)]


def test_a_seeded_row_samples_the_same_alone_and_in_any_batch_order():
    rows = [seq(prompt=(0, 4), output=(7,) * i, seed=100 + i, **params) for i, params in enumerate(MIXED)]
    others = [seq(temperature=0.9), seq(temperature=0.5, top_p=0.5), seq(temperature=0)]
    own = {id(s): ROW.roll(shift) for shift, s in enumerate(rows + others)}  # each row its own logits

    def logits_of(batch):
        return torch.stack([own[id(s)] for s in batch])
    alone = [tokens(logits_of([s]), [s])[0] for s in rows]
    for order in ([6, 5, 4, 3, 2, 1, 0], [3, 0, 6, 1, 5, 2, 4], [2, 4, 6, 1, 3, 5, 0]):
        batch = others[:1] + [rows[i] for i in order] + others[1:]
        assert tokens(logits_of(batch), batch)[1:-2] == [alone[i] for i in order]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_draws_over_seeds_and_over_steps_follow_the_softmax(temperature):
    probs = (ROW / temperature).softmax(-1)
    over_seeds = [seq(seed=s, temperature=temperature) for s in range(20_000)]
    over_steps = [seq(output=(0,) * n, seed=1, temperature=temperature) for n in range(3_000)]
    for rows in (over_seeds, over_steps):
        counts = torch.bincount(torch.tensor(tokens(batch_of(rows), rows)), minlength=VOCAB)
        expected = probs * len(rows)
        chi_square = ((counts - expected) ** 2 / expected).sum().item()
        assert chi_square < 35  # 11 degrees of freedom: 35 is exceeded by chance with p < 3e-4


def test_truncation_keeps_exactly_the_allowed_tokens_in_a_mixed_batch():
    params = MIXED[:5]
    rows = [seq(seed=s, **p) for s in range(2_000) for p in params]
    seen = [set() for _ in params]
    for i, token in enumerate(tokens(batch_of(rows), rows)):
        seen[i % len(params)].add(token)
    assert seen == [allowed(ROW, SamplingParams(**p)) for p in params]
    assert [len(s) for s in seen] == [12, 4, 2, 7, 4]


def test_batched_penalties_and_logprobs_equal_their_definitions_row_by_row():
    rows = [seq(prompt=(0, 1, 2), output=(4, 4, 7), repetition_penalty=1.5, logprobs=VOCAB, temperature=0),
            seq(prompt=(3,), output=(0, 0, 0, 9), presence_penalty=-0.7, logprobs=VOCAB, seed=3),
            seq(prompt=(7,), output=(7, 1), frequency_penalty=1.2, logprobs=VOCAB, top_p=0.8, seed=4),
            seq(prompt=(5, 6), output=(6, 6), repetition_penalty=0.8, presence_penalty=0.3,
                frequency_penalty=-0.5, logprobs=VOCAB, top_k=3, seed=5),
            seq(prompt=(8,), output=(8,), logprobs=VOCAB, temperature=0)]
    batched = sample(batch_of(rows), rows)
    for s, (token, info) in zip(rows, batched):
        expected = torch.log_softmax(penalized(ROW, s), -1)
        assert sample(batch_of([s]), [s]) == [(token, info)]
        assert info.token_id == token and info.logprob == pytest.approx(expected[token].item(), abs=1e-5)
        assert list(info.top) == expected.argsort(descending=True, stable=True).tolist()
        assert list(info.top.values()) == pytest.approx(expected.sort(descending=True).values.tolist(), abs=1e-5)


def test_logprobs_come_only_where_asked_and_as_many_as_asked():
    rows = [seq(temperature=0.8, top_p=0.6, logprobs=3, seed=0), seq(temperature=0), seq(logprobs=0, seed=1),
            seq(temperature=0, logprobs=1)]
    (t0, a), (_, b), (t2, c), (t3, d) = sample(batch_of(rows), rows)
    expected = torch.log_softmax(ROW, -1)
    assert b is None and c.top == {} and list(d.top) == [0] and len(a.top) == 3
    assert a.logprob == pytest.approx(expected[t0].item()) and c.logprob == pytest.approx(expected[t2].item())
    assert t3 == 0 and d.logprob == pytest.approx(expected.max().item())


@pytest.mark.parametrize("batch", [
    [seq(temperature=0)] * 3, [seq(temperature=0.8, seed=0), seq(temperature=0, logprobs=2)],
    [seq(top_k=3, seed=1, min_tokens=2, repetition_penalty=1.2),
     seq(min_p=0.2, logprobs=0, presence_penalty=1.0, seed=2)],
])
def test_a_step_copies_to_the_host_once(monkeypatch, batch):
    calls = []
    download = sampler._download
    monkeypatch.setattr(sampler, "_download", lambda packed: calls.append(packed) or download(packed))
    sample(batch_of(batch), batch, eos=[0])
    assert len(calls) == 1 and calls[0].dim() == 1
    assert sampler.sample_async(batch_of(batch), batch, eos=[0]).wait() == sample(batch_of(batch), batch, eos=[0])


def test_the_uniform_numbers_are_splitmix64():
    assert sampler._uniform(0, 0) == (0xE220A8397B1DCDAF >> 12) / 2 ** 52  # SplitMix64(0)'s first output
    assert len({sampler._uniform(seed, step) for seed in range(100) for step in range(100)}) == 10_000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_gpu_samples_what_the_cpu_samples():
    rows = [seq(output=(3,) * i, seed=i, logprobs=2, **params) for i, params in enumerate(MIXED * 20)]
    on_cpu, on_gpu = sample(batch_of(rows), rows), sample(batch_of(rows).cuda(), rows)
    assert [t for t, _ in on_cpu] == [t for t, _ in on_gpu]
    assert [i.logprob for _, i in on_cpu] == pytest.approx([i.logprob for _, i in on_gpu], abs=1e-5)
