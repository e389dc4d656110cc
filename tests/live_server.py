"""``kiln serve`` for tests, on a free loopback port: an application run in this process by
uvicorn on a thread, so that tests can reach into its engine (faults, counts) while real
HTTP clients talk to it (``live_server``); or the ``kiln serve`` command in a subprocess
(``serve_subprocess``)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import uvicorn

from kiln.runtime import LLMEngine, RuntimeConfig
from kiln.runtime.admission import ServerLimits
from kiln.runtime.async_llm import AsyncLLM
from kiln.runtime.server import create_app

API_KEY = "test-key"
AUTH = {"authorization": f"Bearer {API_KEY}"}


@dataclass
class LiveServer:
    url: str
    llm: AsyncLLM
    app: object

    @property
    def engine(self) -> LLMEngine:
        return self.llm.engine

    def leaked_blocks(self) -> int:
        """Blocks held by some sequence once every request has ended (0 when none leaked)."""
        deadline = time.monotonic() + 10
        while (self.engine.has_unfinished() or self.engine.sequences) and time.monotonic() < deadline:
            time.sleep(0.02)
        return len(self.engine.blocks.blocks) - self.engine.blocks.num_free


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(process: subprocess.Popen, port: int, timeout_s: float = 120) -> str:
    """The URL of the ``kiln serve`` in ``process`` once /health answers (at most ``timeout_s``)."""
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"kiln serve exited: {process.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"kiln serve did not come up in {timeout_s:.0f} s")


@contextlib.contextmanager
def serve_subprocess(engine_dir, *options: str) -> Iterator[str]:
    """Run ``kiln serve ENGINE_DIR OPTIONS`` in a subprocess on a free port; its URL once it
    is healthy. The server is terminated (and waited for) when the block ends."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", str(engine_dir), *options,
                                "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield wait_until_healthy(process, port)
    finally:
        process.terminate()
        process.wait(timeout=60)


@contextlib.contextmanager
def live_server(engine, runtime: RuntimeConfig | None = None, limits: ServerLimits | None = None,
                **app_options) -> Iterator[LiveServer]:
    """Serve ``engine`` (an ``Engine``) on 127.0.0.1 until the block ends."""
    llm = AsyncLLM(LLMEngine(engine, runtime or RuntimeConfig(num_blocks=256)))
    app = create_app(llm, "tiny", API_KEY, 16, limits, **app_options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    llm.start()
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the in-process server did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(url, llm, app)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        llm.shutdown()


def completion(url: str, timeout: float = 60, **body) -> httpx.Response:
    """POST a completion (model "tiny", greedy, 8 tokens unless given)."""
    return httpx.post(f"{url}/v1/completions", json={"model": "tiny", "temperature": 0, "max_tokens": 8, **body},
                      headers=AUTH, timeout=timeout)
