"""``APIError``: an HTTP error in OpenAI's format, raised anywhere in the server's path."""

from __future__ import annotations

from collections.abc import Mapping


class APIError(Exception):
    """An error to return in OpenAI's format, with its HTTP status and extra headers
    (``Retry-After`` on a 429 or 503)."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error",
                 code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": None, "code": self.code}}
