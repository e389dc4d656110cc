"""Mixture-of-experts: ``topk``, the experts of a routed MLP (``moe_experts``), and ``moe``,
the whole routed MLP from the router's logits.

Experts are stacked weights, as transformers holds them: ``gate_up [experts, 2 * inter,
hidden]`` (gate rows first, then up rows) and ``down [experts, hidden, inter]``. Each token
goes through its ``top_k`` experts' gated MLP, and the results are summed with the routing
weights (in float32, then cast to the input's dtype).

``moe`` routes too. ``scoring="softmax"`` (Mixtral, Qwen-MoE, OLMoE, GraniteMoE, DeepSeek-V2)
takes the top-k of the softmax over all experts, renormalized when ``normalize``;
GraniteMoE's softmax over the top-k logits is the same thing. With ``num_groups > 1``
(DeepSeek-V2's group-limited greedy) a group scores its best expert, and the experts outside
the ``topk_groups`` best groups score 0. ``scoring="sigmoid"`` (DeepSeek-V3) chooses by
sigmoid scores plus ``correction_bias``, among the ``topk_groups`` best of ``num_groups``
expert groups (a group scores the sum of its two best), and weighs by the unbiased scores.
``scoring="sparsemixer"`` (PhiMoE, at inference) chooses the best remaining expert
``top_k`` times; each choice weighs the softmax, at its expert, of the remaining logits
that are within ``2 * jitter_eps`` of the best (relative to ``max(|logit|, best)``).
Every routing weight is then multiplied by ``scale``. ``scoring="sigmoid"`` without a
correction bias or groups (Llama 4) chooses by the logits: the same choice as by their
sigmoids, without the ties of saturated ones. With ``weigh_inputs`` (Llama 4) each expert
takes the token scaled by its routing weight and its output is summed unweighted, instead
of weighing the output. Shared experts and dense layers are not part of the op: they stay
ordinary MLPs, which the dense fusions already handle.
"""

from __future__ import annotations

import torch

from .. import dtypes
from ..registry import Attr, OpDef
from ..shapes import ShapeError, dims_equal, normalize_axis
from ..types import TensorType
from .fused import ACTIVATIONS, _gated_reference


def _topk(x: TensorType, k: int, dim: int) -> tuple[TensorType, TensorType]:
    axis = normalize_axis(dim, x.rank)
    size = x.shape[axis]
    if x.dtype.kind == "bool" or k < 1 or (isinstance(size, int) and k > size):
        raise ShapeError(f"topk of {k} along dim {dim} of {x}")
    shape = [k if i == axis else d for i, d in enumerate(x.shape)]
    return x.with_shape(shape), TensorType(dtypes.int64, shape)


def _topk_reference(x: torch.Tensor, k: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = torch.topk(x, k, dim=dim)
    return values, indices


def _experts_shapes(x: TensorType, gate_up: TensorType, down: TensorType) -> None:
    if not x.dtype.is_float or x.rank != 2 or gate_up.dtype != x.dtype or down.dtype != x.dtype:
        raise ShapeError(f"expects x [tokens, hidden] and expert weights of its dtype; got {x}, {gate_up}, {down}")
    if gate_up.rank != 3 or down.rank != 3:
        raise ShapeError(f"expert weights are stacked [experts, out, in]; got {gate_up} and {down}")
    experts, double_inter, hidden = gate_up.shape
    if not (isinstance(double_inter, int) and double_inter % 2 == 0 and dims_equal(hidden, x.shape[1])):
        raise ShapeError(f"gate_up {gate_up} is not [experts, 2 * inter, {x.shape[1]}]")
    if not (dims_equal(down.shape[0], experts) and dims_equal(down.shape[1], hidden)
            and dims_equal(down.shape[2], double_inter // 2)):
        raise ShapeError(f"down {down} is not [{experts}, {hidden}, {double_inter // 2}]")


def _moe_experts(x: TensorType, weights: TensorType, indices: TensorType, gate_up: TensorType,
                 down: TensorType, activation: str, weigh_inputs: bool = False) -> TensorType:
    _experts_shapes(x, gate_up, down)
    routing = weights.rank == 2 and dims_equal(weights.shape[0], x.shape[0]) \
        and weights.equivalent(indices.with_dtype(weights.dtype))
    if not weights.dtype.is_float or indices.dtype != dtypes.int64 or not routing:
        raise ShapeError(f"weights {weights} and indices {indices} must be float and int64 [tokens, top_k]")
    return x


def moe_experts_reference(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, gate_up: torch.Tensor,
                          down: torch.Tensor, activation: str, weigh_inputs: bool = False) -> torch.Tensor:
    """Each token through its experts' gated MLPs, summed with its routing weights (applied
    to each expert's input instead where ``weigh_inputs``): the (token, choice) pairs are
    sorted by expert and each expert runs once on its rows (the counts are read back to the
    host: an oracle, not a kernel; see backends/cuda/moe.py)."""
    tokens, top_k = indices.shape
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
    rows = x[order // top_k]
    if weigh_inputs:
        rows = rows * weights.reshape(-1)[order, None].to(x.dtype)
    out = torch.empty(rows.shape, dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            part = rows[start:start + count]
            hidden = _gated_reference(part @ gate_up[expert].T, activation)
            out[start:start + count] = (hidden @ down[expert].T).float()
            start += count
    weighted = torch.empty_like(out)
    weighted[order] = out if weigh_inputs else out * weights.reshape(-1)[order, None].float()
    return weighted.view(tokens, top_k, -1).sum(1).to(x.dtype)


def route(logits: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int, scoring: str, normalize: bool,
          scale: float, num_groups: int, topk_groups: int,
          jitter_eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights (float32) and expert indices [tokens, top_k] from router logits."""
    logits = logits.float()
    if scoring == "sparsemixer":
        weights, indices = _sparsemixer(logits, top_k, jitter_eps)
    elif scoring == "softmax":
        scores = torch.softmax(logits, -1)
        if num_groups > 1:
            best = scores.view(scores.shape[0], num_groups, -1).amax(-1)
            scores = _keep_groups(scores, best, topk_groups, 0.0)
        weights, indices = torch.topk(scores, top_k, dim=-1)
    else:
        scores = torch.sigmoid(logits)
        choice = scores + correction_bias.float() if correction_bias is not None else \
            scores if num_groups > 1 else logits
        if num_groups > 1:
            best_two = choice.view(choice.shape[0], num_groups, -1).topk(2, dim=-1).values.sum(-1)
            choice = _keep_groups(choice, best_two, topk_groups, float("-inf"))
        indices = torch.topk(choice, top_k, dim=-1).indices
        weights = scores.gather(1, indices)
    if normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + (1e-20 if scoring == "sigmoid" else 0.0))
    return weights * scale, indices


def _keep_groups(scores: torch.Tensor, group_scores: torch.Tensor, topk_groups: int, fill: float) -> torch.Tensor:
    """``scores [tokens, experts]`` with ``fill`` outside the ``topk_groups`` best groups."""
    best = torch.topk(group_scores, topk_groups, dim=-1).indices
    kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    grouped = scores.view(scores.shape[0], group_scores.shape[1], -1)
    return grouped.masked_fill(~kept[..., None], fill).view_as(scores)


def _sparsemixer(logits: torch.Tensor, top_k: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's sparsemixer in inference mode: ``top_k`` rounds, each taking the best
    expert not chosen yet, weighed by its softmax over the remaining logits close to it."""
    weights, indices, remaining = [], [], logits
    for _ in range(top_k):
        best, index = remaining.max(-1, keepdim=True)
        far = (best - logits) / logits.abs().clamp(min=best) > 2 * eps
        weights.append(torch.softmax(remaining.masked_fill(far, float("-inf")), -1).gather(-1, index))
        indices.append(index)
        remaining = remaining.scatter(-1, index, float("-inf"))
    return torch.cat(weights, -1), torch.cat(indices, -1)


def _moe(x: TensorType, router_logits: TensorType, gate_up: TensorType, down: TensorType,
         correction_bias: TensorType | None, top_k: int, scoring: str, normalize: bool, scale: float,
         num_groups: int, topk_groups: int, activation: str, jitter_eps: float = 0.0,
         weigh_inputs: bool = False) -> TensorType:
    _experts_shapes(x, gate_up, down)
    experts = gate_up.shape[0]
    if not router_logits.dtype.is_float or router_logits.rank != 2 \
            or not dims_equal(router_logits.shape[0], x.shape[0]) or not dims_equal(router_logits.shape[1], experts):
        raise ShapeError(f"router logits {router_logits} are not [tokens, {experts}]")
    _check_routing(experts, correction_bias, top_k, num_groups, topk_groups)
    return x


def _check_routing(experts, correction_bias: TensorType | None, top_k: int, num_groups: int,
                   topk_groups: int) -> None:
    """The routing attributes fit ``experts`` experts (and the correction bias, if any)."""
    if correction_bias is not None and (correction_bias.rank != 1 or not dims_equal(correction_bias.shape[0], experts)):
        raise ShapeError(f"correction bias {correction_bias} is not [{experts}]")
    if not isinstance(experts, int) or not 1 <= top_k <= experts:
        raise ShapeError(f"top_k {top_k} must be between 1 and the number of experts, {experts}")
    if num_groups < 1 or experts % num_groups or not 1 <= topk_groups <= num_groups:
        raise ShapeError(f"{experts} experts do not split into {num_groups} groups of which {topk_groups} are kept")


def _moe_reference(x, router_logits, gate_up, down, correction_bias, top_k, scoring, normalize, scale, num_groups,
                   topk_groups, activation, jitter_eps=0.0, weigh_inputs=False):
    weights, indices = route(router_logits, correction_bias, top_k, scoring, normalize, scale, num_groups,
                             topk_groups, jitter_eps)
    return moe_experts_reference(x, weights, indices, gate_up, down, activation, weigh_inputs)


def _moe_route(router_logits: TensorType, correction_bias: TensorType | None, top_k: int, scoring: str,
               normalize: bool, scale: float, num_groups: int, topk_groups: int,
               jitter_eps: float = 0.0) -> tuple[TensorType, TensorType]:
    if not router_logits.dtype.is_float or router_logits.rank != 2:
        raise ShapeError(f"router logits {router_logits} are not float [tokens, experts]")
    tokens, experts = router_logits.shape
    _check_routing(experts, correction_bias, top_k, num_groups, topk_groups)
    return TensorType(dtypes.float32, (tokens, top_k)), TensorType(dtypes.int64, (tokens, top_k))


SCORINGS = ("softmax", "sigmoid", "sparsemixer")
_ROUTING = {"top_k": Attr("int"), "scoring": Attr("str", "softmax", choices=SCORINGS),
            "normalize": Attr("bool", False), "scale": Attr("float", 1.0), "num_groups": Attr("int", 1),
            "topk_groups": Attr("int", 1), "jitter_eps": Attr("float", 0.0)}
_EXPERTS = {"activation": Attr("str", "silu", choices=ACTIVATIONS), "weigh_inputs": Attr("bool", False)}

OPS = [
    OpDef("topk", ("x",), _topk, _topk_reference, attrs={"k": Attr("int"), "dim": Attr("int", -1)}, results=2,
          doc="the k largest values along dim, in descending order, and their int64 indices"),
    OpDef("moe_experts", ("x", "weights", "indices", "gate_up", "down"), _moe_experts, moe_experts_reference,
          attrs=_EXPERTS,
          doc="sum over each token's chosen experts of weight * down(act(gate) * up), for x [tokens, hidden], "
              "weights and int64 indices [tokens, top_k], stacked gate_up [experts, 2 inter, hidden] and "
              "down [experts, hidden, inter]; with weigh_inputs, each expert's input is weighed instead"),
    OpDef("moe", ("x", "router_logits", "gate_up", "down", "correction_bias?"), _moe, _moe_reference,
          attrs={**_ROUTING, **_EXPERTS},
          doc="a routed mixture-of-experts MLP: router_logits [tokens, experts] choose each token's top_k "
              "experts and their weights (softmax, grouped or not; DeepSeek-V3's grouped, bias-corrected "
              "sigmoid; Llama 4's sigmoid; PhiMoE's sparsemixer), then moe_experts"),
    OpDef("moe_route", ("router_logits", "correction_bias?"), _moe_route, route, attrs=_ROUTING, results=2,
          doc="moe's routing alone: float32 weights and int64 expert indices [tokens, top_k] from router_logits "
              "(the expert-parallel form of moe routes on every rank, then runs the rank's own experts)"),
]
