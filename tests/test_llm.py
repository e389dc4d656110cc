"""The serving core end to end on the bundled model: greedy output equal to transformers,
the same alone or among many concurrent requests (prefix reuse on and off, preemption,
chunked prefill), sampling reproducible per seed, stop conditions, streaming text."""

import pytest
import torch
from hf_models import BUNDLED
from transformers import AutoModelForCausalLM

import kiln
from kiln import LLM, RuntimeConfig, SamplingParams
from kiln.runtime import LLMEngine

PROMPTS = ["The for statement", "A class definition", "The while loop", "Exceptions are raised",
           "Python uses", "The import statement"]


@pytest.fixture(scope="module")
def reference_model():
    return AutoModelForCausalLM.from_pretrained(str(BUNDLED), dtype=torch.float32).eval()


def _greedy(llm, prompts, max_tokens=24, **extra):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **extra)
    return [o.token_ids for o in llm.generate(prompts, params)]


def test_greedy_tokens_match_transformers(bundled_engine, reference_model):
    llm = LLM(bundled_engine, RuntimeConfig(num_blocks=64))
    got = _greedy(llm, PROMPTS[:3])
    tokenizer = bundled_engine.tokenizer
    for prompt, tokens in zip(PROMPTS[:3], got):
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            want = reference_model.generate(ids, max_new_tokens=24, do_sample=False, min_new_tokens=24)
        assert tokens == want[0, ids.shape[1]:].tolist(), prompt


def test_engine_logits_match_transformers(bundled_engine, reference_model):
    ids = torch.randint(0, 2048, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference_model(input_ids=ids, use_cache=False).logits
    assert (bundled_engine.logits(ids) - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("config", [
    RuntimeConfig(num_blocks=200, prefix_caching=True),
    RuntimeConfig(num_blocks=200, prefix_caching=False),
    RuntimeConfig(num_blocks=12, block_size=4, max_num_tokens=16),  # preemption and chunked prefill
    RuntimeConfig(num_blocks=40, block_size=1, max_num_seqs=3),
], ids=["prefix-on", "prefix-off", "preempting", "block-1"])
def test_output_is_the_same_alone_and_among_others(bundled_engine, config):
    alone = {p: _greedy(LLM(bundled_engine, RuntimeConfig(num_blocks=64)), [p], max_tokens=16)[0] for p in PROMPTS}
    llm = LLM(bundled_engine, config)
    # shared prefixes, different lengths, the same prompt twice, and a second round that hits the cache
    batch = [PROMPTS[i % len(PROMPTS)] for i in range(10)]
    lengths = [4 + (3 * i) % 13 for i in range(10)]
    outputs = llm.generate(batch, [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths])
    for prompt, n, out in zip(batch, lengths, outputs):
        assert out.token_ids == alone[prompt][:n], (prompt, n)
    again = llm.generate(batch[:4], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in again] == [alone[p] for p in batch[:4]]
    assert llm.llm_engine.blocks.usage() == 0 and not llm.llm_engine.has_unfinished()
    if config.num_blocks == 12:
        assert llm.llm_engine.scheduler.preemptions > 0


def test_prefix_reuse_serves_cached_tokens(bundled_engine):
    llm = LLM(bundled_engine, RuntimeConfig(num_blocks=64, block_size=4))
    prompt = "The for statement is used to iterate over the elements of a sequence"
    first, second = (llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0))[0] for _ in range(2))
    assert first.cached_tokens == 0 and second.cached_tokens > 0
    assert second.cached_tokens == (len(first.prompt_token_ids) - 1) // 4 * 4
    assert first.token_ids == second.token_ids


def test_seeded_sampling_is_reproducible_whatever_runs_beside_it(bundled_engine):
    llm = LLM(bundled_engine, RuntimeConfig(num_blocks=128))
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=7, ignore_eos=True)
    alone = llm.generate("The for statement", params)[0].token_ids
    crowd = llm.generate(["The while loop", "The for statement", "Python uses"],
                         [SamplingParams(max_tokens=9, temperature=1.2, seed=1), params,
                          SamplingParams(max_tokens=30, temperature=0.5)])
    assert crowd[1].token_ids == alone
    other = llm.generate("The for statement", SamplingParams(max_tokens=20, temperature=0.9, seed=8,
                                                             ignore_eos=True))[0]
    assert other.token_ids != alone


def test_stop_strings_tokens_and_lengths(bundled_engine):
    llm = LLM(bundled_engine, RuntimeConfig(num_blocks=64))
    full = llm.generate("The for statement", SamplingParams(max_tokens=30, temperature=0))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 30
    stop = full.text[8:14]
    cut = llm.generate("The for statement", SamplingParams(max_tokens=30, temperature=0, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    kept = llm.generate("The for statement", SamplingParams(max_tokens=30, temperature=0, stop=stop,
                                                            include_stop_str_in_output=True))[0]
    assert kept.text == full.text[:full.text.index(stop) + len(stop)]
    by_id = llm.generate("The for statement", SamplingParams(max_tokens=30, temperature=0,
                                                             stop_token_ids=[full.token_ids[5]]))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == full.token_ids[:6]


def test_streamed_text_adds_up_across_multibyte_characters(bundled_engine):
    tokenizer = bundled_engine.tokenizer
    emoji = tokenizer.encode("é 🙂 ü")
    assert len(emoji) > 3  # the tiny vocabulary spells these characters over several byte tokens
    llm = LLM(bundled_engine, RuntimeConfig(num_blocks=64))
    pieces, final = [], None
    for out in llm.stream(emoji, SamplingParams(max_tokens=24, temperature=1.0, seed=3, ignore_eos=True)):
        pieces.append(out.delta_text)
        final = out
    assert "".join(pieces) == final.text == tokenizer.decode(final.token_ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces[:-1])


def test_bad_requests_get_clear_errors(bundled_engine):
    llm = LLM(bundled_engine, RuntimeConfig(num_blocks=64))
    with pytest.raises(ValueError, match="serves at most 255"):
        llm.generate([[5] * 300])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[5, 99999]])
    with pytest.raises(ValueError, match="the prompt is empty"):
        llm.generate([""])
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="needs 9 cache blocks"):
        LLM(bundled_engine, RuntimeConfig(num_blocks=8)).generate("x", SamplingParams(max_tokens=140))
    assert llm.generate("The", SamplingParams(max_tokens=2))[0].token_ids  # the engine still serves


def test_load_runs_the_same_engine(saved_engine, bundled_engine):
    loaded = kiln.load(saved_engine)
    want = _greedy(LLM(bundled_engine, RuntimeConfig(num_blocks=64)), PROMPTS[:2])
    assert _greedy(LLM(loaded, RuntimeConfig(num_blocks=64)), PROMPTS[:2]) == want
    assert _greedy(LLM(str(saved_engine), RuntimeConfig(num_blocks=64)), PROMPTS[:2]) == want


def _feeds(engine, params, steps=4):
    """Whether each step after the first read its input tokens on the device (launched
    before the previous step's tokens reached the host)."""
    fed = []
    run = engine.runner.run

    def recording(batch, sampling, feed=None):
        fed.append(feed is not None)
        return run(batch, sampling, feed)

    engine.runner.run = recording
    engine.add_request([5, 6, 7, 8], params)
    for _ in range(steps):
        engine.step()
    return fed[1:]


def test_the_next_step_starts_before_the_tokens_reach_the_host(bundled_engine):
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    assert all(_feeds(LLMEngine(bundled_engine, RuntimeConfig(num_blocks=16)), greedy))
    penalized = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, repetition_penalty=1.3)
    assert not any(_feeds(LLMEngine(bundled_engine, RuntimeConfig(num_blocks=16)), penalized))


def test_penalized_requests_among_greedy_ones_give_their_tokens_alone(bundled_engine):
    penalized = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=1.5)
    alone = LLM(bundled_engine, RuntimeConfig(num_blocks=64)).generate([PROMPTS[0]], penalized)[0].token_ids
    mixed = LLM(bundled_engine, RuntimeConfig(num_blocks=64)).generate(
        PROMPTS[:3], [penalized, SamplingParams(max_tokens=12, temperature=0), penalized])
    assert mixed[0].token_ids == alone
