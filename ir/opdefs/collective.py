"""Collective ops: what the ranks of a tensor- or pipeline-parallel graph exchange.

A partitioned graph is one program that every rank of a group runs on its own shard of
the weights (SPMD). Its collectives name the group (``group``, "tp") and its size
(``ranks``):

- ``all_reduce(x)``: every rank gets the sum of ``x`` over the group's ranks;
- ``all_gather(x)``: every rank gets the ranks' ``x`` concatenated along ``dim``, in
  rank order.

The registry's reference runs a group of one rank (where both are the identity). Over
more ranks, a collective needs the other ranks' tensors: ``SIMULATED`` gives each op's
exact semantics over the list of every rank's input (the simulated multi-rank
interpreter uses it, and real runs are checked against it), and the distributed runtime
runs them with ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..registry import Attr, OpDef
from ..shapes import ShapeError, normalize_axis
from ..types import TensorType

GROUPS = ("tp",)


class CollectiveError(RuntimeError):
    """A collective over several ranks was run where no other rank exists."""


def _check_ranks(ranks: int) -> None:
    if ranks < 1:
        raise ShapeError(f"a group has at least one rank, got {ranks}")


def _all_reduce(x: TensorType, ranks: int, group: str) -> TensorType:
    _check_ranks(ranks)
    if not x.dtype.is_float:
        raise ShapeError(f"all_reduce sums floating-point tensors, got {x}")
    return x


def _all_gather(x: TensorType, dim: int, ranks: int, group: str) -> TensorType:
    _check_ranks(ranks)
    axis = normalize_axis(dim, x.rank)
    shape = list(x.shape)
    shape[axis] = shape[axis] * ranks
    return x.with_shape(shape)


def _single_rank(name: str, x: torch.Tensor, ranks: int, group: str) -> torch.Tensor:
    if ranks != 1:
        raise CollectiveError(f"{name} over {ranks} ranks of group {group!r} needs the other ranks: run the "
                              "graph with kiln.passes.simulate_ranks or on kiln's distributed runtime")
    return x.clone()


def _all_reduce_reference(x: torch.Tensor, ranks: int, group: str) -> torch.Tensor:
    return _single_rank("all_reduce", x, ranks, group)


def _all_gather_reference(x: torch.Tensor, dim: int, ranks: int, group: str) -> torch.Tensor:
    return _single_rank("all_gather", x, ranks, group)


def all_reduce_ranks(xs: Sequence[torch.Tensor], ranks: int, group: str) -> list[torch.Tensor]:
    """Each rank's result of ``all_reduce`` given every rank's input: the sum, in rank order."""
    total = xs[0].clone()
    for x in xs[1:]:
        total += x
    return [total.clone() for _ in xs]


def all_gather_ranks(xs: Sequence[torch.Tensor], dim: int, ranks: int, group: str) -> list[torch.Tensor]:
    """Each rank's result of ``all_gather`` given every rank's input: their concatenation."""
    whole = torch.cat(list(xs), dim)
    return [whole.clone() for _ in xs]


SIMULATED: dict[str, Callable[..., list[torch.Tensor]]] = {
    "all_reduce": all_reduce_ranks, "all_gather": all_gather_ranks,
}

_GROUP = Attr("str", "tp", choices=GROUPS)

OPS = [
    OpDef("all_reduce", ("x",), _all_reduce, _all_reduce_reference,
          attrs={"ranks": Attr("int"), "group": _GROUP},
          doc="the sum of x over the group's ranks, on every rank"),
    OpDef("all_gather", ("x",), _all_gather, _all_gather_reference,
          attrs={"dim": Attr("int"), "ranks": Attr("int"), "group": _GROUP},
          doc="the ranks' x concatenated along dim in rank order, on every rank"),
]
