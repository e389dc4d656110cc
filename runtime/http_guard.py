"""``Guard``: the ASGI middleware in front of every route of ``kiln serve``.

In order: while the server drains (after SIGTERM) a new request gets 503 with
``Retry-After``; with an API key, a request without it gets 401 (compared in constant
time; ``/health`` stays open to probes); a body larger than the limit gets 413, from its
``Content-Length`` before anything is read, or as soon as a chunked body passes the
limit. It counts the requests in flight, which draining waits for.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass

from .api_error import APIError

OPEN_PATHS = ("/health",)


@dataclass
class ServerState:
    """What the guard and the routes share: whether the server drains, and the requests in flight."""

    draining: bool = False
    in_flight: int = 0


class Guard:
    """ASGI middleware: draining, authorization and the body size limit (see the module)."""

    def __init__(self, app, state: ServerState, api_key: str | None, max_body_bytes: int, retry_after: int):
        self.app, self.state = app, state
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_bytes, self.retry_after = max_body_bytes, retry_after

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is None:
            body, refusal = await self._read_body(scope, receive)
        if refusal is not None:
            return await _respond(send, refusal)
        self.state.in_flight += 1
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.state.in_flight -= 1

    def _refusal(self, scope) -> APIError | None:
        if scope["path"] in OPEN_PATHS:
            return None
        if self.state.draining:
            return APIError("the server is shutting down", 503, "service_unavailable", "shutting_down",
                            {"Retry-After": str(self.retry_after)})
        headers = dict(scope["headers"])
        if self.expected is not None and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            return APIError("invalid API key", 401, "authentication_error", "invalid_api_key")
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit():
            return APIError("the Content-Length header is not a number")
        if int(declared) > self.max_body_bytes:
            return self._too_large()
        return None

    async def _read_body(self, scope, receive) -> tuple[bytes, APIError | None]:
        """The whole body, read up to the limit (the routes need all of it anyway)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"", None  # the client went away: the route sees its disconnect
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return b"", self._too_large()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks), None

    def _too_large(self) -> APIError:
        return APIError(f"the request body is larger than this server's limit of {self.max_body_bytes} bytes", 413,
                        code="request_too_large")


def _replay(body: bytes, receive):
    """A ``receive`` that gives the body read already, then waits on the client (for its disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _respond(send, error: APIError) -> None:
    payload = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
               *((k.lower().encode(), v.encode()) for k, v in error.headers.items())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
