"""A request as the runtime tracks it: its tokens, how many are in the KV cache, its
blocks, and what it has produced so far."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from .detokenizer import IncrementalDetokenizer
from .sampling_params import SamplingParams


PENDING = -1  # the place of a token that the device is sampling; the step after reads it there


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprobs:
    """The sampled token's log-probability and the most likely tokens' (id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float]


@dataclass(eq=False)
class Sequence:
    """One request's sequence. ``tokens`` holds the prompt then the output; the first
    ``num_cached`` of them have keys and values in the cache blocks of ``block_table``."""

    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(init=False)
    num_cached: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of the full blocks, in order
    status: Status = Status.WAITING
    finish_reason: str | None = None
    text: str = ""
    emitted_text: int = 0  # characters of text already handed out
    emitted_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # of prompt tokens 1, 2, ... so far
    detokenizer: IncrementalDetokenizer | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    preemptions: int = 0
    cached_prompt_tokens: int = 0  # tokens found in the prefix cache when last admitted
    pending: int = 0  # tokens at the end of ``tokens`` being sampled on the device (PENDING until known)

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt_ids)

    def attach_tokenizer(self, tokenizer: Any) -> None:
        """Start detokenizing the output with ``tokenizer``."""
        self.detokenizer = IncrementalDetokenizer(tokenizer, self.prompt_ids, self.params.skip_special_tokens)

    @property
    def output_ids(self) -> list[int]:
        """The output tokens known on the host (not those still being sampled)."""
        return self.tokens[len(self.prompt_ids):len(self.tokens) - self.pending]

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_uncached(self) -> int:
        """Tokens still to run through the model (the whole prompt at first, then one)."""
        return len(self.tokens) - self.num_cached

    @property
    def prompt_logits_from(self) -> int | None:
        """The first prompt position whose logits the prompt's log-probabilities still need
        (position p's logits score token p + 1), or None when they need no more."""
        done = len(self.prompt_logprobs)
        return done if self.params.prompt_logprobs is not None and done < len(self.prompt_ids) - 1 else None

    @property
    def reusable_prefix(self) -> int:
        """How many leading tokens may come from the prefix cache: all but the last (its
        logits are needed), and none whose logits the prompt's log-probabilities still need."""
        needed = self.prompt_logits_from
        return self.num_tokens - 1 if needed is None else min(self.num_tokens - 1, needed)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
