"""``AsyncLLM``: the serving loop on its own thread, for asyncio callers (the server).

Only the loop thread touches the ``LLMEngine``: callers hand it new requests and
cancellations through a queue, and it hands each request's outputs back to that
request's asyncio queue. A request whose caller goes away (a closed stream, a
disconnected client) is aborted and its blocks freed at the next step.

A step that raises where the engine could not tell which requests it concerned fails
every request in flight, with the error as their message, and the loop goes on. If the
loop itself dies, every waiting caller gets ``EngineDeadError`` and so does every new
request; ``health`` tells a live loop from a dead or stalled one.
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


class EngineDeadError(RuntimeError):
    """The serving loop has stopped; no request can be served."""


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


@dataclass(frozen=True)
class Health:
    """The loop's state: ``live`` unless it died (``error`` says how) or has spent more
    than the stall limit in one iteration while requests wait (``stalled``)."""

    live: bool
    seconds_since_step: float
    step_failures: int
    error: str | None = None

    @property
    def status(self) -> str:
        return "ok" if self.live else ("dead" if self.error else "stalled")


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
        self.heartbeat = time.monotonic()  # when the loop last began an iteration
        self.step_failures = 0
        self.error: str | None = None  # why the loop died

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

    def health(self, stall_after: float = 60.0) -> Health:
        """Whether the loop lives; it counts as stalled after ``stall_after`` seconds in one
        iteration while it has work."""
        since = time.monotonic() - self.heartbeat
        if not self._thread.is_alive():
            return Health(False, since, self.step_failures, self.error or "the serving loop is not running")
        stalled = since > stall_after and bool(self._sinks)
        return Health(not stalled, since, self.step_failures)

    async def generate(self, prompt: str | Sequence[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """The outputs of one request as they come; abandoning the iterator cancels it.
        Raises ``ValueError`` if the engine refuses the request, ``EngineDeadError`` if
        the loop has died."""
        if not self._thread.is_alive():
            raise EngineDeadError(f"the serving loop is not running: {self.error or 'not started'}")
        sink: asyncio.Queue = asyncio.Queue()
        self._inbox.put(_Add(request_id, prompt, params, sink, asyncio.get_running_loop()))
        finished = False
        try:
            while not finished:
                item = await sink.get()
                if isinstance(item, Exception):
                    finished = True
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
        try:
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                self._drain(block=not self.engine.has_unfinished())
                before = self.engine.generated_tokens
                for output in self._step():
                    self._deliver(output.request_id, output, output.finished)
                made = self.engine.generated_tokens - before
                if made:
                    now = time.monotonic()
                    self.recent_tokens = [(t, n) for t, n in self.recent_tokens if now - t <= 60] + [(now, made)]
        except BaseException as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            reason = EngineDeadError(f"the serving loop stopped: {self.error or 'shut down'}")
            while not self._inbox.empty():  # requests added after the last drain
                item = self._inbox.get_nowait()
                if isinstance(item, _Add):
                    self._sinks[item.request_id] = (item.sink, item.loop)
            for request_id in list(self._sinks):
                self._deliver(request_id, reason, True)

    def _step(self) -> list[RequestOutput]:
        try:
            return self.engine.step()
        except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the server
            self.step_failures += 1
            return self.engine.fail_all(f"the engine step failed: {type(exc).__name__}: {exc}")

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
