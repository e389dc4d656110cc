"""Raising Llama 4's mixture of experts, whose experts run on every token, into one
``moe {scoring = sigmoid, weigh_inputs = true}``.

transformers' ``Llama4TextMoe`` routes by writing the top-k router logits into a tensor of
``-inf`` (``full_like(...).scatter_``, which the frontend imports as a one-hot comparison
against the expert positions: ``frontends/scatter.py``) and taking sigmoids, so that the
experts not chosen score 0. Then every expert runs on every token: the tokens are repeated
once per expert, each copy scaled by its expert's score, and two batched matmuls over the
stacked weights (``gate_up [experts, hidden, 2 inter]``, gate columns first, and ``down
[experts, inter, hidden]``) apply the SwiGLU experts, whose outputs are summed over the
experts. An expert given a zero input outputs zero (no biases), so this is a routed MLP
whose weights scale the experts' inputs: ``moe`` over the weights transposed to kiln's
layout (``[experts, 2 inter, hidden]`` and ``[experts, hidden, inter]``, folded into
constants), each token through its top-k experts only.

The router is matched as a float32 model has it, and as a bf16 one does (its sigmoid taken in
float32 and cast back); ``moe`` routes in float32 and casts the weights to the model's dtype
before scaling the inputs, as transformers does.
"""

from __future__ import annotations

import torch

from ..ir import FoldedData, dtypes, ops
from ..ir.shapes import dims_equal
from .pattern import AttrVar, Match
from .rewriter import Rule


def _scores(logits, positions, fill, k: int, in_float32: bool):
    """The router: sigmoids of the top-k logits written into ``fill`` (``-inf``); taken in
    float32 and cast back where the model is narrower."""
    top, indices = ops.topk(logits, k=k, dim=AttrVar("topk_dim"))
    hits = ops.eq(ops.unsqueeze(indices, dim=2), positions)
    written = ops.where(hits, ops.unsqueeze(top, dim=2), float("-inf"))
    chosen = ops.cast(ops.max(ops.cast(hits, dtype=dtypes.float32), dims=(1,)), dtype=dtypes.bool_)
    scored = ops.where(chosen, ops.max(written, dims=(1,)), fill)
    if in_float32:
        return ops.cast(ops.sigmoid(ops.cast(scored, dtype=dtypes.float32)), dtype=AttrVar("narrow"))
    return ops.sigmoid(scored)


def _dense_experts(in_float32: bool):
    """The pattern: every expert on every token, its input scaled by the expert's score;
    summed."""
    def pattern(x, logits, positions, fill, gate_up, down, k: int, lifted: tuple, tiled: tuple, rows: tuple,
                column: tuple, per_expert: tuple, gate_size: int, up_size: int):
        scores = _scores(logits, positions, fill, k, in_float32)
        return _experts(x, scores, gate_up, down, lifted, tiled, rows, column, per_expert, gate_size, up_size)

    pattern.__name__ = f"raise_moe_dense_sigmoid{'_in_float32' if in_float32 else ''}"
    return pattern


def _experts(x, scores, gate_up, down, lifted, tiled, rows, column, per_expert, gate_size, up_size):
    """x repeated once per expert, each copy scaled by its expert's scores, through the
    stacked SwiGLU experts by two batched matmuls, summed over the experts."""
    repeated = ops.reshape(ops.expand(ops.reshape(x, shape=lifted), shape=tiled), shape=rows)
    weighed = ops.mul(repeated, ops.reshape(ops.transpose(scores, dim0=0, dim1=1), shape=column))
    projected = ops.matmul(ops.reshape(weighed, shape=per_expert), gate_up)
    gate, up = ops.split(projected, dim=AttrVar("split_dim"), sizes=(gate_size, up_size))
    return ops.sum(ops.matmul(ops.mul(up, ops.silu(gate)), down), dims=(0,))


def _moe(x, logits, positions, fill, gate_up, down, k: int, lifted: tuple, tiled: tuple, rows: tuple,
         column: tuple, per_expert: tuple, gate_size: int, up_size: int):
    return ops.moe(x, logits, ops.transpose(gate_up, dim0=1, dim1=2), ops.transpose(down, dim0=1, dim1=2),
                   top_k=k, scoring="sigmoid", weigh_inputs=True, activation="silu")


def _minus_inf(value) -> bool:
    """A ``full`` of ``-inf``, or its constant once folded (made, not read from weights)."""
    if value.producer is not None:
        return value.producer.op == "full" and value.producer.attrs["value"] == float("-inf")
    made = value.is_literal or (isinstance(value.data, FoldedData) and not value.data.inputs)
    return made and bool(torch.all(value.tensor() == float("-inf")))


def _result(m: Match, op: str):
    """The type of the one matched node of ``op``."""
    return next(n.results[0].type for n in m.nodes.values() if n.op == op)


def _routes_every_token(m: Match) -> bool:
    """x ``[tokens, hidden]`` and the logits ``[tokens, experts]``; the positions are
    ``0 .. experts - 1`` and the fill ``-inf``; the tokens are tiled expert-major, as the
    transposed scores are; the weights are constants of one expert count and the SwiGLU's
    gate and up halves."""
    x, logits, gate_up, down = (m[name].type for name in ("x", "logits", "gate_up", "down"))
    if x.rank != 2 or logits.rank != 2 or not dims_equal(x.shape[0], logits.shape[0]):
        return False
    tokens, hidden = x.shape
    experts = logits.shape[1]
    if not (m["gate_up"].is_constant and m["down"].is_constant and gate_up.rank == 3 and down.rank == 3):
        return False
    inter = down.shape[1]
    if tuple(gate_up.shape) != (experts, hidden, 2 * inter) or tuple(down.shape) != (experts, inter, hidden):
        return False
    if (m["gate_size"], m["up_size"]) != (inter, inter) or m["split_dim"] not in (-1, 2):
        return False
    if m["topk_dim"] not in (-1, 1) or m.attrs.get("narrow", x.dtype) != x.dtype:
        return False
    positions = m["positions"]
    if not positions.is_literal or not torch.equal(positions.tensor(), torch.arange(experts).reshape(1, 1, -1)):
        return False
    if not _minus_inf(m["fill"]) or not m["fill"].type.equivalent(logits):
        return False
    tiled = _result(m, "expand")
    return tiled.rank == 4 and all(dims_equal(a, b) for a, b in zip(tiled.shape, (experts, tokens, 1, hidden))) \
        and m["per_expert"][0] == experts


DENSE_MOE_RULES = [Rule(_dense_experts(in_float32), _moe, when=_routes_every_token) for in_float32 in (False, True)]
