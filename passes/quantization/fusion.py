"""The fusions of ``passes/fusion.py`` for quantized linear layers, generated per op:
Q, K and V projections into one GEMM and a ``split``; gate and up projections into one
GEMM and a ``gated_activation``; and the selection of logits rows above a quantized LM
head. A quantized weight's operands (codes, scales, zero points) all run along the
output dim, so fusing concatenates each of them; fused constants stay lazy. Layers fuse
only when what they share beside the input (FP8's static input scale) is one value."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from ...ir import ops
from ..pattern import Match
from ..rewriter import Rule


@dataclass(frozen=True)
class Variant:
    """A quantized linear as the rules see it: the op, its per-layer weight operands
    (between the input and the bias), the operands the fused layers must share, and what
    tells its rules' names from those of the op's other forms."""

    op: str
    parts: tuple[str, ...]
    shared: tuple[str, ...] = ()
    tag: str = ""

    @property
    def label(self) -> str:
        return self.op + self.tag

    def call(self, x, values: dict, prefix: str = ""):
        return ops.call(self.op, x, *(values[prefix + p] for p in self.parts), *(values[s] for s in self.shared))


VARIANTS = (Variant("linear_int8", ("qweight", "scale")),
            Variant("linear_int8", ("qweight", "scale", "zeros"), tag="_zeros"),
            Variant("linear_int4", ("qweight", "scales", "zeros")),
            Variant("linear_fp8", ("qweight", "weight_scale")),
            Variant("linear_fp8", ("qweight", "weight_scale"), ("input_scale",), tag="_static"),
            Variant("linear_w8a8", ("qweight", "weight_scale")))
_GATED = {"silu": lambda t: ops.silu(t), "gelu": lambda t: ops.gelu(t),
          "gelu_tanh": lambda t: ops.gelu(t, approximate="tanh")}


def signature(fn, names, attrs=()):
    """Give ``fn`` (taking ``**values``) the parameters ``names`` (values) and ``attrs``
    (attribute variables), so that the pattern tracer and the rewriter bind them by name."""
    fn.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
        + [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int) for n in attrs])
    return fn


def _names(variant: Variant, layers: tuple[str, ...]) -> list[str]:
    return ["x", *(f"{layer}_{p}" for layer in layers for p in variant.parts), *variant.shared]


def _fused(variant: Variant, v: dict, layers: tuple[str, ...]):
    parts = {p: ops.concat([v[f"{layer}_{p}"] for layer in layers], dim=0) for p in variant.parts}
    return variant.call(v["x"], {**parts, **{s: v[s] for s in variant.shared}})


def _fusable(variant: Variant, layers: tuple[str, ...]):
    """Every weight operand constant, and one group count (grouped scales) for all layers."""
    def check(m: Match) -> bool:
        groups = {m[f"{layer}_{variant.parts[1]}"].type.shape[1:] for layer in layers}
        return all(m[f"{layer}_{p}"].is_constant for layer in layers for p in variant.parts) and len(groups) == 1
    return check


def _qkv_rule(variant: Variant) -> Rule:
    layers = ("q", "k", "v")

    def pattern(**v):
        return tuple(variant.call(v["x"], v, f"{layer}_") for layer in layers)

    def replacement(**v):
        sizes = tuple(v[f"{layer}_qweight"].shape[0] for layer in layers)
        return ops.split(_fused(variant, v, layers), dim=-1, sizes=sizes)

    names = _names(variant, layers)
    return Rule(signature(pattern, names), signature(replacement, names), when=_fusable(variant, layers),
                name=f"fuse_qkv_{variant.label}")


def _gated_rule(variant: Variant, activation: str) -> Rule:
    layers = ("gate", "up")

    def pattern(**v):
        gate, up = (variant.call(v["x"], v, f"{layer}_") for layer in layers)
        return ops.mul(_GATED[activation](gate), up)

    def replacement(**v):
        return ops.gated_activation(_fused(variant, v, layers), activation=activation)

    names = _names(variant, layers)
    return Rule(signature(pattern, names), signature(replacement, names), when=_fusable(variant, layers),
                name=f"fuse_{activation}_{variant.label}")


def _selection_rule(variant: Variant) -> Rule:
    def pattern(x, index, dim, **v):
        return ops.index_select(variant.call(x, v), index, dim=dim)

    def replacement(x, index, dim, **v):
        return variant.call(ops.index_select(x, index, dim=dim), v)

    names = ["x", *variant.parts, *variant.shared, "index"]
    return Rule(signature(pattern, names, ("dim",)), signature(replacement, names, ("dim",)),
                when=lambda m: m["dim"] % m["x"].type.rank != m["x"].type.rank - 1,
                name=f"select_before_{variant.label}")


QUANTIZED_FUSION_RULES = [rule for variant in VARIANTS for rule in
                          (_qkv_rule(variant), *(_gated_rule(variant, a) for a in _GATED))]
QUANTIZED_SELECTION_RULES = [_selection_rule(variant) for variant in VARIANTS]
