"""The expert-parallel all-to-all on torch.distributed: the ``Exchange`` that
``moe_all_to_all`` and ``moe_experts_all_to_all`` (``ir/opdefs/moe_all_to_all.py``) run over
on a process group (gloo on CPUs, NCCL on GPUs).

- ``counts``: each rank tells every other how many rows it will send
  (``all_to_all_single`` of one integer per rank);
- ``all_to_all``: the rows themselves, one ``all_to_all_single`` with uneven split sizes;
- ``all_gather``: the token shares, which differ by at most a row: each is padded to the
  largest (every rank knows every share from the token count), gathered, and trimmed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from ..ir.opdefs.moe_all_to_all import EXCHANGED, Experts, OneRank


class DistributedExchange:
    """This process's side of the exchanges of ``process_group`` (None: the world), of ``ranks`` ranks."""

    def __init__(self, ranks: int, process_group: dist.ProcessGroup | None = None):
        self.group, self.ranks = process_group, ranks
        self.rank = dist.get_rank(process_group)

    def counts(self, send: Sequence[int]) -> list[int]:
        sent = torch.tensor(list(send), dtype=torch.int64, device=self._device())
        received = torch.empty_like(sent)
        dist.all_to_all_single(received, sent, group=self.group)
        return received.tolist()

    def all_to_all(self, x: torch.Tensor, send: Sequence[int], receive: Sequence[int]) -> torch.Tensor:
        out = x.new_empty((sum(receive), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), list(receive), list(send), group=self.group)
        return out

    def all_gather(self, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[:len(x)] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    def _device(self) -> torch.device:
        backend = dist.get_backend(self.group)
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def exchange_kernels(ranks: int, process_group: dist.ProcessGroup | None, experts: Experts) -> dict[str, Callable]:
    """The kernels of the all-to-all expert ops over ``ranks`` ranks of ``process_group``,
    the rank's experts run by ``experts`` (the backend's ``moe_experts`` kernel)."""
    exchange = DistributedExchange(ranks, process_group) if ranks > 1 else OneRank()

    def kernel(op: str) -> Callable:
        return lambda *args, **attrs: EXCHANGED[op](exchange, *args, **attrs, experts=experts)

    return {op: kernel(op) for op in EXCHANGED}
