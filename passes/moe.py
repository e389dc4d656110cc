"""Raising a mixture-of-experts layer: the router's ops that export leaves, and the
``moe_experts`` node the frontend imports, become one ``moe`` op.

Routers differ by family, and each becomes attributes of ``moe``:

- softmax over the experts, then top-k (Qwen2-MoE, OLMoE): ``normalize=False``;
- the same, renormalized over the chosen experts (Mixtral, Qwen3-MoE): ``normalize=True``;
- top-k of the logits, then softmax over those (GraniteMoE): the same weights as the
  renormalized form, so ``normalize=True``;
- any of these with its weights multiplied by a constant (DeepSeek-V2's
  ``routed_scaling_factor``): ``scale``.

A bf16 model routes in float32: the logits are cast up (the cast stays, as ``moe``'s
operand), and some families cast the weights back down; each form is matched with and
without that cast (``moe`` always routes in float32 and weighs the experts' outputs in
float32).
"""

from __future__ import annotations

from itertools import product

from ..ir import ops
from .pattern import AttrVar, Match
from .rewriter import Rule

ORDERS = ("softmax_topk", "softmax_topk_normalized", "topk_softmax")


def _routed(order: str, cast_weights: bool, scaled: bool):
    """The pattern of one router form feeding the experts (its weights scaled by a constant,
    as DeepSeek-V2's ``routed_scaling_factor``, when ``scaled``)."""
    def pattern(x, logits, gate_up, down, k: int, activation: str, scale=None):
        if order == "topk_softmax":
            top, indices = ops.topk(logits, k=k, dim=AttrVar("topk_dim"))
            weights = ops.softmax(top, dim=AttrVar("softmax_dim"))
        else:
            weights, indices = ops.topk(ops.softmax(logits, dim=AttrVar("softmax_dim")), k=k, dim=AttrVar("topk_dim"))
            if order == "softmax_topk_normalized":
                weights = ops.div(weights, ops.sum(weights, dims=(AttrVar("sum_dim"),), keepdim=True))
        if scaled:
            weights = ops.mul(weights, scale)
        if cast_weights:
            weights = ops.cast(weights, dtype=AttrVar("narrow"))
        return ops.moe_experts(x, weights, indices, gate_up, down, activation=activation)

    if not scaled:
        def unscaled(x, logits, gate_up, down, k: int, activation: str):
            return pattern(x, logits, gate_up, down, k, activation)
        unscaled.__name__ = f"raise_moe_{order}{'_cast_weights' if cast_weights else ''}"
        return unscaled
    pattern.__name__ = f"raise_moe_{order}_scaled{'_cast_weights' if cast_weights else ''}"
    return pattern


def _moe(normalize: bool):
    def replacement(x, logits, gate_up, down, k: int, activation: str, scale=None):
        return ops.moe(x, logits, gate_up, down, top_k=k, normalize=normalize, scale=scalar(scale),
                       activation=activation)
    return replacement


def scalar(value) -> float:
    """The number a one-element constant holds (1.0 where there is none)."""
    return 1.0 if value is None else float(value.tensor().reshape(-1)[0])


def is_scalar_constant(value) -> bool:
    """Whether ``value`` is absent or a one-element literal (a routing scale)."""
    return value is None or (value.is_literal and value.type.static_numel == 1)


def _over_experts(m: Match) -> bool:
    """Every routing step works along the experts (the last dim), and a scale is one number."""
    rank = m["logits"].type.rank
    return all(m.attrs[d] in (-1, rank - 1) for d in ("topk_dim", "softmax_dim", "sum_dim") if d in m.attrs) \
        and is_scalar_constant(m.values.get("scale"))


MOE_RULES = [Rule(_routed(order, cast, scaled), _moe(order != "softmax_topk"), when=_over_experts)
             for order, cast, scaled in product(ORDERS, (False, True), (False, True))]
