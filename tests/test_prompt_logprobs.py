"""Prompt log-probabilities (``SamplingParams(prompt_logprobs=k)``) on the bundled model:
equal to transformers' log-softmax of its own logits, whole or in prefill chunks, beside
requests that fill the prefix cache with the same prompt, and through preemption."""

import pytest
import torch
from hf_models import BUNDLED
from transformers import AutoModelForCausalLM

from kiln import LLM, RuntimeConfig, SamplingParams
from kiln.runtime.batch import SequenceStep, step_inputs

PROMPTS = [("The for statement is used to specify cleanup actions that must be executed. The while loop repeats "
            "a block of statements as long as its condition holds"),
           "A class definition", "Exceptions are raised when", "x"]


@pytest.fixture(scope="module")
def reference():
    """Per prompt: transformers' float32 log-probabilities [tokens, vocab] at each position."""
    model = AutoModelForCausalLM.from_pretrained(str(BUNDLED), dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float(), -1)
    return logprobs


def _check(output, reference, k: int) -> None:
    ids = output.prompt_token_ids
    want = reference(ids)
    got = output.prompt_logprobs
    assert len(got) == len(ids) and got[0] is None
    for position, entry in enumerate(got[1:]):
        row = want[position]
        assert entry.token_id == ids[position + 1]
        assert abs(entry.logprob - row[entry.token_id].item()) < 1e-4
        best = row.topk(k)
        assert list(entry.top) == best.indices.tolist()
        assert max(abs(a - b) for a, b in zip(entry.top.values(), best.values.tolist())) < 1e-4 if k else True


@pytest.mark.parametrize("config, preempts", [
    (RuntimeConfig(num_blocks=64), False),
    (RuntimeConfig(num_blocks=64, block_size=4, max_num_tokens=8), False),  # prefill in chunks of 8 or fewer
    (RuntimeConfig(num_blocks=14, block_size=4, max_num_tokens=16), True),
], ids=["whole", "chunked", "preempted"])
def test_prompt_logprobs_equal_transformers(bundled_engine, reference, config, preempts):
    llm = LLM(bundled_engine, config)
    scored = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, prompt_logprobs=3)
    plain = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    # the same prompts without prompt logprobs first, so that the prefix cache holds them
    llm.generate(PROMPTS, plain)
    outputs = llm.generate(PROMPTS + PROMPTS[:2], [scored] * len(PROMPTS) + [plain] * 2)
    for output in outputs[:len(PROMPTS)]:
        _check(output, reference, 3)
        assert output.cached_tokens == 0
    assert outputs[-2].prompt_logprobs is None and outputs[-2].cached_tokens > 0
    assert (llm.llm_engine.scheduler.preemptions > 0) == preempts
    alone = llm.generate(PROMPTS, plain)
    assert [o.token_ids for o in outputs[:len(PROMPTS)]] == [o.token_ids for o in alone]


def test_zero_top_and_the_sampled_tokens_unchanged(bundled_engine, reference):
    llm = LLM(bundled_engine, RuntimeConfig(num_blocks=64))
    [output] = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=0, logprobs=0))
    _check(output, reference, 0)
    assert all(not entry.top for entry in output.prompt_logprobs[1:])
    assert len(output.logprobs) == 4


def test_logits_rows_are_the_last_of_each_sequence():
    steps = [SequenceStep([1, 2, 3], 0, [0]), SequenceStep([4], 5, [1]), SequenceStep([5, 6, 7, 8], 2, [2])]
    assert step_inputs(steps, 16, sampling=[2, 0, 3])["logits_indices"].tolist() == [1, 2, 5, 6, 7]
    assert step_inputs(steps, 16, sampling=[True, False, True])["logits_indices"].tolist() == [2, 7]


def test_prompt_logprobs_out_of_range_are_refused():
    with pytest.raises(ValueError, match="prompt_logprobs must be in"):
        SamplingParams(prompt_logprobs=21)
