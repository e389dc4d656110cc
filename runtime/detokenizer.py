"""Incremental detokenization: the text of each new token, right across multi-byte
characters that several tokens spell together."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CONTEXT = 6  # prompt tokens decoded with the output, so that a first token's leading space survives


class IncrementalDetokenizer:
    """Turns a growing list of output tokens into text pieces. A piece is held back while
    it ends in an incomplete UTF-8 character (decoded as U+FFFD)."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self.tokenizer = _fast_decoder(tokenizer)
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        """Append ``token_id``; return the new text it completes (possibly empty)."""
        self.ids.append(token_id)
        if self.tokenizer is None:
            return ""
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before):]
        return ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def _fast_decoder(tokenizer: Any) -> Any:
    """The Rust tokenizer behind a fast ``transformers`` tokenizer when its decode gives the
    same text (no clean-up of tokenization spaces): it skips a few microseconds of Python
    per call, twice per token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return tokenizer
    return backend
