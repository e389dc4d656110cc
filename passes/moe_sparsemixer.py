"""Raising PhiMoE's router: sparsemixer routing in front of ``moe_experts`` becomes one
``moe {scoring = sparsemixer}``.

transformers' ``sparsemixer`` (inference mode) routes each token to two experts, in two
rounds. A round takes the best remaining logit (``max``, ``argmax``), masks with ``-inf``
the remaining logits farther from it than ``2 * jitter_eps`` relative to ``max(|logit|,
best)``, and weighs the chosen expert by its softmax over what is left. The second round
starts from the logits with the first choice set to ``-inf`` (a ``scatter`` that the
frontend imports as a one-hot comparison, ``frontends/aten.py``). The weights are not
renormalized.
"""

from __future__ import annotations

import torch

from ..ir import ops
from .moe import scalar
from .moe_grouped import one_hot_hits
from .pattern import Match
from .rewriter import Rule

ROUNDS = 2  # transformers' sparsemixer always chooses two experts


def _round(logits, magnitude, remaining, threshold):
    """One choice: the best remaining expert and its weight."""
    best = ops.max(remaining, dims=(-1,), keepdim=True)
    index = ops.argmax(remaining, dim=-1, keepdim=True)
    far = ops.gt(ops.div(ops.sub(best, logits), ops.maximum(magnitude, best)), threshold)
    weight = ops.gather(ops.softmax(ops.where(far, float("-inf"), remaining), dim=-1), index, dim=-1)
    return weight, index


def _sparsemixer(x, logits, gate_up, down, threshold, positions, activation: str):
    magnitude = ops.abs(logits)
    weights, indices, remaining = [], [], logits
    for choice in range(ROUNDS):
        weight, index = _round(logits, magnitude, remaining, threshold)
        weights.append(weight)
        indices.append(index)
        if choice < ROUNDS - 1:
            remaining = ops.where(one_hot_hits(index, positions), float("-inf"), remaining)
    return ops.moe_experts(x, ops.concat(weights, dim=-1), ops.concat(indices, dim=-1), gate_up, down,
                           activation=activation)


def _sparsemixer_moe(x, logits, gate_up, down, threshold, activation: str):
    return ops.moe(x, logits, gate_up, down, top_k=ROUNDS, scoring="sparsemixer", jitter_eps=scalar(threshold) / 2,
                   activation=activation)


def _over_experts(m: Match) -> bool:
    """The threshold is one number and the one-hot positions are ``0 .. experts - 1``."""
    threshold, positions = m["threshold"], m["positions"]
    experts = m["logits"].type.shape[-1]
    if not (threshold.is_literal and threshold.type.static_numel == 1 and positions.is_literal
            and isinstance(experts, int) and positions.type.static_numel == experts):
        return False
    return bool(torch.equal(positions.tensor().reshape(-1), torch.arange(experts)))


SPARSEMIXER_RULES = [Rule(_sparsemixer, _sparsemixer_moe, when=_over_experts, name="raise_moe_sparsemixer")]
