"""Faults that ``kiln serve`` survives, over real HTTP on loopback: clients that vanish
mid-stream, a KV cache too small for the load, one request's sampling or detokenization
raising, a model step raising, the serving loop dying, and SIGTERM while requests run."""

import asyncio
import signal
import subprocess
import sys
import time

import httpx
import pytest
from live_server import API_KEY, AUTH, completion, free_port, live_server

from kiln.runtime import RuntimeConfig, llm_engine

PROMPTS = ["The for statement", "Python uses", "The while loop", "A class"]


@pytest.fixture(scope="module")
def alone(bundled_engine):
    """Each prompt's greedy 24 tokens with nothing else running."""
    with live_server(bundled_engine) as server:
        return {p: completion(server.url, prompt=p, max_tokens=24, ignore_eos=True).json()["choices"][0]["text"]
                for p in PROMPTS}


async def _complete_all(url, bodies):
    async with httpx.AsyncClient(timeout=120, headers=AUTH) as client:
        return await asyncio.gather(*(client.post(f"{url}/v1/completions", json={"model": "tiny", "temperature": 0,
                                                                                  **body}) for body in bodies))


def test_500_clients_that_vanish_mid_stream_leak_no_block(bundled_engine):
    async def vanish(client, url, index):
        body = {"model": "tiny", "prompt": PROMPTS[index % 4], "max_tokens": 200, "ignore_eos": True, "stream": True}
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    return  # leaving the block closes the connection mid-stream

    async def run(url):
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(timeout=60, headers=AUTH, limits=limits) as client:
            await asyncio.gather(*(vanish(client, url, i) for i in range(500)))

    with live_server(bundled_engine) as server:
        start = time.perf_counter()
        asyncio.run(run(server.url))
        seconds = time.perf_counter() - start
        assert server.leaked_blocks() == 0 and not server.engine.sequences
        assert server.app.state.admission.admitted == 0
        print(f"500 streams abandoned after their first event in {seconds:.1f} s: 0 blocks leaked")


def test_kv_exhaustion_preempts_and_every_request_completes(bundled_engine, alone):
    with live_server(bundled_engine, RuntimeConfig(num_blocks=12, block_size=16)) as server:
        bodies = [{"prompt": PROMPTS[i % 4], "max_tokens": 24, "ignore_eos": True} for i in range(16)]
        responses = asyncio.run(_complete_all(server.url, bodies))
        assert server.engine.scheduler.preemptions > 0
        assert [r.json()["choices"][0]["text"] for r in responses] == [alone[b["prompt"]] for b in bodies]
        assert server.leaked_blocks() == 0


def _poisoned(seqs):
    return any(seq.params.seed == 666 for seq in seqs)


def test_a_request_whose_sampling_raises_fails_alone(bundled_engine, alone, monkeypatch):
    real = llm_engine.sample_async

    def sample_async(logits, seqs, eos):
        if _poisoned(seqs):
            raise RuntimeError("the sampler met a poisoned request")
        return real(logits, seqs, eos)

    monkeypatch.setattr(llm_engine, "sample_async", sample_async)
    with live_server(bundled_engine) as server:
        bodies = [{"prompt": p, "max_tokens": 24, "ignore_eos": True} for p in PROMPTS]
        bodies.insert(2, {"prompt": "The for", "max_tokens": 24, "seed": 666, "temperature": 1})
        responses = asyncio.run(_complete_all(server.url, bodies))
        failed = responses.pop(2)
        assert failed.status_code == 500 and "sampling failed: RuntimeError: the sampler met a poisoned request" in \
            failed.json()["error"]["message"]
        assert [r.json()["choices"][0]["text"] for r in responses] == [alone[p] for p in PROMPTS]
        assert server.leaked_blocks() == 0


def test_a_request_whose_detokenization_raises_fails_alone(bundled_engine, alone, monkeypatch):
    real = llm_engine.LLMEngine._detokenize

    def detokenize(self, seq, token):
        if seq.params.seed == 666:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a poisoned byte")
        return real(self, seq, token)

    monkeypatch.setattr(llm_engine.LLMEngine, "_detokenize", detokenize)
    with live_server(bundled_engine) as server:
        bodies = [{"prompt": p, "max_tokens": 24, "ignore_eos": True} for p in PROMPTS]
        bodies.insert(1, {"prompt": "The for", "max_tokens": 24, "seed": 666})
        responses = asyncio.run(_complete_all(server.url, bodies))
        failed = responses.pop(1)
        assert failed.status_code == 500 and "UnicodeDecodeError" in failed.json()["error"]["message"]
        assert [r.json()["choices"][0]["text"] for r in responses] == [alone[p] for p in PROMPTS]
        assert server.leaked_blocks() == 0


def test_a_model_step_that_raises_fails_its_requests_and_the_server_goes_on(bundled_engine, alone):
    with live_server(bundled_engine) as server:
        runner = server.engine.runner
        real, calls = runner.run, []

        def run(*args):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return real(*args)

        runner.run = run
        response = completion(server.url, prompt="The for statement", max_tokens=8)
        assert response.status_code == 500 and "illegal memory access" in response.json()["error"]["message"]
        assert server.leaked_blocks() == 0
        again = completion(server.url, prompt="The for statement", max_tokens=24, ignore_eos=True)
        assert again.json()["choices"][0]["text"] == alone["The for statement"]


def test_a_loop_step_that_raises_fails_all_in_flight_and_the_loop_goes_on(bundled_engine, alone):
    with live_server(bundled_engine) as server:
        scheduler = server.engine.scheduler
        real, calls = scheduler.schedule, []

        def schedule():
            calls.append(1)
            if len(calls) == 4:
                raise KeyError("a scheduler bug")
            return real()

        scheduler.schedule = schedule
        responses = asyncio.run(_complete_all(server.url, [{"prompt": p, "max_tokens": 24} for p in PROMPTS]))
        assert {r.status_code for r in responses} == {500}
        assert all("the engine step failed: KeyError" in r.json()["error"]["message"] for r in responses)
        health = httpx.get(f"{server.url}/health", timeout=10).json()
        assert health["status"] == "ok" and health["step_failures"] == 1
        again = completion(server.url, prompt="Python uses", max_tokens=24, ignore_eos=True)
        assert again.json()["choices"][0]["text"] == alone["Python uses"] and server.leaked_blocks() == 0


class _LoopKiller(BaseException):
    """Not an ``Exception``: nothing in the loop catches it."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_tells_a_dead_loop_from_a_live_one(bundled_engine):
    with live_server(bundled_engine) as server:
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200

        def die():
            raise _LoopKiller("the loop thread was killed")

        server.engine.step = die
        stream = httpx.stream("POST", f"{server.url}/v1/completions", headers=AUTH, timeout=30, json={
            "model": "tiny", "prompt": "The", "max_tokens": 4})
        with stream as response:
            assert response.status_code == 503 and b"the serving loop stopped" in response.read()
        health = httpx.get(f"{server.url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "dead"
        assert "_LoopKiller: the loop thread was killed" in health.json()["error"]
        after = completion(server.url, prompt="The")
        assert after.status_code == 503 and after.json()["error"]["code"] == "engine_dead"


def test_sigterm_drains_requests_in_flight_and_refuses_new_ones(saved_engine):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", str(saved_engine), "--port", str(port),
                                "--api-key", API_KEY, "--model-name", "tiny", "--num-blocks", "128",
                                "--drain-timeout", "20"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert process.poll() is None and time.monotonic() < deadline, "kiln serve did not come up"
                time.sleep(0.2)
        body = {"model": "tiny", "prompt": "The for", "max_tokens": 240, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60, headers=AUTH) as client, client.stream("POST", f"{url}/v1/completions",
                                                                           json=body) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while (health := httpx.get(f"{url}/health", timeout=10)).status_code == 200:
                assert time.monotonic() < deadline, "the server did not start draining"
                time.sleep(0.05)
            refused = httpx.post(f"{url}/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": "x"},
                                 timeout=10)
            rest = [line for line in lines if line.startswith("data: ")]
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert health.status_code == 503 and health.json()["status"] == "draining"
        assert first and rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2]
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
