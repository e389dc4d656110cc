"""The inputs of one step of the paged graph, built from what each sequence contributes."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SequenceStep:
    """One sequence's part of a step: its new tokens, how many of its tokens the cache
    holds already, and the cache blocks it owns (enough for all its tokens after the step)."""

    token_ids: Sequence[int]
    cached: int
    blocks: Sequence[int]


def step_inputs(steps: Sequence[SequenceStep], block_size: int, all_logits: bool = False,
                sampling: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """``ids``, ``positions``, ``slot_mapping``, ``query_start``, ``context_lens``,
    ``block_tables`` and ``logits_indices`` for a mixed batch of prefills, prefill chunks
    and decodes. Logits are asked for every token, or for the last token of each
    sequence, or, given ``sampling``, for the last ``sampling[i]`` tokens of sequence i
    (a flag: its last token or none)."""
    count = len(steps)
    new = np.fromiter((len(s.token_ids) for s in steps), np.int64, count)
    cached = np.fromiter((s.cached for s in steps), np.int64, count)
    owned = np.fromiter((len(s.blocks) for s in steps), np.int64, count)
    lengths = cached + new
    short = np.flatnonzero(-(-lengths // block_size) > owned)
    if short.size:
        i = short[0]
        raise ValueError(f"a sequence of {lengths[i]} tokens needs {-(-lengths[i] // block_size)} blocks "
                         f"of {block_size}, it has {owned[i]}")
    starts = np.zeros(count + 1, np.int64)
    np.cumsum(new, out=starts[1:])
    tables = np.zeros((count, owned.max()), np.int32)
    for row, step in enumerate(steps):
        tables[row, :len(step.blocks)] = step.blocks
    owner = np.repeat(np.arange(count), new)
    positions = np.arange(starts[-1]) - starts[owner] + cached[owner]
    slots = tables[owner, positions // block_size].astype(np.int64) * block_size + positions % block_size
    ids = np.fromiter(itertools.chain.from_iterable(s.token_ids for s in steps), np.int64, starts[-1])
    if all_logits:
        logits = np.arange(starts[-1])
    else:
        logits = starts[1:] - 1 if sampling is None else _last_rows(starts[1:], np.asarray(sampling, np.int64))
    return {"ids": torch.from_numpy(ids), "positions": torch.from_numpy(positions),
            "slot_mapping": torch.from_numpy(slots), "query_start": torch.from_numpy(starts.astype(np.int32)),
            "context_lens": torch.from_numpy(lengths.astype(np.int32)), "block_tables": torch.from_numpy(tables),
            "logits_indices": torch.from_numpy(logits.astype(np.int64))}


def _last_rows(ends: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The last ``counts[i]`` row indices before ``ends[i]``, for each i, in order."""
    if (counts <= 1).all():
        return (ends - 1)[counts.astype(bool)]
    return np.repeat(ends - counts, counts) + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
