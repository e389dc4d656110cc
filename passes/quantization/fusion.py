"""The fusions of ``passes/fusion.py`` for quantized linear layers, generated per op:
Q, K and V projections into one GEMM and a ``split``; gate and up projections into one
GEMM and a ``gated_activation``; and the selection of logits rows above a quantized LM
head. A quantized weight's operands (codes, scales, zero points) all run along the
output dim, so fusing concatenates each of them; fused constants stay lazy."""

from __future__ import annotations

import inspect

from ...ir import ops
from ..pattern import Match
from ..rewriter import Rule

# op -> its weight operands, between the input and the bias
WEIGHT_OPERANDS = {"linear_int8": ("qweight", "scale"), "linear_int4": ("qweight", "scales", "zeros"),
                   "linear_fp8": ("qweight", "weight_scale")}
_GATED = {"silu": lambda t: ops.silu(t), "gelu": lambda t: ops.gelu(t), "gelu_tanh": lambda t: ops.gelu(t, approximate="tanh")}


def _with_signature(fn, names):
    fn.__signature__ = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                          for n in names])
    return fn


def _parts(layer: str, op: str) -> list[str]:
    return [f"{layer}_{p}" for p in WEIGHT_OPERANDS[op]]


def _call(op: str, x, parts):
    return ops.call(op, x, *parts)


def _fused_parts(op: str, values: dict, layers: tuple[str, ...]) -> list:
    return [ops.concat([values[f"{layer}_{p}"] for layer in layers], dim=0) for p in WEIGHT_OPERANDS[op]]


def _all_constant(op: str, layers: tuple[str, ...]):
    names = [n for layer in layers for n in _parts(layer, op)]

    def check(m: Match) -> bool:
        groups = {m[f"{layer}_{WEIGHT_OPERANDS[op][1]}"].type.shape[1:] for layer in layers}
        return all(m[n].is_constant for n in names) and len(groups) == 1
    return check


def _qkv_rule(op: str) -> Rule:
    layers = ("q", "k", "v")
    names = ["x", *(n for layer in layers for n in _parts(layer, op))]

    def pattern(**v):
        return tuple(_call(op, v["x"], [v[n] for n in _parts(layer, op)]) for layer in layers)

    def replacement(**v):
        sizes = tuple(v[f"{layer}_qweight"].shape[0] for layer in layers)
        return ops.split(_call(op, v["x"], _fused_parts(op, v, layers)), dim=-1, sizes=sizes)

    return Rule(_with_signature(pattern, names), _with_signature(replacement, names), when=_all_constant(op, layers),
                name=f"fuse_qkv_{op}")


def _gated_rule(op: str, activation: str) -> Rule:
    layers = ("gate", "up")
    names = ["x", *(n for layer in layers for n in _parts(layer, op))]

    def pattern(**v):
        gate, up = (_call(op, v["x"], [v[n] for n in _parts(layer, op)]) for layer in layers)
        return ops.mul(_GATED[activation](gate), up)

    def replacement(**v):
        return ops.gated_activation(_call(op, v["x"], _fused_parts(op, v, layers)), activation=activation)

    return Rule(_with_signature(pattern, names), _with_signature(replacement, names), when=_all_constant(op, layers),
                name=f"fuse_{activation}_{op}")


def _selection_rule(op: str) -> Rule:
    names = ["x", *WEIGHT_OPERANDS[op], "index"]

    def pattern(x, index, dim: int, **parts):
        return ops.index_select(_call(op, x, [parts[p] for p in WEIGHT_OPERANDS[op]]), index, dim=dim)

    def replacement(x, index, dim: int, **parts):
        return _call(op, ops.index_select(x, index, dim=dim), [parts[p] for p in WEIGHT_OPERANDS[op]])

    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    params.append(inspect.Parameter("dim", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int))
    for fn in (pattern, replacement):
        fn.__signature__ = inspect.Signature(params)
    return Rule(pattern, replacement, when=lambda m: m["dim"] % m["x"].type.rank != m["x"].type.rank - 1,
                name=f"select_before_{op}")


QUANTIZED_FUSION_RULES = [rule for op in WEIGHT_OPERANDS for rule in
                          (_qkv_rule(op), *(_gated_rule(op, a) for a in _GATED))]
QUANTIZED_SELECTION_RULES = [_selection_rule(op) for op in WEIGHT_OPERANDS]
