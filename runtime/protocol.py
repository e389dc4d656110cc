"""The OpenAI-compatible request bodies, validated with pydantic, and the mapping of
their fields onto ``SamplingParams``. Fields vLLM adds (``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos``, ``min_tokens``, ``stop_token_ids``) are accepted too.

No field is ever silently ignored: an unknown field is refused by name, and so is a
known one that kiln does not do yet (``suffix``; in chat ``response_format`` other than
text, ``tools``, ``tool_choice``). ``user`` is accepted as OpenAI defines it: an
end-user id for abuse monitoring, with no effect on the output.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat

from .sampling_params import SamplingParams


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: FiniteFloat = 1.0
    top_p: FiniteFloat = 1.0
    top_k: int = -1
    min_p: FiniteFloat = 0.0
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: FiniteFloat = 0.0
    frequency_penalty: FiniteFloat = 0.0
    repetition_penalty: FiniteFloat = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    user: str | None = None
    logit_bias: dict[str, FiniteFloat] | None = None

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The request's ``SamplingParams`` with ``max_tokens`` new tokens; ``ValueError``
        names a bad value or a field that kiln does not do."""
        unsupported = self.unsupported()
        if unsupported:
            raise ValueError(f"kiln does not support {', '.join(unsupported)} yet; leave "
                             f"{'it' if len(unsupported) == 1 else 'them'} out")
        if self.n != 1 and self.stream:
            raise ValueError(f"stream takes n = 1, got n = {self.n}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, seed=self.seed,
            stop=tuple(stop), stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, logprobs=logprobs, logit_bias=self._bias())

    def _bias(self) -> dict[int, float]:
        try:
            return {int(token): bias for token, bias in (self.logit_bias or {}).items()}
        except ValueError:
            raise ValueError(f"logit_bias keys must be token ids, got {list(self.logit_bias)[:5]}") from None

    def unsupported(self) -> list[str]:
        """The fields set to something kiln does not do."""
        return []


class CompletionRequest(_Sampling):
    """``POST /v1/completions``. ``echo`` puts the prompt before the completion, and with
    ``logprobs`` the prompt tokens' log-probabilities before the completion's (the first
    token's is null); with ``max_tokens: 0`` only the prompt comes back (how lm-eval and
    vLLM score a text). ``best_of`` candidates are generated for each prompt and the ``n``
    of highest cumulative log-probability returned."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None

    @property
    def candidates(self) -> int:
        """How many completions are generated per prompt (``best_of``, or ``n``)."""
        return self.best_of or self.n

    @property
    def prompt_only(self) -> bool:
        """Whether the prompt alone comes back, with no completion (``max_tokens: 0``)."""
        return self.max_tokens == 0

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        if self.prompt_only and not self.echo:
            raise ValueError("max_tokens 0 takes echo: true (it returns the prompt alone)")
        if self.candidates < self.n:
            raise ValueError(f"best_of must be at least n, got best_of = {self.best_of} and n = {self.n}")
        if self.stream and self.best_of not in (None, 1):
            raise ValueError(f"stream takes best_of = 1, got best_of = {self.best_of}")
        ranked = self.candidates > self.n  # the candidates are ranked by their log-probabilities
        params = super().sampling_params(max(max_tokens, 1), 0 if logprobs is None and ranked else logprobs)
        return dataclasses.replace(params, prompt_logprobs=logprobs if self.echo else None)

    def unsupported(self) -> list[str]:
        return [*super().unsupported(), *(["suffix"] if self.suffix is not None else [])]


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str
    name: str | None = None


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs takes logprobs: true")
        return super().sampling_params(max_tokens, logprobs)

    def unsupported(self) -> list[str]:
        text = self.response_format in (None, {"type": "text"})
        used = {"response_format": not text, "tools": bool(self.tools),
                "tool_choice": self.tool_choice not in (None, "none")}
        return [*super().unsupported(), *(name for name, on in used.items() if on)]
