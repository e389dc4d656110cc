"""``SamplingParams``: how to sample one request, with vLLM's names and defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from numbers import Integral, Real


@dataclass(frozen=True)
class SamplingParams:
    """How to sample a request's tokens and when to stop.

    ``temperature=0`` is greedy. ``top_k`` of 0 or -1 and ``top_p=1`` keep every token;
    ``min_p`` drops tokens less likely than ``min_p`` times the most likely one.
    ``repetition_penalty`` (>1 discourages) applies to prompt and output tokens,
    ``presence_penalty`` and ``frequency_penalty`` to output tokens, as OpenAI defines
    them. ``seed`` makes a sampled request reproducible whatever else runs beside it.
    Generation stops at ``max_tokens``, at a ``stop`` string (left out of the text unless
    ``include_stop_str_in_output``), at a token of ``stop_token_ids``, or at the model's
    end-of-sequence tokens unless ``ignore_eos``; never before ``min_tokens``.
    ``logprobs=k`` returns the sampled token's log-probability and the k most likely;
    ``prompt_logprobs=k`` does the same for every prompt token after the first, given the
    tokens before it (vLLM's name; such a request reuses no cached prefix whose logits it needs).
    ``logit_bias`` (a mapping or pairs of token id and bias in [-100, 100]) is added to
    those tokens' logits before anything else.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else _items(self.stop, "stop"))
        object.__setattr__(self, "stop_token_ids", _items(self.stop_token_ids, "stop_token_ids"))
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        _check_types(self)
        problems = [message for bad, message in (
            (self.max_tokens < 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.temperature < 0, f"temperature must be >= 0, got {self.temperature}"),
            (not 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k < -1, f"top_k must be -1 (off), 0 (off) or positive, got {self.top_k}"),
            (not 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty <= 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (not -2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (not -2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (not 0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be in [0, max_tokens], got {self.min_tokens}"),
            (self.logprobs is not None and not 0 <= self.logprobs <= 20,
             f"logprobs must be in [0, 20], got {self.logprobs}"),
            (self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20,
             f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}"),
            (any(not s for s in self.stop), "stop strings must not be empty"),
        ) if bad]
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        """Whether the most likely token is always taken."""
        return self.temperature == 0 or self.top_k == 1


def _check_types(params: SamplingParams) -> None:
    """Refuse a field of the wrong type, or a float that is not finite, naming it."""
    for f in fields(params):
        value = getattr(params, f.name)
        if (f.type == "int" or f.type == "int | None" and value is not None) and (
                isinstance(value, bool) or not isinstance(value, Integral)):
            raise ValueError(f"{f.name} must be an integer, got {value!r}")
        if f.type == "float" and (isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value)):
            raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        if f.type == "bool" and not isinstance(value, bool):
            raise ValueError(f"{f.name} must be True or False, got {value!r}")
    if not all(isinstance(s, str) for s in params.stop):
        raise ValueError(f"stop must hold strings, got {params.stop!r}")
    if not all(isinstance(t, Integral) and not isinstance(t, bool) for t in params.stop_token_ids):
        raise ValueError(f"stop_token_ids must hold integers, got {params.stop_token_ids!r}")
    object.__setattr__(params, "stop_token_ids", tuple(int(t) for t in params.stop_token_ids))


def _items(values, name: str) -> tuple:
    try:
        return tuple(values)
    except TypeError:
        raise ValueError(f"{name} must be a sequence, got {values!r}") from None


def _bias_pairs(bias) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as sorted (token id, bias) pairs, checked."""
    pairs = _items(bias.items() if isinstance(bias, dict) else bias, "logit_bias")
    for pair in pairs:
        token, amount = pair if isinstance(pair, tuple | list) and len(pair) == 2 else (None, None)
        if isinstance(token, bool) or not isinstance(token, Integral) or token < 0:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {pair!r}")
        if isinstance(amount, bool) or not isinstance(amount, Real) or not -100 <= amount <= 100:
            raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {pair!r}")
    return tuple(sorted((int(token), float(amount)) for token, amount in pairs))
