"""``echo`` with prompt log-probabilities, ``max_tokens: 0``, ``best_of`` and chat
``top_logprobs``, over HTTP with the real ``openai`` client; the prompt's log-probabilities
equal transformers' own."""

import httpx
import openai
import pytest
import torch
from hf_models import BUNDLED
from live_server import API_KEY, AUTH, live_server
from transformers import AutoModelForCausalLM

PROMPT = "The for statement is used to specify cleanup actions"


@pytest.fixture(scope="module")
def server(bundled_engine):
    with live_server(bundled_engine) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def test_echo_with_max_tokens_0_scores_the_prompt_as_transformers_does(client, bundled_engine):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    choice = out.choices[0]
    assert choice.text == PROMPT and out.usage.completion_tokens == 0 and choice.finish_reason == "length"
    ids = bundled_engine.tokenizer.encode(PROMPT)
    model = AutoModelForCausalLM.from_pretrained(str(BUNDLED), dtype=torch.float32).eval()
    with torch.no_grad():
        want = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids) and logprobs.token_logprobs[0] is None
    assert logprobs.top_logprobs[0] is None
    for position, (got, top) in enumerate(zip(logprobs.token_logprobs[1:], logprobs.top_logprobs[1:])):
        assert abs(got - want[position, ids[position + 1]].item()) < 1e-4
        assert abs(max(top.values()) - want[position].max().item()) < 1e-4
    assert "".join(logprobs.tokens) == PROMPT
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(ids))]


def test_echo_puts_the_prompt_before_the_completion(client):
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    echoed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2,
                                       echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    tail = echoed.choices[0].logprobs
    assert tail.tokens[-5:] == plain.choices[0].logprobs.tokens
    assert tail.token_logprobs[-5:] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-5)
    assert tail.text_offset[-5] == len(PROMPT)
    ids = client.completions.create(model="tiny", prompt=[[5, 6, 7]], max_tokens=0, echo=True)
    assert ids.choices[0].text and ids.choices[0].logprobs is None
    two = client.completions.create(model="tiny", prompt=[PROMPT, "A class"], max_tokens=3, temperature=0, n=2,
                                    echo=True, logprobs=0)
    assert [c.text[:len(PROMPT)] for c in two.choices[:2]] == [PROMPT] * 2
    assert all(c.text.startswith("A class") and c.logprobs.text_offset[0] == 0 for c in two.choices[2:])


def test_echo_streams_the_prompt_first(client):
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, echo=True,
                                      logprobs=0)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, echo=True,
                                            logprobs=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    streamed = [lp for c in chunks for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == whole.choices[0].logprobs.token_logprobs
    offsets = [o for c in chunks for o in c.choices[0].logprobs.text_offset]
    assert offsets == whole.choices[0].logprobs.text_offset


def test_best_of_returns_the_candidates_of_highest_cumulative_logprob(client):
    kwargs = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 7}
    candidates = client.completions.create(n=4, logprobs=0, **kwargs).choices
    total = {c.text: sum(c.logprobs.token_logprobs) for c in candidates}
    assert len(total) > 1  # the candidates differ
    best = client.completions.create(n=2, best_of=4, **kwargs)
    assert [c.text for c in best.choices] == sorted(total, key=lambda text: -total[text])[:2]
    assert best.choices[0].logprobs is None and best.usage.completion_tokens == 24
    for bad, message in (({"n": 3, "best_of": 2}, "best_of must be at least n"),
                         ({"best_of": 2, "stream": True}, "stream takes best_of = 1")):
        with pytest.raises(openai.BadRequestError, match=message):
            client.completions.create(**kwargs, **bad)


def test_chat_top_logprobs(client):
    messages = [{"role": "user", "content": "Hello"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == entry.logprob  # greedy: the top
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                 reverse=True)
    with pytest.raises(openai.BadRequestError, match="top_logprobs takes logprobs: true"):
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, top_logprobs=3)


def test_max_tokens_0_takes_echo(server):
    response = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 0},
                          headers=AUTH, timeout=30)
    assert response.status_code == 400 and "max_tokens 0 takes echo" in response.json()["error"]["message"]
