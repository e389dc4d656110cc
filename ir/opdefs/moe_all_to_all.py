"""Expert parallelism with an all-to-all token exchange: ``moe_all_to_all`` and
``moe_experts_all_to_all``, collectives that run a mixture-of-experts layer whose experts
are split across the ``ranks`` of a group (rank ``r`` holds experts ``[r E/n, (r+1) E/n)``).

Their input ``x [tokens, hidden]`` is replicated on every rank, and so is their result.
Each rank:

1. takes its contiguous share of the token rows (``token_shares``: ranks ``r < tokens % n``
   hold one row more; with fewer tokens than ranks some shares are empty);
2. routes its share: ``moe_all_to_all`` runs the routing of ``moe`` (its attributes) on the
   share's router logits; ``moe_experts_all_to_all`` takes the routing computed before it;
3. sends each (token, choice) pair's row to the rank that owns the chosen expert, with
   the expert's local id: the pair counts go first (an all-to-all of ``n`` integers), then
   the rows in one all-to-all of uneven splits. The routing weight stays home: it is
   applied to the result (or, with ``weigh_inputs``, to the row before it leaves);
4. runs its experts on the rows it received and sends the results back (a second
   all-to-all, the splits reversed);
5. weighs and sums each token's results, and gathers every rank's share (an all-gather of
   uneven shares) so that the output is replicated again.

The exchange is written once (``exchange_moe``, ``exchange_experts``) against an
``Exchange``: ``OneRank`` here (the registry's reference, a group of one rank, where the
op is ``moe``/``moe_experts``), a simulated group of threads in
``passes/partition_simulator.py``, torch.distributed in ``runtime/expert_exchange.py``.
``EXCHANGED`` maps each op to its implementation over an ``Exchange``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from ..registry import Attr, OpDef
from ..shapes import ShapeError, dims_equal
from ..types import TensorType
from .collective import GROUPS, CollectiveError
from .moe import _EXPERTS, _ROUTING, _check_routing, _experts_shapes, _moe_experts, moe_experts_reference, route

Experts = Callable[..., torch.Tensor]


class Exchange(Protocol):
    """How the ranks of a group exchange tensors: rank ``rank`` of ``ranks``."""

    rank: int
    ranks: int

    def counts(self, send: Sequence[int]) -> list[int]:
        """How many rows each rank will send to this one, given how many this one sends to each."""

    def all_to_all(self, x: torch.Tensor, send: Sequence[int], receive: Sequence[int]) -> torch.Tensor:
        """Rows ``x`` cut into ``send[i]`` rows for rank ``i``; the rows received, in rank order."""

    def all_gather(self, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Every rank's ``x`` (``sizes[i]`` rows on rank ``i``) concatenated in rank order."""


class OneRank:
    """The exchange of a group of one rank: everything stays."""

    rank, ranks = 0, 1

    def counts(self, send: Sequence[int]) -> list[int]:
        return list(send)

    def all_to_all(self, x: torch.Tensor, send: Sequence[int], receive: Sequence[int]) -> torch.Tensor:
        return x

    def all_gather(self, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        return x


def token_shares(tokens: int, ranks: int) -> list[int]:
    """How many token rows each rank takes: contiguous shares, the first ``tokens % ranks``
    one row larger."""
    return [tokens // ranks + (r < tokens % ranks) for r in range(ranks)]


def exchange_experts(ex: Exchange, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                     gate_up: torch.Tensor, down: torch.Tensor, activation: str, weigh_inputs: bool,
                     experts: Experts = moe_experts_reference) -> torch.Tensor:
    """This rank's share ``x [t, hidden]`` through the experts its routing (``weights`` and
    global expert ``indices [t, top_k]``) chose, wherever they live; ``gate_up`` and ``down``
    are this rank's experts, run with ``experts`` (a ``moe_experts`` kernel)."""
    tokens, top_k = indices.shape
    local = gate_up.shape[0]
    flat = indices.reshape(-1)
    order = torch.argsort(flat // local, stable=True)  # the pairs grouped by the rank owning their expert
    pair_weights = weights.reshape(-1)[order, None]
    rows = x[order // top_k]
    if weigh_inputs:
        rows = rows * pair_weights.to(x.dtype)
    send = torch.bincount(flat // local, minlength=ex.ranks).tolist()
    receive = ex.counts(send)
    ids = ex.all_to_all(flat[order] % local, send, receive)
    received = ex.all_to_all(rows.contiguous(), send, receive)
    if len(ids):
        ones = torch.ones((len(ids), 1), dtype=torch.float32, device=x.device)
        received = experts(received, ones, ids[:, None], gate_up, down, activation=activation, weigh_inputs=False)
    results = ex.all_to_all(received, receive, send)
    pairs = torch.empty(results.shape, dtype=torch.float32, device=x.device)
    pairs[order] = results.float() if weigh_inputs else results.float() * pair_weights.float()
    return pairs.view(tokens, top_k, x.shape[1]).sum(1).to(x.dtype)


def _share(ex: Exchange, tokens: int, ranks: int) -> tuple[slice, list[int]]:
    if ranks != ex.ranks:
        raise CollectiveError(f"an op partitioned for {ranks} ranks runs in a group of {ex.ranks}")
    sizes = token_shares(tokens, ranks)
    start = sum(sizes[:ex.rank])
    return slice(start, start + sizes[ex.rank]), sizes


def exchange_moe_experts(ex: Exchange, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                         gate_up: torch.Tensor, down: torch.Tensor, activation: str, weigh_inputs: bool, ranks: int,
                         group: str, experts: Experts = moe_experts_reference) -> torch.Tensor:
    """``moe_experts_all_to_all`` over the exchange ``ex``."""
    share, sizes = _share(ex, x.shape[0], ranks)
    out = exchange_experts(ex, x[share], weights[share], indices[share], gate_up, down, activation, weigh_inputs,
                           experts)
    return ex.all_gather(out, sizes)


def exchange_moe(ex: Exchange, x: torch.Tensor, router_logits: torch.Tensor, gate_up: torch.Tensor,
                 down: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int, scoring: str, normalize: bool,
                 scale: float, num_groups: int, topk_groups: int, jitter_eps: float, activation: str,
                 weigh_inputs: bool, ranks: int, group: str, experts: Experts = moe_experts_reference) -> torch.Tensor:
    """``moe_all_to_all`` over the exchange ``ex``: the share is routed here."""
    share, sizes = _share(ex, x.shape[0], ranks)
    logits = router_logits[share]
    if len(logits):
        weights, indices = route(logits, correction_bias, top_k, scoring, normalize, scale, num_groups,
                                 topk_groups, jitter_eps)
    else:  # fewer tokens than ranks: this rank routes nothing, and still takes part in the exchanges
        weights = torch.empty((0, top_k), dtype=torch.float32, device=x.device)
        indices = torch.empty((0, top_k), dtype=torch.int64, device=x.device)
    out = exchange_experts(ex, x[share], weights, indices, gate_up, down, activation, weigh_inputs, experts)
    return ex.all_gather(out, sizes)


EXCHANGED: dict[str, Callable[..., torch.Tensor]] = {
    "moe_all_to_all": exchange_moe, "moe_experts_all_to_all": exchange_moe_experts,
}


def _one_rank(name: str, ranks: int, group: str) -> OneRank:
    if ranks != 1:
        raise CollectiveError(f"{name} over {ranks} ranks of group {group!r} needs the other ranks: run the "
                              "graph with kiln.passes.simulate_ranks or on kiln's distributed runtime")
    return OneRank()


def _moe_all_to_all_reference(x, router_logits, gate_up, down, correction_bias, ranks, group, **attrs):
    return exchange_moe(_one_rank("moe_all_to_all", ranks, group), x, router_logits, gate_up, down, correction_bias,
                        ranks=ranks, group=group, **attrs)


def _moe_experts_all_to_all_reference(x, weights, indices, gate_up, down, ranks, group, **attrs):
    return exchange_moe_experts(_one_rank("moe_experts_all_to_all", ranks, group), x, weights, indices, gate_up,
                                down, ranks=ranks, group=group, **attrs)


def _check_ranks(ranks: int) -> None:
    if ranks < 1:
        raise ShapeError(f"a group has at least one rank, got {ranks}")


def _moe_all_to_all(x: TensorType, router_logits: TensorType, gate_up: TensorType, down: TensorType,
                    correction_bias: TensorType | None, ranks: int, group: str, top_k: int, scoring: str,
                    normalize: bool, scale: float, num_groups: int, topk_groups: int, jitter_eps: float,
                    activation: str, weigh_inputs: bool) -> TensorType:
    _check_ranks(ranks)
    _experts_shapes(x, gate_up, down)
    experts = gate_up.shape[0] * ranks
    if not router_logits.dtype.is_float or router_logits.rank != 2 \
            or not dims_equal(router_logits.shape[0], x.shape[0]) or not dims_equal(router_logits.shape[1], experts):
        raise ShapeError(f"router logits {router_logits} are not [tokens, {experts}] ({ranks} ranks of "
                         f"{gate_up.shape[0]} experts)")
    _check_routing(experts, correction_bias, top_k, num_groups, topk_groups)
    return x


def _moe_experts_all_to_all(x: TensorType, weights: TensorType, indices: TensorType, gate_up: TensorType,
                            down: TensorType, ranks: int, group: str, activation: str,
                            weigh_inputs: bool) -> TensorType:
    _check_ranks(ranks)
    return _moe_experts(x, weights, indices, gate_up, down, activation, weigh_inputs)


_GROUP = {"ranks": Attr("int"), "group": Attr("str", "tp", choices=GROUPS)}

OPS = [
    OpDef("moe_all_to_all", ("x", "router_logits", "gate_up", "down", "correction_bias?"), _moe_all_to_all,
          _moe_all_to_all_reference, attrs={**_GROUP, **_ROUTING, **_EXPERTS},
          doc="moe with its experts split across the group's ranks (gate_up and down hold the rank's "
              "experts; router_logits [tokens, experts] all of them): each rank routes its share of the "
              "replicated tokens, sends each choice's row to the expert's rank and gets the result back "
              "(all-to-all), then the shares are gathered: the replicated output of moe"),
    OpDef("moe_experts_all_to_all", ("x", "weights", "indices", "gate_up", "down"), _moe_experts_all_to_all,
          _moe_experts_all_to_all_reference, attrs={**_GROUP, **_EXPERTS},
          doc="moe_experts with its experts split across the group's ranks, the routing given (global "
              "expert indices): each rank's share of the tokens goes to the experts' ranks and back "
              "(all-to-all), then the shares are gathered: the replicated output of moe_experts"),
]
