"""Running ``kiln serve``: uvicorn, with a SIGTERM (or Ctrl-C) that drains.

The first signal stops new work, not the work in flight: new requests get 503 with
``Retry-After`` (a load balancer moves on), ``/health`` says ``draining``, and requests in
flight run to their end for up to ``drain_timeout`` seconds; then the server exits. A
second signal exits at once.
"""

from __future__ import annotations

import time

import uvicorn
from fastapi import FastAPI

from .http_guard import ServerState


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal drains ``state`` (see the module)."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float):
        super().__init__(config)
        self.state, self.drain_timeout = state, drain_timeout
        self.drain_deadline: float | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.drain_deadline is None:
            self.state.draining = True
            self.drain_deadline = time.monotonic() + self.drain_timeout
            return
        self.force_exit = True
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and (self.state.in_flight == 0 or time.monotonic() > self.drain_deadline):
            self.should_exit = True
        return await super().on_tick(counter)


def run_server(app: FastAPI, host: str, port: int, drain_timeout: float) -> None:
    """Serve ``app`` (made by ``create_app``) on ``host:port`` until a signal has drained it."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=1)
    DrainingServer(config, app.state.server_state, drain_timeout).run()
