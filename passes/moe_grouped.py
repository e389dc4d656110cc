"""Raising DeepSeek-V3's router: grouped, bias-corrected sigmoid routing in front of
``moe_experts`` becomes one ``moe {scoring = sigmoid}``.

transformers' ``DeepseekV3TopkRouter`` scores experts by ``sigmoid(logits)``, adds the
correction bias for the choice, keeps the ``topk_group`` best of ``n_group`` groups (a group
scores the sum of its two best), masks the other groups' experts with ``-inf``, takes the
top-k, weighs by the unbiased scores, optionally renormalizes (``+ 1e-20``), and scales. Its
group mask is a ``scatter_`` that the frontend imports as a one-hot comparison against the
group positions (``frontends/aten.py``); the rule matches that form, the positions being a
constant ``0 .. n_group - 1``.
"""

from __future__ import annotations

import torch

from ..ir import dtypes, ops
from .pattern import Match
from .rewriter import Rule


def _routing(logits, bias, positions, zeros, group_shape, topk_groups, expanded, flat, top_k, normalize: bool):
    """The router's weights and indices, as the frontend imports them."""
    scores = ops.sigmoid(logits)
    choice = ops.add(scores, bias)
    best, _ = ops.topk(ops.reshape(choice, shape=group_shape), k=2, dim=-1)
    _, groups = ops.topk(ops.sum(best, dims=(-1,)), k=topk_groups, dim=-1)
    hits = ops.cast(ops.eq(ops.unsqueeze(groups, dim=2), positions), dtype=dtypes.float32)
    kept = ops.where(ops.cast(ops.max(hits, dims=(1,)), dtype=dtypes.bool_), 1.0, zeros)
    mask = ops.reshape(ops.expand(ops.unsqueeze(kept, dim=-1), shape=expanded), shape=flat)
    _, indices = ops.topk(ops.where(ops.logical_not(ops.cast(mask, dtype=dtypes.bool_)), float("-inf"), choice),
                          k=top_k, dim=-1)
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
                       scale=1.0 if scale is None else float(scale.tensor().reshape(-1)[0]),
                       num_groups=group_shape[1], topk_groups=topk_groups, activation=activation)
    return replacement


def _grouped_over_experts(m: Match) -> bool:
    """The groups tile the experts, their positions are ``0 .. n_group - 1``, the mask starts
    from zeros, and the scale is one number."""
    experts = m["logits"].type.shape[-1]
    shape = m["group_shape"]
    if len(shape) != 3 or not isinstance(shape[1], int) or shape[1] * shape[2] != experts:
        return False
    positions, zeros, scale = m["positions"], m["zeros"], m.values.get("scale")
    if not positions.is_literal or positions.type.static_numel != shape[1] or m["bias"].type.rank != 1:
        return False
    if scale is not None and not (scale.is_literal and scale.type.static_numel == 1):
        return False
    return bool(torch.equal(positions.tensor().reshape(-1), torch.arange(shape[1]))) \
        and zeros.producer is not None and zeros.producer.op == "full" and zeros.producer.attrs["value"] == 0.0


GROUPED_MOE_RULES = [Rule(_router(normalize, scaled), _moe(normalize), when=_grouped_over_experts)
                     for normalize in (True, False) for scaled in (True, False)]
