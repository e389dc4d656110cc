"""The expert-parallel all-to-all on torch.distributed: the ``Exchange`` that
``moe_all_to_all`` and ``moe_experts_all_to_all`` (``ir/opdefs/moe_all_to_all.py``) run over
on a process group (gloo on CPUs, NCCL on GPUs).

- ``counts``: each rank tells every other how many rows it will send
  (``all_to_all_single`` of one integer per rank);
- ``all_to_all``: the rows themselves, one ``all_to_all_single`` with uneven split sizes;
- ``all_gather``: the token shares, of sizes every rank knows from the token count, as one
  more ``all_to_all_single`` (each rank sends its share to every rank): an all-gather of
  uneven sizes that moves no padding (with one token over 8 ranks, a padded all-gather
  would move 8 rows to every rank).
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
        return self.all_to_all(torch.cat([x] * self.ranks), [len(x)] * self.ranks, sizes)

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
