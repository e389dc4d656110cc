"""Backpressure, limits and security of ``kiln serve``, over real HTTP on loopback: a
20 MB prompt refused at once while other requests go on, 429 with ``Retry-After`` when
the server is full, lengths checked before queuing, the per-request timeout, the API key
on every route but /health, and CORS only when asked (no field silently ignored: ``test_api_fields.py``)."""

import asyncio
import json
import time

import httpx
import pytest
from live_server import AUTH, completion, live_server

from kiln.runtime import RuntimeConfig
from kiln.runtime.admission import ServerLimits


@pytest.fixture(scope="module")
def server(bundled_engine):
    with live_server(bundled_engine, RuntimeConfig(num_blocks=256, max_num_seqs=4),
                     ServerLimits(max_queued=8)) as live:
        yield live


def test_a_20_mb_prompt_is_refused_at_once_while_a_short_request_goes_on(bundled_engine, server):
    huge = "def f(x): return x " * (20_000_000 // 19)

    async def race(url):
        async with httpx.AsyncClient(timeout=60, headers=AUTH) as client:
            async def timed(body):
                start = time.perf_counter()
                response = await client.post(f"{url}/v1/completions", json={"model": "tiny", "max_tokens": 4,
                                                                            "temperature": 0, **body})
                return response, time.perf_counter() - start
            return await asyncio.gather(timed({"prompt": huge}), timed({"prompt": "The for"}))

    (big, big_seconds), (small, small_seconds) = asyncio.run(race(server.url))
    assert big.status_code == 413 and "larger than this server's limit of 4194304 bytes" in big.json()["error"][
        "message"]
    assert small.status_code == 200 and big_seconds < 5 and small_seconds < 5
    with live_server(bundled_engine, limits=ServerLimits(max_body_bytes=64 << 20)) as roomy:
        (big, big_seconds), (small, small_seconds) = asyncio.run(race(roomy.url))
    assert big.status_code == 400 and f"the prompt has {len(huge)} characters" in big.json()["error"]["message"]
    assert small.status_code == 200 and big_seconds < 5 and small_seconds < 5
    print(f"20 MB prompt: refused in {big_seconds:.2f} s; a 4-token request beside it took {small_seconds:.2f} s")


def test_a_chunked_body_over_the_limit_gets_413(server):
    def chunks():
        for _ in range(5):
            yield b"x" * (1 << 20)

    response = httpx.post(f"{server.url}/v1/completions", content=chunks(), headers=AUTH, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_a_full_server_answers_429_with_retry_after_and_serves_the_admitted(server):
    async def load(url):
        async with httpx.AsyncClient(timeout=60, headers=AUTH) as client:
            body = {"model": "tiny", "prompt": "The for", "max_tokens": 40, "ignore_eos": True, "temperature": 0}
            return await asyncio.gather(*(client.post(f"{url}/v1/completions", json=body) for _ in range(20)))

    responses = asyncio.run(load(server.url))
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 12 and codes.count(429) == 8, codes  # 4 running + 8 queued
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "rate_limit_error"
    assert all(len(r.json()["choices"][0]["text"]) > 0 for r in responses if r.status_code == 200)
    assert server.app.state.admission.admitted == 0 and server.leaked_blocks() == 0


def test_lengths_are_checked_against_the_engine_before_queuing(server):
    response = completion(server.url, prompt=[5] * 250, max_tokens=10)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == ("max_tokens is 10, but the prompt's 250 tokens leave room for 6 "
                                                   "in this engine's max_seq_len of 256")
    default = completion(server.url, prompt=[5] * 250, max_tokens=None, ignore_eos=True)
    assert default.json()["usage"]["completion_tokens"] == 6  # the default of 16, cut to the room


def test_a_request_past_its_timeout_gets_408_and_frees_its_blocks(bundled_engine):
    with live_server(bundled_engine, limits=ServerLimits(request_timeout=0.2)) as server:
        response = completion(server.url, prompt="The for", max_tokens=240, ignore_eos=True)
        assert response.status_code == 408 and "timeout of 0.2 s" in response.json()["error"]["message"]
        with httpx.stream("POST", f"{server.url}/v1/completions", headers=AUTH, timeout=30, json={
                "model": "tiny", "prompt": "The for", "max_tokens": 240, "ignore_eos": True, "stream": True}) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["code"] == "request_timeout"
        assert len(events) > 3 and server.leaked_blocks() == 0


@pytest.mark.parametrize("path", ["/v1/models", "/metrics", "/openapi.json", "/docs"])
def test_every_route_but_health_needs_the_api_key(server, path):
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "test-key"}):
        response = httpx.get(f"{server.url}{path}", headers=headers, timeout=10)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}{path}", headers=AUTH, timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"


def test_no_cors_unless_asked(bundled_engine, server):
    preflight = {"origin": "https://evil.example", "access-control-request-method": "POST"}
    response = httpx.options(f"{server.url}/v1/completions", headers=preflight, timeout=10)
    assert "access-control-allow-origin" not in response.headers
    with live_server(bundled_engine, allowed_origins=["https://app.example"]) as open_server:
        allowed = httpx.options(f"{open_server.url}/v1/completions", timeout=10,
                                headers={**preflight, "origin": "https://app.example"})
        refused = httpx.options(f"{open_server.url}/v1/completions", headers=preflight, timeout=10)
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in refused.headers
