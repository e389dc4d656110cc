"""Elementwise ops: arithmetic and comparisons with broadcasting, unary math,
activations, ``where`` and ``cast``. Operands of one op share a dtype; the frontend and
the builder insert casts and scalar constants of the right dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dtypes
from ..registry import Attr, OpDef
from ..shapes import ShapeError, broadcast_shapes
from ..types import TensorType


def _same_dtype(*types: TensorType) -> None:
    if len({t.dtype for t in types}) != 1:
        raise ShapeError("operand dtypes differ: " + ", ".join(str(t.dtype) for t in types))


def _numeric(t: TensorType) -> None:
    if t.dtype.kind == "bool" or t.dtype.is_packed:
        raise ShapeError(f"expects a numeric operand, got {t.dtype}")


def _float(t: TensorType) -> None:
    if not t.dtype.is_float:
        raise ShapeError(f"expects a floating-point operand, got {t.dtype}")


def arithmetic(x: TensorType, y: TensorType) -> TensorType:
    _same_dtype(x, y)
    _numeric(x)
    return TensorType(x.dtype, broadcast_shapes(x.shape, y.shape))


def float_arithmetic(x: TensorType, y: TensorType) -> TensorType:
    _float(x)
    return arithmetic(x, y)


def comparison(x: TensorType, y: TensorType) -> TensorType:
    _same_dtype(x, y)
    return TensorType(dtypes.bool_, broadcast_shapes(x.shape, y.shape))


def logical(x: TensorType, y: TensorType) -> TensorType:
    if x.dtype != dtypes.bool_ or y.dtype != dtypes.bool_:
        raise ShapeError(f"expects bool operands, got {x.dtype} and {y.dtype}")
    return TensorType(dtypes.bool_, broadcast_shapes(x.shape, y.shape))


def numeric_unary(x: TensorType) -> TensorType:
    _numeric(x)
    return x


def float_unary(x: TensorType) -> TensorType:
    _float(x)
    return x


def _binary(name: str, reference, infer=arithmetic, commutative: bool = False, doc: str = "") -> OpDef:
    return OpDef(name, ("x", "y"), infer, reference, commutative=commutative, doc=doc)


def _unary(name: str, reference, infer=float_unary, doc: str = "") -> OpDef:
    return OpDef(name, ("x",), infer, reference, doc=doc or f"elementwise {name}")


def _where(cond: TensorType, x: TensorType, y: TensorType) -> TensorType:
    if cond.dtype != dtypes.bool_:
        raise ShapeError(f"condition must be bool, got {cond.dtype}")
    _same_dtype(x, y)
    return TensorType(x.dtype, broadcast_shapes(cond.shape, broadcast_shapes(x.shape, y.shape)))


def _cast(x: TensorType, dtype: dtypes.DType) -> TensorType:
    if x.dtype.is_packed or dtype.is_packed:
        raise ShapeError("casts to and from i4 are not defined; use the quantization ops")
    return x.with_dtype(dtype)


def _logical_not(x: TensorType) -> TensorType:
    if x.dtype != dtypes.bool_:
        raise ShapeError(f"expects a bool operand, got {x.dtype}")
    return x


def _clamp(x: TensorType, min: float | None, max: float | None) -> TensorType:
    _numeric(x)
    if min is None and max is None:
        raise ShapeError("clamp needs min or max")
    return x


OPS = [
    _binary("add", torch.add, commutative=True, doc="x + y"),
    _binary("sub", torch.sub, doc="x - y"),
    _binary("mul", torch.mul, commutative=True, doc="x * y"),
    _binary("div", torch.div, float_arithmetic, doc="x / y (true division, floating point)"),
    _binary("pow", torch.pow, float_arithmetic, doc="x ** y"),
    _binary("maximum", torch.maximum, commutative=True, doc="elementwise max"),
    _binary("minimum", torch.minimum, commutative=True, doc="elementwise min"),
    _binary("eq", torch.eq, comparison, commutative=True, doc="x == y"),
    _binary("ne", torch.ne, comparison, commutative=True, doc="x != y"),
    _binary("lt", torch.lt, comparison, doc="x < y"),
    _binary("le", torch.le, comparison, doc="x <= y"),
    _binary("gt", torch.gt, comparison, doc="x > y"),
    _binary("ge", torch.ge, comparison, doc="x >= y"),
    _binary("logical_and", torch.logical_and, logical, commutative=True, doc="x and y"),
    _binary("logical_or", torch.logical_or, logical, commutative=True, doc="x or y"),
    _unary("logical_not", torch.logical_not, _logical_not, doc="not x"),
    _unary("neg", torch.neg, numeric_unary, doc="-x"),
    _unary("abs", torch.abs, numeric_unary, doc="|x|"),
    _unary("exp", torch.exp),
    _unary("log", torch.log),
    _unary("sqrt", torch.sqrt),
    _unary("rsqrt", torch.rsqrt, doc="1 / sqrt(x)"),
    _unary("reciprocal", torch.reciprocal, doc="1 / x"),
    _unary("sin", torch.sin),
    _unary("cos", torch.cos),
    _unary("tanh", torch.tanh),
    _unary("erf", torch.erf),
    _unary("sigmoid", torch.sigmoid),
    _unary("relu", torch.relu, numeric_unary),
    _unary("silu", F.silu, doc="x * sigmoid(x)"),
    OpDef("gelu", ("x",), lambda x, approximate: float_unary(x),
          lambda x, approximate: F.gelu(x, approximate=approximate),
          attrs={"approximate": Attr("str", "none", choices=("none", "tanh"))},
          doc="GELU, exact (erf) or its tanh approximation"),
    _unary("expm1", torch.expm1, doc="exp(x) - 1, exact near 0"),
    _unary("log1p", torch.log1p, doc="log(1 + x), exact near 0"),
    _unary("floor", torch.floor, doc="the largest integer not above x (as a float)"),
    OpDef("softplus", ("x",), lambda x, beta, threshold: float_unary(x),
          lambda x, beta, threshold: F.softplus(x, beta, threshold),
          attrs={"beta": Attr("float", 1.0), "threshold": Attr("float", 20.0)},
          doc="log(1 + exp(beta * x)) / beta, or x where beta * x > threshold"),
    OpDef("clamp", ("x",), _clamp, lambda x, min, max: torch.clamp(x, min, max),
          attrs={"min": Attr("float", optional=True), "max": Attr("float", optional=True)},
          doc="x limited to [min, max]"),
    OpDef("where", ("cond", "x", "y"), _where, torch.where, doc="x where cond else y"),
    OpDef("cast", ("x",), _cast, lambda x, dtype: x.to(dtype.torch_dtype),
          attrs={"dtype": Attr("dtype")}, doc="convert to another dtype"),
]
