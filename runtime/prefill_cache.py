"""Prefix caching in disaggregated serving: what each prefill worker's KV cache holds, as
rank 0 knows it, and which worker prefills a request from where.

Rank 0's block manager gives a prompt the cached blocks of its prefix: they need neither
computing nor sending. A prefill worker still needs their keys and values, for the
attention of the rest of the prompt, and its cache holds them only where it computed them
itself (a block that rank 0 filled by decoding, or that another worker computed, is not
there). A worker's cache is written by that worker alone, in the order rank 0 dispatches,
so rank 0 can keep an exact record of it: for every worker, block id -> the chained hash
of the full block it last wrote there (``WorkerHoldings``). A request goes to the worker
that holds the longest part of its cached prefix (round robin among equals), with the
tokens after that part only: the worker recomputes the rest of the prefix (for its own
attention; those blocks are not sent back) and the new tokens, and sends rank 0 only the
blocks that rank 0 lacks (``PrefillPlan``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .block_manager import block_hash
from .sequence import Sequence


@dataclass(frozen=True)
class PrefillPlan:
    """How a request is prefilled: by worker ``worker`` (0-based), computing its tokens
    from ``start`` on (its cache holds the blocks before), sending rank 0 the blocks of its
    block table from ``first_block`` on (rank 0 holds those before)."""

    worker: int
    start: int
    first_block: int


class WorkerHoldings:
    """Rank 0's record of the full blocks in each of ``workers`` prefill workers' caches."""

    def __init__(self, workers: int, block_size: int):
        if workers < 1:
            raise ValueError(f"need at least one prefill worker, got {workers}")
        self.block_size = block_size
        self._holds: list[dict[int, int]] = [{} for _ in range(workers)]  # block id -> hash of its content
        self._turn = 0

    def plan(self, seq: Sequence) -> PrefillPlan:
        """The prefill of ``seq`` (its blocks allocated; those of its cached prefix carry
        their hashes), recorded as the chosen worker's writes."""
        count = len(self._holds)
        order = [(self._turn + k) % count for k in range(count)]
        self._turn += 1
        held = {worker: self.held(worker, seq) for worker in order}
        worker = max(order, key=held.__getitem__)  # the first of the longest: round robin among equals
        self._record(worker, seq, held[worker])
        return PrefillPlan(worker, held[worker] * self.block_size, len(seq.block_hashes))

    def held(self, worker: int, seq: Sequence) -> int:
        """How many leading blocks of ``seq``'s cached prefix ``worker``'s cache holds."""
        holds = self._holds[worker]
        count = 0
        for block_id, digest in zip(seq.block_table, seq.block_hashes):
            if holds.get(block_id) != digest:
                break
            count += 1
        return count

    def _record(self, worker: int, seq: Sequence, held: int) -> None:
        """``worker`` writes the blocks of ``seq``'s tokens from block ``held`` to the last
        prompt token but one (the last is computed on rank 0): the full ones now hold their
        content, a partial one nothing that can be reused."""
        holds, size = self._holds[worker], self.block_size
        end = seq.num_tokens - 1
        parent = seq.block_hashes[held - 1] if held else None
        for index in range(held, -(-end // size)):
            block_id = seq.block_table[index]
            if (index + 1) * size <= end:
                parent = block_hash(parent, tuple(seq.tokens[index * size:(index + 1) * size]))
                holds[block_id] = parent
            else:
                holds.pop(block_id, None)
