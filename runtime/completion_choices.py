"""The choices of a ``/v1/completions`` response, in OpenAI's legacy format: the prompt
echoed before the completion (``echo``), log-probabilities with their text offsets, the
``best_of`` ranking, and the prompt alone for ``max_tokens: 0``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from .outputs import RequestOutput
from .sequence import TokenLogprobs


def token_text(tokenizer: Any, token_id: int) -> str:
    """The text of one token (its id as text where there is no tokenizer)."""
    return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)


def rank(outputs: Sequence[RequestOutput], candidates: int, n: int) -> list[RequestOutput]:
    """Of each prompt's ``candidates`` outputs (consecutive in ``outputs``), the ``n`` of
    highest cumulative log-probability, best first (all of them, in order, when
    ``candidates == n``)."""
    if candidates == n:
        return list(outputs)
    ranked = []
    for start in range(0, len(outputs), candidates):
        group = outputs[start:start + candidates]
        ranked += sorted(group, key=lambda out: -sum(item.logprob for item in out.logprobs))[:n]
    return ranked


def prompt_only(out: RequestOutput) -> RequestOutput:
    """``out`` without its completion: what ``max_tokens: 0`` returns (vLLM generates one
    token for it and drops it too)."""
    return dataclasses.replace(out, text="", token_ids=[], delta_text="", delta_token_ids=[], logprobs=[],
                               finish_reason="length" if out.finished else None)


@dataclasses.dataclass
class ChoiceRenderer:
    """Renders the choices of one prompt, whole or as stream chunks: ``echo`` puts the
    prompt (as given, text or token ids, which are decoded only then, once the engine
    has accepted them; and ``prompt_ids``) before the first text rendered, and, with
    ``logprobs`` (the request's top count), its tokens' log-probabilities before the
    completion's. ``text_offset`` counts characters from the start of the choice's text,
    across chunks."""

    tokenizer: Any
    prompt: str | list[int]
    prompt_ids: list[int]
    echo: bool
    logprobs: int | None
    offset: int = 0
    echoed: bool = False

    def render(self, index: int, out: RequestOutput, text: str, items: list[TokenLogprobs]) -> dict:
        """The choice ``index`` holding ``text`` and the log-probabilities ``items`` of
        ``out``'s tokens (a whole output's, or a chunk's new ones)."""
        ids = [item.token_id for item in items]
        entries: list[TokenLogprobs | None] = list(items)
        if self.echo and not self.echoed:
            self.echoed = True
            text = self._prompt_text() + text
            ids = self.prompt_ids + ids
            entries = list(out.prompt_logprobs or [None] * len(self.prompt_ids)) + entries
        logprobs = None if self.logprobs is None else self._logprobs(ids, entries)
        self.offset += len(text)
        return {"index": index, "text": text, "finish_reason": out.finish_reason, "logprobs": logprobs}

    def _prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        return self.tokenizer.decode(self.prompt_ids) if self.tokenizer is not None else ""

    def _logprobs(self, ids: list[int], entries: list[TokenLogprobs | None]) -> dict:
        tokens = [token_text(self.tokenizer, token) for token in ids]
        offsets, at = [], self.offset
        for token in tokens:
            offsets.append(at)
            at += len(token)
        return {"tokens": tokens,
                "token_logprobs": [None if e is None else e.logprob for e in entries],
                "top_logprobs": [None if e is None else {token_text(self.tokenizer, t): lp for t, lp in e.top.items()}
                                 for e in entries],
                "text_offset": offsets}
