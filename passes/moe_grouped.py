"""Raising DeepSeek's grouped routers: in front of ``moe_experts``, V3's grouped,
bias-corrected sigmoid routing becomes one ``moe {scoring = sigmoid}``, and V2's
group-limited greedy softmax routing one ``moe {scoring = softmax, num_groups}``.

transformers' ``DeepseekV3TopkRouter`` scores experts by ``sigmoid(logits)``, adds the
correction bias for the choice, keeps the ``topk_group`` best of ``n_group`` groups (a group
scores the sum of its two best), masks the other groups' experts with ``-inf``, takes the
top-k, weighs by the unbiased scores, optionally renormalizes (``+ 1e-20``), and scales. Its
group mask is a ``scatter_`` that the frontend imports as a one-hot comparison against the
group positions (``frontends/aten.py``); the rule matches that form, the positions being a
constant ``0 .. n_group - 1``.

transformers' ``DeepseekV2TopkRouter`` (``topk_method="group_limited_greedy"``) scores experts
by the softmax of the logits, a group by its best expert, keeps the ``topk_group`` best
groups through the same mask, sets the other experts' scores to 0, takes the top-k, and
scales. (Its ``greedy`` method is plain softmax routing, raised by ``passes/moe.py``.)
"""

from __future__ import annotations

import torch

from ..ir import dtypes, ops
from .moe import is_scalar_constant, scalar
from .pattern import Match
from .rewriter import Rule


def one_hot_hits(index, positions):
    """Where ``index [tokens, n]`` points among ``positions``: the frontend's form of
    ``scatter_(1, index, value)`` (``frontends/aten.py``), before its ``where``."""
    hits = ops.cast(ops.eq(ops.unsqueeze(index, dim=2), positions), dtype=dtypes.float32)
    return ops.cast(ops.max(hits, dims=(1,)), dtype=dtypes.bool_)


def _outside_groups(groups, positions, zeros, expanded, flat):
    """True for the experts outside the chosen groups: the group mask, expanded over each
    group's experts."""
    kept = ops.where(one_hot_hits(groups, positions), 1.0, zeros)
    mask = ops.reshape(ops.expand(ops.unsqueeze(kept, dim=-1), shape=expanded), shape=flat)
    return ops.logical_not(ops.cast(mask, dtype=dtypes.bool_))


def _routing(logits, bias, positions, zeros, group_shape, topk_groups, expanded, flat, top_k, normalize: bool):
    """The router's weights and indices, as the frontend imports them."""
    scores = ops.sigmoid(logits)
    choice = ops.add(scores, bias)
    best, _ = ops.topk(ops.reshape(choice, shape=group_shape), k=2, dim=-1)
    _, groups = ops.topk(ops.sum(best, dims=(-1,)), k=topk_groups, dim=-1)
    outside = _outside_groups(groups, positions, zeros, expanded, flat)
    _, indices = ops.topk(ops.where(outside, float("-inf"), choice), k=top_k, dim=-1)
    weights = ops.gather(scores, indices, dim=1)
    if normalize:
        weights = ops.div(weights, ops.add(ops.sum(weights, dims=(-1,), keepdim=True), 1e-20))
    return weights, indices


def _router(normalize: bool, scaled: bool):
    """The pattern of one router form feeding the experts; unscaled where the scale is 1
    (canonicalization removed the multiplication)."""
    if scaled:
        def pattern(x, logits, bias, gate_up, down, positions, zeros, scale, group_shape: tuple, topk_groups: int,
                    expanded: tuple, flat: tuple, top_k: int, activation: str):
            weights, indices = _routing(logits, bias, positions, zeros, group_shape, topk_groups, expanded, flat,
                                        top_k, normalize)
            return ops.moe_experts(x, ops.mul(weights, scale), indices, gate_up, down, activation=activation)
    else:
        def pattern(x, logits, bias, gate_up, down, positions, zeros, group_shape: tuple, topk_groups: int,
                    expanded: tuple, flat: tuple, top_k: int, activation: str):
            weights, indices = _routing(logits, bias, positions, zeros, group_shape, topk_groups, expanded, flat,
                                        top_k, normalize)
            return ops.moe_experts(x, weights, indices, gate_up, down, activation=activation)

    pattern.__name__ = f"raise_moe_grouped_sigmoid{'_normalized' if normalize else ''}{'_scaled' if scaled else ''}"
    return pattern


def _moe(normalize: bool):
    def replacement(x, logits, bias, gate_up, down, group_shape: tuple, topk_groups: int, top_k: int,
                    activation: str, scale=None):
        return ops.moe(x, logits, gate_up, down, bias, top_k=top_k, scoring="sigmoid", normalize=normalize,
                       scale=scalar(scale),
                       num_groups=group_shape[1], topk_groups=topk_groups, activation=activation)
    return replacement


def _groups_tile_experts(m: Match) -> bool:
    """The groups tile the experts, their positions are ``0 .. n_group - 1``, the mask starts
    from zeros, and the scale is one number."""
    experts = m["logits"].type.shape[-1]
    shape = m["group_shape"]
    if len(shape) != 3 or not isinstance(shape[1], int) or shape[1] * shape[2] != experts:
        return False
    positions, zeros = m["positions"], m["zeros"]
    if not positions.is_literal or positions.type.static_numel != shape[1] \
            or not is_scalar_constant(m.values.get("scale")):
        return False
    return bool(torch.equal(positions.tensor().reshape(-1), torch.arange(shape[1]))) \
        and zeros.producer is not None and zeros.producer.op == "full" and zeros.producer.attrs["value"] == 0.0


def _grouped_over_experts(m: Match) -> bool:
    """As ``_groups_tile_experts``, with a correction bias over the experts."""
    return _groups_tile_experts(m) and m["bias"].type.rank == 1


GROUPED_MOE_RULES = [Rule(_router(normalize, scaled), _moe(normalize), when=_grouped_over_experts)
                     for normalize in (True, False) for scaled in (True, False)]


def _group_limited_greedy(scaled: bool):
    """DeepSeek-V2's router feeding the experts; unscaled where the scale is 1."""
    def routed(x, logits, gate_up, down, positions, zeros, group_shape: tuple, topk_groups: int, expanded: tuple,
               flat: tuple, top_k: int, activation: str, scale=None):
        scores = ops.softmax(logits, dim=-1)
        _, groups = ops.topk(ops.max(ops.reshape(scores, shape=group_shape), dims=(-1,)), k=topk_groups, dim=-1)
        outside = _outside_groups(groups, positions, zeros, expanded, flat)
        weights, indices = ops.topk(ops.where(outside, 0.0, scores), k=top_k, dim=-1)
        weights = ops.mul(weights, scale) if scaled else weights
        return ops.moe_experts(x, weights, indices, gate_up, down, activation=activation)

    if scaled:
        routed.__name__ = "raise_moe_group_limited_greedy_scaled"
        return routed

    def pattern(x, logits, gate_up, down, positions, zeros, group_shape: tuple, topk_groups: int, expanded: tuple,
                flat: tuple, top_k: int, activation: str):
        return routed(x, logits, gate_up, down, positions, zeros, group_shape, topk_groups, expanded, flat, top_k,
                      activation)
    pattern.__name__ = "raise_moe_group_limited_greedy"
    return pattern


def _grouped_softmax_moe(x, logits, gate_up, down, group_shape: tuple, topk_groups: int, top_k: int,
                         activation: str, scale=None):
    return ops.moe(x, logits, gate_up, down, top_k=top_k, scoring="softmax", scale=scalar(scale),
                   num_groups=group_shape[1], topk_groups=topk_groups, activation=activation)


GROUPED_MOE_RULES += [Rule(_group_limited_greedy(scaled), _grouped_softmax_moe, when=_groups_tile_experts)
                      for scaled in (True, False)]
