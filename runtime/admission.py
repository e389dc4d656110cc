"""What the server checks before a request reaches the serving loop, and where it turns
the request into token ids.

- The number of requests admitted and not yet finished is bounded (the running batch
  plus ``max_queued``): past it a request gets 429 with ``Retry-After`` at once, instead
  of a queue that grows without end.
- An over-long text is refused before it is tokenized, by a bound that costs nothing: no
  token spells more characters than the vocabulary's longest entry, so a text longer
  than that times the tokens the engine has room for cannot fit.
- Tokenizing (and rendering the chat template) runs on a worker thread, never on the
  asyncio loop nor on the engine's loop: a long prompt delays no other request.
- ``max_tokens`` is checked against the room the prompt leaves: a request that asks for
  more is refused, one that asks for nothing gets the default, cut to the room.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .api_error import APIError
from .llm import chat_text
from .llm_engine import LLMEngine


@dataclass(frozen=True)
class ServerLimits:
    """The server's limits. ``max_queued``: requests admitted beyond the ``max_num_seqs``
    that run at once, before new ones get 429; ``request_timeout``: seconds from admission
    to the last token (None: no limit); ``max_body_bytes``: the largest request body;
    ``drain_timeout``: seconds that SIGTERM waits for requests in flight; ``retry_after``:
    the seconds a 429 or 503 tells the client to wait."""

    max_queued: int = 256
    request_timeout: float | None = 600.0
    max_body_bytes: int = 4 << 20
    drain_timeout: float = 30.0
    retry_after: int = 1

    def __post_init__(self) -> None:
        problems = [f"{name} must be positive, got {value}" for name, value in (
            ("max_queued", self.max_queued), ("max_body_bytes", self.max_body_bytes),
            ("drain_timeout", self.drain_timeout), ("retry_after", self.retry_after),
            ("request_timeout", 1 if self.request_timeout is None else self.request_timeout)) if not value > 0]
        if problems:
            raise ValueError("; ".join(problems))


class Ticket:
    """A request's place among the admitted ones; ``release`` gives it back (once)."""

    def __init__(self, admission: Admission, count: int):
        self._admission, self._count = admission, count

    def release(self) -> None:
        self._admission.admitted -= self._count
        self._count = 0


class Admission:
    """Admits the server's requests to ``engine`` under ``limits``."""

    def __init__(self, engine: LLMEngine, limits: ServerLimits):
        self.engine = engine.engine
        self.limits = limits
        self.max_seq_len = self.engine.info.max_seq_len
        self.capacity = engine.max_num_seqs + limits.max_queued
        self.admitted = 0
        tokenizer = self.engine.tokenizer
        self.longest_token = max(map(len, tokenizer.get_vocab()), default=1) if tokenizer is not None else 1
        # one thread: tokenizations queue behind each other, never behind a model step
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kiln-tokenize")

    def admit(self, count: int = 1) -> Ticket:
        """A ticket for ``count`` more requests; 429 with ``Retry-After`` when they do not fit
        now, 400 when they never could."""
        if count > self.capacity:
            raise APIError(f"the request makes {count} sequences (prompts times n, or best_of); this server admits "
                           f"at most {self.capacity}")
        if self.admitted + count > self.capacity:
            raise APIError(f"the server is at capacity ({self.capacity} requests admitted); retry later", 429,
                           "rate_limit_error", "server_busy", {"Retry-After": str(self.limits.retry_after)})
        self.admitted += count
        return Ticket(self, count)

    async def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """The token ids of a completion prompt, checked against the engine's length."""
        if isinstance(prompt, str):
            self._check_characters(prompt)
            try:
                ids = await self._off_loop(self.engine.encode, prompt)
            except ValueError as exc:
                raise APIError(str(exc)) from None
        else:
            ids = list(prompt)
        self._check_tokens(len(ids))
        return ids

    async def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """The token ids of ``messages`` under the chat template, checked against the engine's length."""
        tokenizer = self.engine.tokenizer

        def render_and_encode() -> list[int]:
            text = chat_text(tokenizer, messages)
            self._check_characters(text)
            return tokenizer.encode(text, add_special_tokens=False)

        try:
            ids = await self._off_loop(render_and_encode)
        except ValueError as exc:
            raise APIError(str(exc)) from None
        self._check_tokens(len(ids))
        return ids

    def max_tokens(self, requested: int | None, default: int, prompt_tokens: int) -> int:
        """The new tokens a request gets: ``requested`` if the prompt leaves room for them
        (else a 400), otherwise ``default`` cut to the room left."""
        room = self.max_seq_len - prompt_tokens
        if requested is None:
            return min(default, room)
        if requested > room:
            raise APIError(f"max_tokens is {requested}, but the prompt's {prompt_tokens} tokens leave room for "
                           f"{room} in this engine's max_seq_len of {self.max_seq_len}")
        return requested

    async def _off_loop(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)

    def _check_characters(self, text: str) -> None:
        fewest = math.ceil(len(text) / self.longest_token)
        if fewest >= self.max_seq_len:
            raise APIError(f"the prompt has {len(text)} characters, at least {fewest} tokens (no token of the "
                           f"vocabulary spells more than {self.longest_token}); this engine serves at most "
                           f"{self.max_seq_len - 1}")

    def _check_tokens(self, count: int) -> None:
        if count >= self.max_seq_len:
            raise APIError(f"the prompt has {count} tokens; this engine serves at most {self.max_seq_len - 1} "
                           f"(max_seq_len {self.max_seq_len}, one token to generate)")
