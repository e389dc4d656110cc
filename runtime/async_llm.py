"""``AsyncLLM``: the serving loop on its own thread, for asyncio callers (the server).

Only the loop thread touches the ``LLMEngine``: callers hand it new requests and
cancellations through a queue, and it hands each request's outputs back to that
request's asyncio queue. A request whose caller goes away (a closed stream, a
disconnected client) is aborted and its blocks freed at the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt: str | Sequence[int]
    params: SamplingParams
    sink: asyncio.Queue
    loop: asyncio.AbstractEventLoop


@dataclass(frozen=True)
class _Abort:
    request_id: str


class AsyncLLM:
    """Runs an ``LLMEngine`` on a background thread; ``generate`` streams a request's outputs."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.Queue[_Add | _Abort] = queue.Queue()
        self._sinks: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kiln-engine", daemon=True)
        self._next_id = 0
        self.recent_tokens: list[tuple[float, int]] = []  # (time, tokens) per step, for the rate

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(_Abort(""))
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.engine.close()  # its tensor-parallel workers, if any

    def new_request_id(self, prefix: str = "cmpl") -> str:
        self._next_id += 1
        return f"{prefix}-{self._next_id}-{time.monotonic_ns() % 10**9}"

    async def generate(self, prompt: str | Sequence[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """The outputs of one request as they come; abandoning the iterator cancels it.
        Raises ``ValueError`` if the engine refuses the request."""
        sink: asyncio.Queue = asyncio.Queue()
        self._inbox.put(_Add(request_id, prompt, params, sink, asyncio.get_running_loop()))
        finished = False
        try:
            while not finished:
                item = await sink.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._inbox.put(_Abort(request_id))

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last ``window`` seconds."""
        now = time.monotonic()
        recent = [n for t, n in list(self.recent_tokens) if now - t <= window]
        return sum(recent) / window

    # the loop thread -------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.engine.has_unfinished())
            before = self.engine.generated_tokens
            for output in self.engine.step():
                self._deliver(output.request_id, output, output.finished)
            made = self.engine.generated_tokens - before
            if made:
                now = time.monotonic()
                self.recent_tokens = [(t, n) for t, n in self.recent_tokens if now - t <= 60] + [(now, made)]

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item: _Add | _Abort) -> None:
        if isinstance(item, _Abort):
            self._sinks.pop(item.request_id, None)
            self.engine.abort(item.request_id)
            return
        self._sinks[item.request_id] = (item.sink, item.loop)
        try:
            self.engine.add_request(item.prompt, item.params, item.request_id)
        except ValueError as exc:
            self._deliver(item.request_id, exc, True)

    def _deliver(self, request_id: str, item: RequestOutput | Exception, last: bool) -> None:
        target = self._sinks.pop(request_id, None) if last else self._sinks.get(request_id)
        if target is None:
            return
        sink, loop = target
        if not loop.is_closed():
            loop.call_soon_threadsafe(sink.put_nowait, item)
