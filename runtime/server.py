"""``kiln serve``: an OpenAI-compatible HTTP server (FastAPI, uvicorn).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with SSE streaming),
``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus text). Every error
is in OpenAI's format: a bad request gets 400 naming the problem, a full server 429
with ``Retry-After`` (``admission.py``), a missing API key 401, a body over the limit
413 and a draining server 503 (``http_guard.py``), a request past its timeout 408. A
client that goes away cancels its request; a request that fails inside the engine fails
alone. ``/health`` answers 503 when the serving loop is dead or stalled, or the server drains.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from .admission import Admission, ServerLimits, Ticket
from .api_error import APIError
from .async_llm import AsyncLLM, EngineDeadError
from .completion_choices import ChoiceRenderer, prompt_only, rank, token_text
from .http_guard import Guard, ServerState
from .outputs import RequestOutput
from .protocol import ChatRequest, CompletionRequest
from .sampling_params import SamplingParams
from .sequence import TokenLogprobs


class Metrics:
    """The server's Prometheus metrics."""

    def __init__(self, llm: AsyncLLM):
        self.registry = CollectorRegistry()
        engine = llm.engine
        gauges = {
            "kiln_queue_length": ("requests waiting to be scheduled", lambda: engine.num_waiting),
            "kiln_running_sequences": ("sequences in the running batch", lambda: engine.num_running),
            "kiln_kv_cache_usage": ("fraction of KV-cache blocks in use", engine.blocks.usage),
            "kiln_generation_tokens_per_second": ("generated tokens per second over the last 10 s",
                                                  llm.tokens_per_second),
        }
        for name, (doc, read) in gauges.items():
            Gauge(name, doc, registry=self.registry).set_function(read)
        self.requests = Counter("kiln_requests", "finished requests by finish reason", ["finish_reason"],
                                registry=self.registry)
        self.prompt_tokens = Counter("kiln_prompt_tokens", "prompt tokens of finished requests",
                                     registry=self.registry)
        self.generated_tokens = Counter("kiln_generation_tokens", "generated tokens", registry=self.registry)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("kiln_time_to_first_token_seconds", "time to first token", buckets=buckets,
                              registry=self.registry)
        self.itl = Histogram("kiln_inter_token_latency_seconds", "time between tokens of a request",
                             buckets=buckets, registry=self.registry)

    async def observe(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """Pass ``outputs`` through, timing them."""
        start = last = time.monotonic()
        async for output in outputs:
            now = time.monotonic()
            if output.delta_token_ids:
                (self.ttft.observe(now - start) if last == start else
                 self.itl.observe((now - last) / len(output.delta_token_ids)))
                last = now
                self.generated_tokens.inc(len(output.delta_token_ids))
            if output.finished:
                self.requests.labels(output.finish_reason or "unknown").inc()
                self.prompt_tokens.inc(len(output.prompt_token_ids))
            yield output


def create_app(llm: AsyncLLM, model_name: str, api_key: str | None = None, default_max_tokens: int = 16,
               limits: ServerLimits | None = None, allowed_origins: Sequence[str] = ()) -> FastAPI:
    """The FastAPI application serving ``llm`` as ``model_name``, under ``limits``. Browsers
    of ``allowed_origins`` may call it (CORS); no origin may unless given."""
    limits = limits or ServerLimits()
    app = FastAPI(title="kiln", version="1")
    metrics = Metrics(llm)
    tokenizer = llm.engine.engine.tokenizer
    admission = Admission(llm.engine, limits)
    state = ServerState()
    app.state.server_state, app.state.admission = state, admission
    app.add_middleware(Guard, state=state, api_key=api_key, max_body_bytes=limits.max_body_bytes,
                       retry_after=limits.retry_after)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return JSONResponse(APIError(problems or "invalid request").body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return JSONResponse(APIError(str(exc.detail), exc.status_code).body(), status_code=exc.status_code)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(f"the model {name!r} does not exist; this server serves {model_name!r}", 404,
                           code="model_not_found")

    def generate(prompt: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        return metrics.observe(_within(llm.generate(prompt, params, request_id), limits.request_timeout))

    @app.get("/health")
    async def health():
        loop = llm.health()
        body = {"status": "draining" if state.draining and loop.live else loop.status,
                "seconds_since_step": round(loop.seconds_since_step, 3), "step_failures": loop.step_failures}
        if loop.error:
            body["error"] = loop.error
        return JSONResponse(body, status_code=200 if loop.live and not state.draining else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "kiln",
                                            "max_model_len": llm.engine.engine.info.max_seq_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompts = _prompts(body.prompt)
        if body.stream and len(prompts) != 1:
            raise APIError("streaming takes one prompt")
        _params(body, body.max_tokens or default_max_tokens, body.logprobs)  # refuse bad values before any work
        ticket = admission.admit(len(prompts) * body.candidates)
        handed_off = False
        try:
            encoded = [await admission.encode(p) for p in prompts]
            params = [_params(body, admission.max_tokens(body.max_tokens, default_max_tokens, len(ids)), body.logprobs)
                      for ids in encoded]

            def renderer(k: int) -> ChoiceRenderer:  # for one choice of prompt k
                return ChoiceRenderer(tokenizer, prompts[k], encoded[k], body.echo, body.logprobs)

            request_id = llm.new_request_id("cmpl")
            head = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model_name}
            shown = prompt_only if body.prompt_only else (lambda out: out)

            if body.stream:
                stream = renderer(0)

                def chunk(out: RequestOutput) -> dict:
                    out = shown(out)
                    return {**head, "choices": [stream.render(0, out, out.delta_text, _new_logprobs(out))]}

                response = await _sse(generate(encoded[0], params[0], request_id), chunk, ticket)
                handed_off = True
                return response
            finals = [shown(out) for out in await _collect(generate, *_choices(encoded, params, body.candidates),
                                                          request_id, request)]
            chosen = rank(finals, body.candidates, body.n)
            return {**head, "choices": [renderer(i // body.n).render(i, out, out.text, out.logprobs)
                                        for i, out in enumerate(chosen)], "usage": _usage(finals)}
        finally:
            if not handed_off:
                ticket.release()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        requested = body.max_tokens or body.max_completion_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        _params(body, requested or default_max_tokens, top)
        ticket = admission.admit(body.n)
        handed_off = False
        try:
            prompt = await admission.encode_chat([m.model_dump(exclude_none=True) for m in body.messages])
            params = _params(body, admission.max_tokens(requested, default_max_tokens, len(prompt)), top)
            request_id = llm.new_request_id("chatcmpl")
            head = {"id": request_id, "created": int(time.time()), "model": model_name}

            def logprobs_of(items: list[TokenLogprobs]):
                return {"content": _chat_logprobs(tokenizer, items)} if body.logprobs else None

            if body.stream:
                first = [True]

                def chunk(out: RequestOutput) -> dict:
                    delta = {"content": out.delta_text} | ({"role": "assistant"} if first[0] else {})
                    first[0] = False
                    return {**head, "object": "chat.completion.chunk", "choices": [
                        {"index": 0, "delta": delta, "logprobs": logprobs_of(_new_logprobs(out)),
                         "finish_reason": out.finish_reason}]}

                response = await _sse(generate(prompt, params, request_id), chunk, ticket)
                handed_off = True
                return response
            finals = await _collect(generate, *_choices([prompt], [params], body.n), request_id, request)
            return {**head, "object": "chat.completion", "choices": [
                {"index": i, "message": {"role": "assistant", "content": out.text},
                 "logprobs": logprobs_of(out.logprobs), "finish_reason": out.finish_reason}
                for i, out in enumerate(finals)], "usage": _usage(finals)}
        finally:
            if not handed_off:
                ticket.release()

    return app


def _params(body, max_tokens: int, logprobs: int | None):
    try:
        return body.sampling_params(max_tokens, logprobs)
    except ValueError as exc:
        raise APIError(str(exc)) from None


def _choices(prompts: list[list[int]], params: list[SamplingParams], n: int):
    """Each prompt ``n`` times, in OpenAI's order of choices (a prompt's n together); a
    seeded request's copies get seeds ``seed, seed + 1, ...`` so that they differ."""
    copies = [(ids, p if p.seed is None else dataclasses.replace(p, seed=p.seed + j))
              for ids, p in zip(prompts, params) for j in range(n)]
    return [ids for ids, _ in copies], [p for _, p in copies]


def _prompts(prompt: Any) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError("the prompt is empty")
    if all(isinstance(p, int) for p in prompt):
        return [prompt]
    return list(prompt)


def _usage(outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(o.token_ids) for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.cached_tokens for o in outputs)}}


def _chat_logprobs(tokenizer: Any, items: list[TokenLogprobs]) -> list[dict]:
    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return [{**entry(i.token_id, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top.items()]}
            for i in items]


def _new_logprobs(out: RequestOutput) -> list[TokenLogprobs]:
    return out.logprobs[len(out.logprobs) - len(out.delta_token_ids):]


def _failure(out: RequestOutput) -> APIError | None:
    if out.finish_reason == "error":
        return APIError(f"the request failed: {out.error}", 500, "server_error")
    return None


def _as_api_error(exc: Exception) -> APIError:
    """The HTTP error for an exception that ends a request: a refusal by the engine is the
    client's (400), a dead serving loop the server's (503)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return APIError(str(exc), 503, "service_unavailable", "engine_dead")
    return APIError(str(exc))


async def _within(outputs: AsyncIterator[RequestOutput], seconds: float | None) -> AsyncIterator[RequestOutput]:
    """``outputs``, ended by a 408 ``APIError`` (which cancels the request) once ``seconds`` have passed."""
    loop = asyncio.get_running_loop()
    deadline = None if seconds is None else loop.time() + seconds
    try:
        while True:
            try:
                remaining = None if deadline is None else max(deadline - loop.time(), 0)
                yield await asyncio.wait_for(outputs.__anext__(), remaining)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise APIError(f"the request did not finish within this server's timeout of {seconds:g} s", 408,
                               "timeout_error", "request_timeout") from None
    finally:
        await outputs.aclose()


async def _collect(generate, prompts: list[list[int]], params: list, request_id: str,
                   request: Request) -> list[RequestOutput]:
    """Run every prompt to its end; cancel them all if the client disconnects."""
    async def one(index: int) -> RequestOutput:
        final = None
        async for out in generate(prompts[index], params[index], f"{request_id}-{index}"):
            final = out
        return final

    gathered = asyncio.gather(*(one(i) for i in range(len(prompts))))
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait([gathered, watcher], return_when=asyncio.FIRST_COMPLETED)
        if gathered not in done:
            raise APIError("the client disconnected", 499)
        try:
            finals = gathered.result()
        except (ValueError, EngineDeadError) as exc:
            raise _as_api_error(exc) from None
    finally:
        watcher.cancel()
        gathered.cancel()
    for out in finals:
        if (error := _failure(out)) is not None:
            raise error
    return finals


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(outputs: AsyncIterator[RequestOutput], render, ticket: Ticket) -> StreamingResponse:
    """Server-sent events of ``render(output)`` for each output, then ``[DONE]``. An
    error before the first output is an HTTP error; after it, an error event. A client
    that disconnects closes the stream, which cancels the request. The stream releases
    ``ticket`` when it ends."""
    try:
        first = await outputs.__anext__()
    except (ValueError, EngineDeadError, APIError) as exc:
        await outputs.aclose()
        raise _as_api_error(exc) from None

    async def events():
        try:
            out = first
            while True:
                if (error := _failure(out)) is not None:
                    yield f"data: {json.dumps(error.body())}\n\n"
                    break
                yield f"data: {json.dumps(render(out))}\n\n"
                if out.finished:
                    break
                try:
                    out = await outputs.__anext__()
                except (ValueError, EngineDeadError, APIError) as exc:
                    yield f"data: {json.dumps(_as_api_error(exc).body())}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            ticket.release()
            await outputs.aclose()

    return StreamingResponse(events(), media_type="text/event-stream")
