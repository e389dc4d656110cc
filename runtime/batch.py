"""The inputs of one step of the paged graph, built from what each sequence contributes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceStep:
    """One sequence's part of a step: its new tokens, how many of its tokens the cache
    holds already, and the cache blocks it owns (enough for all its tokens after the step)."""

    token_ids: Sequence[int]
    cached: int
    blocks: Sequence[int]


def step_inputs(steps: Sequence[SequenceStep], block_size: int, all_logits: bool = False,
                sampling: Sequence[bool] | None = None) -> dict[str, torch.Tensor]:
    """``ids``, ``positions``, ``slot_mapping``, ``query_start``, ``context_lens``,
    ``block_tables`` and ``logits_indices`` for a mixed batch of prefills, prefill chunks
    and decodes. Logits are asked for every token, or for the last token of each
    sequence (of those marked in ``sampling``, when given)."""
    ids, positions, slots, starts, lengths = [], [], [], [0], []
    width = max(len(s.blocks) for s in steps)
    for step in steps:
        total = step.cached + len(step.token_ids)
        if -(-total // block_size) > len(step.blocks):
            raise ValueError(f"a sequence of {total} tokens needs {-(-total // block_size)} blocks "
                             f"of {block_size}, it has {len(step.blocks)}")
        for position in range(step.cached, total):
            positions.append(position)
            slots.append(step.blocks[position // block_size] * block_size + position % block_size)
        ids += list(step.token_ids)
        starts.append(len(ids))
        lengths.append(total)
    tables = [list(s.blocks) + [0] * (width - len(s.blocks)) for s in steps]
    return {
        "ids": torch.tensor(ids, dtype=torch.int64),
        "positions": torch.tensor(positions, dtype=torch.int64),
        "slot_mapping": torch.tensor(slots, dtype=torch.int64),
        "query_start": torch.tensor(starts, dtype=torch.int32),
        "context_lens": torch.tensor(lengths, dtype=torch.int32),
        "block_tables": torch.tensor(tables, dtype=torch.int32),
        "logits_indices": torch.arange(len(ids)) if all_logits else
        torch.tensor([end - 1 for end, wanted in zip(starts[1:], sampling or [True] * len(steps)) if wanted],
                     dtype=torch.int64),
    }
