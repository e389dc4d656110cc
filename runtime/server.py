"""``kiln serve``: an OpenAI-compatible HTTP server (FastAPI, uvicorn).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with SSE streaming),
``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus text). A bad request
gets HTTP 400 in OpenAI's error format; a client that goes away cancels its request; a
request that fails inside the engine fails alone.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .async_llm import AsyncLLM
from .llm import apply_chat_template
from .outputs import RequestOutput
from .protocol import ChatRequest, CompletionRequest
from .sequence import TokenLogprobs


class APIError(Exception):
    """An error to return in OpenAI's format."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": None, "code": self.code}}


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


def create_app(llm: AsyncLLM, model_name: str, api_key: str | None = None, default_max_tokens: int = 16) -> FastAPI:
    """The FastAPI application serving ``llm`` as ``model_name``."""
    app = FastAPI(title="kiln", version="1")
    metrics = Metrics(llm)
    tokenizer = llm.engine.engine.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return JSONResponse(APIError(problems or "invalid request").body(), status_code=400)

    @app.middleware("http")
    async def _authorize(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/") and \
                request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse(APIError("invalid API key", 401, "authentication_error", "invalid_api_key").body(),
                                status_code=401)
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(f"the model {name!r} does not exist; this server serves {model_name!r}", 404,
                           code="model_not_found")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

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
        params = _params(body, default_max_tokens, body.logprobs)
        prompts = _prompts(body.prompt)
        if body.stream and len(prompts) != 1:
            raise APIError("streaming takes one prompt")
        request_id = llm.new_request_id("cmpl")
        created = int(time.time())
        head = {"id": request_id, "object": "text_completion", "created": created, "model": model_name}

        def choice(index: int, out: RequestOutput, text: str, logprobs: list[TokenLogprobs]) -> dict:
            return {"index": index, "text": text, "finish_reason": out.finish_reason,
                    "logprobs": _completion_logprobs(tokenizer, logprobs) if body.logprobs is not None else None}

        if body.stream:
            stream = metrics.observe(llm.generate(prompts[0], params, request_id))
            return await _sse(stream, lambda out: {**head, "choices": [choice(0, out, out.delta_text, out.logprobs[
                len(out.logprobs) - len(out.delta_token_ids):])]})
        finals = await _collect(llm, metrics, prompts, params, request_id, request)
        return {**head, "choices": [choice(i, out, out.text, out.logprobs) for i, out in enumerate(finals)],
                "usage": _usage(finals)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        if body.max_completion_tokens and not body.max_tokens:
            body.max_tokens = body.max_completion_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = _params(body, default_max_tokens, top)
        try:
            prompt = apply_chat_template(tokenizer, [m.model_dump() for m in body.messages])
        except ValueError as exc:
            raise APIError(str(exc)) from None
        request_id = llm.new_request_id("chatcmpl")
        head = {"id": request_id, "created": int(time.time()), "model": model_name}

        def logprobs_of(items: list[TokenLogprobs]):
            return {"content": _chat_logprobs(tokenizer, items)} if body.logprobs else None

        if body.stream:
            first = [True]

            def chunk(out: RequestOutput) -> dict:
                delta = {"role": "assistant", "content": out.delta_text} if first[0] else {"content": out.delta_text}
                first[0] = False
                items = out.logprobs[len(out.logprobs) - len(out.delta_token_ids):]
                return {**head, "object": "chat.completion.chunk", "choices": [
                    {"index": 0, "delta": delta, "logprobs": logprobs_of(items), "finish_reason": out.finish_reason}]}

            return await _sse(metrics.observe(llm.generate(prompt, params, request_id)), chunk)
        (out,) = await _collect(llm, metrics, [prompt], params, request_id, request)
        return {**head, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": out.text}, "logprobs": logprobs_of(out.logprobs),
             "finish_reason": out.finish_reason}], "usage": _usage([out])}

    return app


def _params(body, default_max_tokens: int, logprobs: int | None):
    try:
        return body.sampling_params(default_max_tokens, logprobs)
    except ValueError as exc:
        raise APIError(str(exc)) from None


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


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)


def _completion_logprobs(tokenizer: Any, items: list[TokenLogprobs]) -> dict:
    return {"tokens": [_token_text(tokenizer, i.token_id) for i in items],
            "token_logprobs": [i.logprob for i in items],
            "top_logprobs": [{_token_text(tokenizer, t): lp for t, lp in i.top.items()} for i in items],
            "text_offset": []}


def _chat_logprobs(tokenizer: Any, items: list[TokenLogprobs]) -> list[dict]:
    def entry(token_id: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return [{**entry(i.token_id, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top.items()]}
            for i in items]


def _failure(out: RequestOutput) -> APIError | None:
    if out.finish_reason == "error":
        return APIError(f"the request failed: {out.error}", 500, "server_error")
    return None


async def _collect(llm: AsyncLLM, metrics: Metrics, prompts: list, params, request_id: str,
                   request: Request) -> list[RequestOutput]:
    """Run every prompt to its end; cancel them all if the client disconnects."""
    async def one(index: int, prompt) -> RequestOutput:
        final = None
        async for out in metrics.observe(llm.generate(prompt, params, f"{request_id}-{index}")):
            final = out
        return final

    gathered = asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait([gathered, watcher], return_when=asyncio.FIRST_COMPLETED)
        if gathered not in done:
            raise APIError("the client disconnected", 499)
        try:
            finals = gathered.result()
        except ValueError as exc:
            raise APIError(str(exc)) from None
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


async def _sse(outputs: AsyncIterator[RequestOutput], render) -> StreamingResponse:
    """Server-sent events of ``render(output)`` for each output, then ``[DONE]``. An
    error before the first output is an HTTP 400; after it, an error event. A client
    that disconnects closes the stream, which cancels the request."""
    try:
        first = await outputs.__anext__()
    except ValueError as exc:
        raise APIError(str(exc)) from None

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
                out = await outputs.__anext__()
            yield "data: [DONE]\n\n"
        finally:
            await outputs.aclose()

    return StreamingResponse(events(), media_type="text/event-stream")
