"""``kiln serve`` driven over HTTP on 127.0.0.1 with the real ``openai`` client: completions,
chat, streaming, errors, metrics, cancellation on disconnect, and a bounded load test."""

import asyncio
import re
import statistics
import time

import httpx
import openai
import pytest
from live_server import API_KEY, serve_subprocess


@pytest.fixture(scope="module")
def server(saved_engine):
    with serve_subprocess(saved_engine, "--api-key", API_KEY, "--model-name", "tiny", "--num-blocks", "512") as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


def test_completion(client):
    out = client.completions.create(model="tiny", prompt="The for statement", max_tokens=12, temperature=0)
    assert out.choices[0].text.startswith(" is used to specify cleanup")
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 12
    batch = client.completions.create(model="tiny", prompt=["The for statement", "The while loop"], max_tokens=4,
                                      temperature=0, logprobs=2)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == out.choices[0].text[:len(
        batch.choices[0].text)]
    assert len(batch.choices[1].logprobs.token_logprobs) == 4 and len(batch.choices[1].logprobs.top_logprobs[0]) == 2


def test_streaming_completion_adds_up_to_the_whole(client):
    whole = client.completions.create(model="tiny", prompt="Python uses", max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="Python uses", max_tokens=20, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) > 2


def test_chat_with_the_template_and_streaming(client):
    messages = [{"role": "user", "content": "What does the for statement do?"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
    assert reply.usage.prompt_tokens > 8
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, logprobs=True, top_logprobs=1)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
    assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices[0].logprobs) == 10


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature must be >= 0"),
    (dict(prompt=[[5] * 300]), "serves at most 255"),
    (dict(prompt=[5, 999999]), "outside the vocabulary"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(n=2, stream=True), "stream takes n = 1"),
    (dict(n=10_000), "this server admits at most"),
    (dict(extra_body={"top_p": "high"}), "top_p"),
])
def test_bad_requests_get_400_with_a_message(client, kwargs, message):
    args = dict(model="tiny", prompt="The", max_tokens=4) | kwargs
    with pytest.raises(openai.BadRequestError, match=message) as caught:
        client.completions.create(**args)
    assert caught.value.body["type"] == "invalid_request_error"


def test_unknown_model_api_key_and_malformed_json(server, client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-9", prompt="x", max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    response = httpx.post(f"{server}/v1/completions", content=b"{not json", timeout=10,
                          headers={"authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    assert response.status_code == 400 and "error" in response.json()
    assert [m.id for m in client.models.list()] == ["tiny"]


def _metric(server, name):
    text = httpx.get(f"{server}/metrics", timeout=10, headers={"authorization": f"Bearer {API_KEY}"}).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_a_disconnected_stream_frees_its_request(server, client):
    stream = client.completions.create(model="tiny", prompt="The for statement", max_tokens=200, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 20
    while _metric(server, "kiln_running_sequences") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(server, "kiln_running_sequences") == 0 and _metric(server, "kiln_kv_cache_usage") == 0
    assert client.completions.create(model="tiny", prompt="The", max_tokens=2).choices[0].text is not None


def test_load_of_64_concurrent_streams_completes_every_request(server):
    async def one(client, index):
        start = time.perf_counter()
        first, text = None, ""
        stream = await client.completions.create(model="tiny", prompt=f"The {['for', 'while', 'class'][index % 3]}",
                                                 max_tokens=16 + index % 17, temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True})
        async for chunk in stream:
            if first is None and chunk.choices[0].text:
                first = time.perf_counter() - start
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason
        return first, reason

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=300)
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, i) for i in range(64)))
        return results, time.perf_counter() - start

    results, seconds = asyncio.run(run())
    assert all(reason == "length" for _, reason in results)
    ttft = sorted(first for first, _ in results)
    print(f"64 streams: {64 / seconds:.1f} requests/s, time to first token p50 {statistics.median(ttft):.3f} s, "
          f"p99 {ttft[int(0.99 * len(ttft))]:.3f} s")
    assert _metric(server, "kiln_time_to_first_token_seconds_count") >= 64


def test_n_choices_per_prompt(client):
    out = client.completions.create(model="tiny", prompt=["The for statement", "Python uses"], max_tokens=8, n=3,
                                    temperature=1.0, seed=7)
    assert [c.index for c in out.choices] == list(range(6)) and out.usage.completion_tokens == 48
    assert len({c.text for c in out.choices[:3]}) > 1  # seeds 7, 8, 9: different draws
    again = client.completions.create(model="tiny", prompt="Python uses", max_tokens=8, n=3, temperature=1.0, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in out.choices[3:]]
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          n=2, temperature=0)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content


def test_logit_bias_reaches_the_sampler(client):
    out = client.completions.create(model="tiny", prompt="The for statement", max_tokens=4, temperature=0,
                                    logit_bias={"42": 100}, extra_body={"ignore_eos": True}, logprobs=0)
    assert out.choices[0].logprobs.tokens == [out.choices[0].logprobs.tokens[0]] * 4
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=0, logit_bias={"42": 100}, logprobs=True)
    assert [t.token for t in chat.choices[0].logprobs.content] == out.choices[0].logprobs.tokens[:3]
