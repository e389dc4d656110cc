"""The one place that knows ONNX ops: how each becomes kiln ops, or, when every input is
known while importing (shape arithmetic), a known value computed with numpy. The
data-movement and shape ops are in ``onnx_shape_ops.py``; ``CONVERTERS`` holds them all.

``CONVERTERS`` maps an ONNX op type (domain ``ai.onnx``) to ``fn(cx, inputs, attrs,
opset)``: ``inputs`` are value names (``""`` for a missing optional one), ``cx`` an
``OnnxImport``; it returns a kiln value, a known numpy array, or a tuple of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import sympy

from ..ir import ops
from .errors import FrontendError
from .onnx_context import OnnxImport
from .onnx_shape_ops import SHAPE_CONVERTERS, as_dim, axes_of, known_all

Converter = Callable[[OnnxImport, list, dict, int], Any]


def elementwise(op: str, fold: Callable[..., Any] | None = None) -> Converter:
    """A kiln elementwise op; with every input known, ``fold`` computes it with numpy."""
    def convert(cx: OnnxImport, inputs: list, attrs: dict, opset: int) -> Any:
        known = known_all(cx, inputs)
        if fold is not None and known is not None:
            return np.asarray(fold(*known))
        return ops.call(op, *(cx.tensor(n) for n in inputs))
    return convert


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        return a / b
    if a.dtype == object or b.dtype == object:
        return np.vectorize(lambda x, y: as_dim(sympy.sympify(x) / y) if isinstance(x, sympy.Basic) else int(x / y),
                            otypes=[object])(a, b)
    return np.trunc(a / b).astype(a.dtype)


def unary(op: str) -> Converter:
    def convert(cx: OnnxImport, inputs: list, attrs: dict, opset: int) -> Any:
        return ops.call(op, cx.tensor(inputs[0]))
    return convert


def _text(attrs: dict, key: str, default: str) -> str:
    value = attrs.get(key, default)
    return value.decode() if isinstance(value, bytes) else value


def _gelu(cx, inputs, attrs, opset):
    return ops.gelu(cx.tensor(inputs[0]), approximate=_text(attrs, "approximate", "none"))


def _compare(op: str):
    """Equal, Less, Greater, ...: folded when known (shape tests), else the kiln comparison."""
    folds = {"eq": np.equal, "lt": np.less, "gt": np.greater, "le": np.less_equal, "ge": np.greater_equal}
    return elementwise(op, lambda a, b: folds[op](a, b))




























def _argmax(cx, inputs, attrs, opset):
    if attrs.get("select_last_index", 0):
        raise FrontendError("ArgMax with select_last_index is not supported")
    return ops.argmax(cx.tensor(inputs[0]), dim=attrs.get("axis", 0), keepdim=bool(attrs.get("keepdims", 1)))










def _matmul(cx, inputs, attrs, opset):
    return ops.matmul(cx.tensor(inputs[0]), cx.tensor(inputs[1]))


def _gemm(cx, inputs, attrs, opset):
    a, b = cx.tensor(inputs[0]), cx.tensor(inputs[1])
    if attrs.get("transA", 0):
        a = ops.transpose(a, dim0=0, dim1=1)
    bias = cx.tensor(inputs[2]) if len(inputs) > 2 and inputs[2] else None
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if attrs.get("transB", 0) and alpha == 1.0 and beta == 1.0 and (bias is None or len(bias.shape) == 1):
        return ops.linear(a, b, bias)
    out = ops.matmul(a, ops.transpose(b, dim0=0, dim1=1) if attrs.get("transB", 0) else b)
    if alpha != 1.0:
        out = out * cx.graph.scalar(alpha, out.dtype)
    if bias is not None:
        out = out + (bias if beta == 1.0 else bias * cx.graph.scalar(beta, bias.dtype))
    return out


def _conv(cx, inputs, attrs, opset):
    if _text(attrs, "auto_pad", "NOTSET") != "NOTSET":
        raise FrontendError(f"Conv auto_pad {attrs['auto_pad']!r} is not supported: export explicit pads")
    x, weight = cx.tensor(inputs[0]), cx.tensor(inputs[1])
    spatial = len(x.shape) - 2
    pads = list(attrs.get("pads", [0] * 2 * spatial))
    if pads[:spatial] != pads[spatial:]:
        raise FrontendError(f"Conv pads {pads} are not symmetric")
    bias = cx.tensor(inputs[2]) if len(inputs) > 2 and inputs[2] else None
    return ops.conv(x, weight, bias, stride=tuple(attrs.get("strides", [1] * spatial)), padding=tuple(pads[:spatial]),
                    dilation=tuple(attrs.get("dilations", [1] * spatial)), groups=attrs.get("group", 1))


def _reduce(op: str) -> Converter:
    def convert(cx, inputs, attrs, opset):
        x = cx.tensor(inputs[0])
        axes = axes_of(cx, inputs, attrs) or ([] if attrs.get("noop_with_empty_axes", 0) else list(range(len(x.shape))))
        if not axes:
            return x
        return ops.call(op, x, dims=tuple(a % len(x.shape) for a in axes), keepdim=bool(attrs.get("keepdims", 1)))
    return convert


def _softmax(op: str) -> Converter:
    def convert(cx, inputs, attrs, opset):
        return ops.call(op, cx.tensor(inputs[0]), dim=attrs.get("axis", -1))
    return convert


def _norm(op: str) -> Converter:
    def convert(cx, inputs, attrs, opset):
        x = cx.tensor(inputs[0])
        if attrs.get("axis", -1) % len(x.shape) != len(x.shape) - 1:
            raise FrontendError(f"normalization over axis {attrs['axis']} (kiln normalizes the last dim)")
        rest = [cx.tensor(n) if n else None for n in inputs[1:]]
        return ops.call(op, x, *rest, eps=attrs.get("epsilon", 1e-5))
    return convert




def _attention(cx, inputs, attrs, opset):
    if len(inputs) > 4 and any(inputs[4:]):
        raise FrontendError("Attention with a past key and value cache is not supported")
    q, k, v = (cx.tensor(n) for n in inputs[:3])
    if len(q.shape) != 4:
        raise FrontendError("Attention is supported on 4-D [batch, heads, seq, dim] inputs")
    mask = cx.tensor(inputs[3]) if len(inputs) > 3 and inputs[3] else None
    return ops.attention(q, k, v, mask, scale=attrs.get("scale"), causal=bool(attrs.get("is_causal", 0)),
                         softcap=attrs.get("softcap") or None)




def _trilu(cx, inputs, attrs, opset):
    """The upper (or lower) triangle of the last two dims from diagonal k, zeros elsewhere:
    a mask of ``column - row >= k`` (``<= k``) built from two aranges, then ``where``."""
    x = cx.tensor(inputs[0])
    k = int(cx.ints(inputs[1], "the diagonal")[0]) if len(inputs) > 1 and inputs[1] else 0
    rows, cols = (ops.arange(end=d, graph=cx.graph) for d in x.shape[-2:])
    offset = ops.sub(ops.unsqueeze(cols, dim=0), ops.unsqueeze(rows, dim=1))
    diagonal = cx.graph.scalar(k, offset.dtype)
    keep = ops.ge(offset, diagonal) if attrs.get("upper", 1) else ops.le(offset, diagonal)
    return ops.where(keep, x, cx.graph.scalar(0, x.dtype))


def _is_nan(cx, inputs, attrs, opset):
    x = cx.tensor(inputs[0])
    return ops.ne(x, x)


CONVERTERS: dict[str, Converter] = {
    "Add": elementwise("add", np.add), "Sub": elementwise("sub", np.subtract), "Mul": elementwise("mul", np.multiply),
    "Div": elementwise("div", _div), "Pow": elementwise("pow"), "Max": elementwise("maximum"),
    "Min": elementwise("minimum"), "Equal": _compare("eq"), "Less": _compare("lt"),
    "Greater": _compare("gt"), "LessOrEqual": _compare("le"),
    "GreaterOrEqual": _compare("ge"), "And": elementwise("logical_and", np.logical_and),
    "Or": elementwise("logical_or", np.logical_or), "Not": unary("logical_not"),
    **{name: unary(op) for name, op in (("Neg", "neg"), ("Abs", "abs"), ("Exp", "exp"), ("Log", "log"),
                                         ("Sqrt", "sqrt"), ("Reciprocal", "reciprocal"), ("Sin", "sin"),
                                         ("Cos", "cos"), ("Tanh", "tanh"), ("Erf", "erf"), ("Sigmoid", "sigmoid"),
                                         ("Relu", "relu"), ("Floor", "floor"))},
    **SHAPE_CONVERTERS,
    "Gelu": _gelu, "ArgMax": _argmax, "MatMul": _matmul, "Gemm": _gemm, "Conv": _conv,
    "ReduceSum": _reduce("sum"), "ReduceMean": _reduce("mean"), "ReduceMax": _reduce("max"),
    "ReduceMin": _reduce("min"), "Softmax": _softmax("softmax"), "LogSoftmax": _softmax("log_softmax"),
    "LayerNormalization": _norm("layer_norm"), "RMSNormalization": _norm("rms_norm"),
    "Attention": _attention, "Trilu": _trilu, "IsNaN": _is_nan,
}
