"""What the runtime hands back: a request's output so far, with vLLM's names."""

from __future__ import annotations

from dataclasses import dataclass, field

from .sequence import TokenLogprobs


@dataclass(frozen=True)
class RequestOutput:
    """A request's output: all of it (``text``, ``token_ids``) and, for streaming, what
    is new since the previous output of the same request (``delta_text``,
    ``delta_token_ids``). ``finish_reason`` is ``"stop"``, ``"length"``, ``"abort"`` or
    ``"error"`` once ``finished``. ``prompt_logprobs``, for a request that asks for them,
    holds None for the first prompt token, then each later one's log-probabilities."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    delta_text: str
    delta_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    cached_tokens: int = 0
    error: str | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
