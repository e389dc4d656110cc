"""KV blocks between the ranks of disaggregated serving: a prefill rank's sends, layer by
layer, and a decode rank's receives.

Prefill rank ``r`` of a worker (counted from the worker's first rank: the same stage and
tensor-parallel rank) holds the same layers and heads as decode rank ``r`` and sends its
blocks there, one message per cache, tagged from a base that names the request.
``LayerSender`` wraps the kernels that write the caches, so that each layer's blocks
leave as soon as its kernel returns, while the next layers compute. ``BlockReceiver`` posts a request's receives as soon as rank 0 dispatches it, and copies
the blocks into the rank's caches when rank 0 says the request lands (or drains and
drops them, for a request that ended while it was prefilling).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

POST, LAND, DROP = 0, 1, 2  # what rank 0 tells the other decode ranks about a request's blocks


class LayerSender:
    """A prefill rank's sends of one request's KV blocks to decode rank ``target``: each
    cache as soon as the kernel that writes it returns it (``wrap``), the rest at the end
    (``finish``)."""

    def __init__(self, caches: dict[str, torch.Tensor], target: int = 0):
        self.target = target
        self.watch(caches)
        self._request: tuple[torch.Tensor, int] | None = None
        self._works: list = []
        self._sent: set[int] = set()
        self._first: float | None = None

    def watch(self, caches: dict[str, torch.Tensor]) -> None:
        """Send ``caches`` (those of the rank's layers, once they are allocated)."""
        self.caches = list(caches.values())
        self._index = {id(t): i for i, t in enumerate(self.caches)}

    def arm(self, blocks: torch.Tensor, base_tag: int) -> None:
        """Send the caches that the next kernels write: ``blocks`` of each, tagged from ``base_tag``."""
        self._request = (blocks, base_tag)

    def wrap(self, kernel: Callable) -> Callable:
        """``kernel``, followed by the send of each armed cache among its results."""
        def call(*args, **kwargs):
            out = kernel(*args, **kwargs)
            if self._request is not None:
                for result in out if isinstance(out, tuple) else (out,):
                    if id(result) in self._index:
                        self._send(self._index[id(result)])
            return out

        return call

    def _send(self, index: int) -> None:
        if index in self._sent:
            return
        blocks, base = self._request
        self._first = self._first or time.perf_counter()
        self._sent.add(index)
        self._works.append(dist.isend(self.caches[index].index_select(0, blocks), self.target, tag=base + index))

    def finish(self) -> tuple[float, float]:
        """Send the caches not sent yet (a backend whose kernels write caches out of
        place), wait for every send; (when the first send started, when the last ended)."""
        for index in range(len(self.caches)):
            self._send(index)
        for work in self._works:
            work.wait()
        done = time.perf_counter()
        first = done if self._first is None else self._first  # a stage without attention sends nothing
        self._request, self._works, self._sent, self._first = None, [], set(), None
        return first, done


class BlockReceiver:
    """A decode rank's receives of requests' KV blocks into its ``caches``, each request
    known by the base tag of its messages."""

    def __init__(self, caches: dict[str, torch.Tensor]):
        self.caches = list(caches.values())
        self._pending: dict[int, tuple[torch.Tensor, list[torch.Tensor], list]] = {}
        self._dropped: list[tuple[list[torch.Tensor], list]] = []  # kept alive until their messages are in

    def post(self, base: int, source: int, blocks: torch.Tensor) -> None:
        """Post the receives of ``blocks`` of every cache from rank ``source``."""
        staging = [torch.empty((len(blocks), *c.shape[1:]), dtype=c.dtype) for c in self.caches]
        works = [dist.irecv(t, source, tag=base + i) for i, t in enumerate(staging)]
        self._pending[base] = (blocks, staging, works)

    def arrived(self, base: int) -> bool:
        """Whether every block of request ``base`` has come (true of one it no longer waits for)."""
        return base not in self._pending or all(work.is_completed() for work in self._pending[base][2])

    def wait(self, base: int) -> None:
        """Wait for request ``base``'s blocks (each receive once: a gloo receive waited
        for again waits for another message)."""
        works = self._pending[base][2]
        while works:
            works.pop(0).wait()

    def land(self, base: int) -> int:
        """Wait for request ``base``'s blocks and copy them into the caches; how many blocks."""
        self.wait(base)
        blocks, staging, _ = self._pending.pop(base)
        for cache, arrived in zip(self.caches, staging):
            cache.index_copy_(0, blocks.to(cache.device), arrived.to(cache.device))
        return len(blocks)

    def drop(self, base: int) -> None:
        """Forget request ``base`` (it ended while prefilling): its messages are drained, not copied."""
        _, staging, works = self._pending.pop(base)
        self._dropped = [d for d in self._dropped if not all(w.is_completed() for w in d[1])]
        self._dropped.append((staging, works))

    def handle(self, record: Sequence[int], rank: int) -> None:
        """Rank 0's word about a request: ``(POST, base, worker's first rank, block ids...)``
        (the blocks come from the worker's rank in this decode rank's place: the same stage
        and tensor-parallel rank, ``rank`` ranks after its first), ``(LAND, base)`` or
        ``(DROP, base)``."""
        kind, base = record[0], record[1]
        if kind == POST:
            self.post(base, record[2] + rank, torch.tensor(record[3:], dtype=torch.int64))
        elif kind == LAND:
            self.land(base)
        elif kind == DROP:
            self.drop(base)
        else:
            raise ValueError(f"unknown KV record kind {kind}")
