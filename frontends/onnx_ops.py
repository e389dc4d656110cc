"""The one place that knows ONNX ops: how each becomes kiln ops, or, when every input is
known while importing (shape arithmetic), a known value computed with numpy.

``CONVERTERS`` maps an ONNX op type (domain ``ai.onnx``) to ``fn(cx, inputs, attrs,
opset)``: ``inputs`` are value names (``""`` for a missing optional one), ``cx`` an
``OnnxImport``; it returns a kiln value, a known numpy array, or a tuple of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import sympy

from ..ir import Value, ops
from ..ir.shapes import normalize_dim
from .errors import FrontendError
from .onnx import OnnxImport, kiln_dtype

Converter = Callable[[OnnxImport, list, dict, int], Any]


def _known_all(cx: OnnxImport, inputs: list) -> list | None:
    values = [cx.known(n) for n in inputs if n]
    return values if all(v is not None for v in values) else None


def _dim(value: Any) -> Any:
    """A known element as an int or a kiln dim."""
    return normalize_dim(value) if isinstance(value, sympy.Basic) else int(value)


def elementwise(op: str, fold: Callable[..., Any] | None = None) -> Converter:
    """A kiln elementwise op; with every input known, ``fold`` computes it with numpy."""
    def convert(cx: OnnxImport, inputs: list, attrs: dict, opset: int) -> Any:
        known = _known_all(cx, inputs)
        if fold is not None and known is not None:
            return np.asarray(fold(*known))
        return ops.call(op, *(cx.tensor(n) for n in inputs))
    return convert


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        return a / b
    if a.dtype == object or b.dtype == object:
        return np.vectorize(lambda x, y: _dim(sympy.sympify(x) / y) if isinstance(x, sympy.Basic) else int(x / y),
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


def _shape(cx, inputs, attrs, opset):
    value = cx.values[inputs[0]]
    shape = list(value.shape) if isinstance(value, Value) else list(np.shape(value))
    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
    return np.array(shape[start:end], dtype=object if any(not isinstance(d, int) for d in shape) else np.int64)


def _constant(cx, inputs, attrs, opset):
    from onnx import numpy_helper

    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    for key, kind in (("value_float", np.float32), ("value_int", np.int64), ("value_floats", np.float32),
                      ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=kind)
    raise FrontendError(f"Constant with attributes {sorted(attrs)} is not supported")


def _identity(cx, inputs, attrs, opset):
    return cx.values[inputs[0]]


def _cast(cx, inputs, attrs, opset):
    known = cx.known(inputs[0])
    if known is None:
        return ops.cast(cx.tensor(inputs[0]), dtype=kiln_dtype(attrs["to"]))
    if known.dtype == object:  # dims stay dims
        return known
    return known.astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))


def _result_shape_reshape(source: tuple, target: list, allowzero: int) -> tuple:
    return tuple(source[i] if d == 0 and not allowzero else d for i, d in enumerate(target))


def _reshape(cx, inputs, attrs, opset):
    target = cx.ints(inputs[1], "the target shape")
    known = cx.known(inputs[0])
    if known is not None:
        return known.reshape([int(d) for d in _result_shape_reshape(known.shape, target, attrs.get("allowzero", 0))])
    x = cx.tensor(inputs[0])
    return ops.reshape(x, shape=_result_shape_reshape(x.shape, [_dim(d) for d in target], attrs.get("allowzero", 0)))


def _flatten(cx, inputs, attrs, opset):
    x = cx.tensor(inputs[0])
    axis = attrs.get("axis", 1) % max(len(x.shape), 1)
    lead, rest = x.shape[:axis], x.shape[axis:]
    return ops.reshape(x, shape=(normalize_dim(math.prod(lead)), normalize_dim(math.prod(rest))))


def _axes(cx: OnnxImport, inputs: list, attrs: dict) -> list[int]:
    if len(inputs) > 1 and inputs[1]:
        return [int(a) for a in cx.ints(inputs[1], "the axes")]
    return list(attrs.get("axes", []))


def _unsqueeze(cx, inputs, attrs, opset):
    axes = _axes(cx, inputs, attrs)
    known = cx.known(inputs[0])
    if known is not None:
        out = known
        for axis in sorted(a % (known.ndim + len(axes)) for a in axes):
            out = np.expand_dims(out, axis)
        return out
    x = cx.tensor(inputs[0])
    for axis in sorted(a % (len(x.shape) + len(axes)) for a in axes):
        x = ops.unsqueeze(x, dim=axis)
    return x


def _squeeze(cx, inputs, attrs, opset):
    known = cx.known(inputs[0])
    rank = known.ndim if known is not None else len(cx.values[inputs[0]].shape)
    shape = known.shape if known is not None else cx.values[inputs[0]].shape
    axes = _axes(cx, inputs, attrs) or [i for i, d in enumerate(shape) if d == 1]
    if known is not None:
        return np.squeeze(known, tuple(a % rank for a in axes))
    x = cx.tensor(inputs[0])
    for axis in sorted((a % rank for a in axes), reverse=True):
        x = ops.squeeze(x, dim=axis)
    return x


def _concat(cx, inputs, attrs, opset):
    known = _known_all(cx, inputs)
    if known is not None:
        if any(k.dtype == object for k in known):
            known = [k.astype(object) for k in known]
        return np.concatenate(known, axis=attrs["axis"])
    return ops.concat(*(cx.tensor(n) for n in inputs), dim=attrs["axis"])


def _gather(cx, inputs, attrs, opset):
    axis = attrs.get("axis", 0)
    known, index = cx.known(inputs[0]), cx.known(inputs[1])
    if known is not None and index is not None:
        return np.take(known, index.astype(np.int64), axis=axis)
    x = cx.tensor(inputs[0])
    axis %= len(x.shape)
    if axis == 0 and len(x.shape) == 2 and index is None:  # a table lookup
        return ops.embedding(cx.tensor(inputs[1]), x)
    if index is not None and isinstance(x.shape[axis], int):  # negative indices counted from the end
        cx.values[inputs[1]] = np.where(index < 0, index + x.shape[axis], index)
    idx = cx.tensor(inputs[1])
    flat = ops.reshape(idx, shape=(normalize_dim(math.prod(idx.shape)),)) if len(idx.shape) != 1 else idx
    picked = ops.index_select(x, flat, dim=axis)
    return ops.reshape(picked, shape=x.shape[:axis] + idx.shape + x.shape[axis + 1:])


def _gather_elements(cx, inputs, attrs, opset):
    return ops.gather(cx.tensor(inputs[0]), cx.tensor(inputs[1]), dim=attrs.get("axis", 0))


def _argmax(cx, inputs, attrs, opset):
    if attrs.get("select_last_index", 0):
        raise FrontendError("ArgMax with select_last_index is not supported")
    return ops.argmax(cx.tensor(inputs[0]), dim=attrs.get("axis", 0), keepdim=bool(attrs.get("keepdims", 1)))


def _slice(cx, inputs, attrs, opset):
    starts, ends = cx.ints(inputs[1], "slice starts"), cx.ints(inputs[2], "slice ends")
    axes = cx.ints(inputs[3], "slice axes") if len(inputs) > 3 and inputs[3] else list(range(len(starts)))
    steps = cx.ints(inputs[4], "slice steps") if len(inputs) > 4 and inputs[4] else [1] * len(starts)
    known = cx.known(inputs[0])
    if known is not None:
        index = [slice(None)] * known.ndim
        for start, end, axis, step in zip(starts, ends, axes, steps):
            index[axis] = slice(int(start), int(end), int(step))
        return known[tuple(index)]
    x = cx.tensor(inputs[0])
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step < 1:
            raise FrontendError(f"slices with step {step} are not supported")
        x = ops.slice(x, dim=int(axis), start=_dim(start), end=min(_dim(end), 2**62) if isinstance(end, int)
                      else _dim(end), step=int(step))
    return x


def _split(cx, inputs, attrs, opset):
    x = cx.tensor(inputs[0])
    axis = attrs.get("axis", 0) % len(x.shape)
    if len(inputs) > 1 and inputs[1]:
        sizes = [_dim(s) for s in cx.ints(inputs[1], "split sizes")]
    else:
        count = attrs.get("num_outputs")
        size = x.shape[axis]
        if count is None or not isinstance(size, int):
            raise FrontendError("Split needs its sizes or num_outputs over a static dim")
        sizes = [-(-size // count)] * (count - 1) + [size - -(-size // count) * (count - 1)]
    return ops.split(x, dim=axis, sizes=tuple(sizes))


def _transpose(cx, inputs, attrs, opset):
    x = cx.tensor(inputs[0])
    return ops.permute(x, dims=tuple(attrs.get("perm", range(len(x.shape) - 1, -1, -1))))


def _expand(cx, inputs, attrs, opset):
    x = cx.tensor(inputs[0])
    target = [_dim(d) for d in cx.ints(inputs[1], "the expanded shape")]
    rank = max(len(target), len(x.shape))
    have = (1,) * (rank - len(x.shape)) + tuple(x.shape)
    want = [1] * (rank - len(target)) + target
    return ops.expand(x, shape=tuple(h if w == 1 else w for h, w in zip(have, want)))


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
        axes = _axes(cx, inputs, attrs) or ([] if attrs.get("noop_with_empty_axes", 0) else list(range(len(x.shape))))
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


def _where(cx, inputs, attrs, opset):
    known = _known_all(cx, inputs)
    if known is not None:
        return np.where(*known)
    return ops.where(*(cx.tensor(n) for n in inputs))


def _attention(cx, inputs, attrs, opset):
    if len(inputs) > 4 and any(inputs[4:]):
        raise FrontendError("Attention with a past key and value cache is not supported")
    q, k, v = (cx.tensor(n) for n in inputs[:3])
    if len(q.shape) != 4:
        raise FrontendError("Attention is supported on 4-D [batch, heads, seq, dim] inputs")
    mask = cx.tensor(inputs[3]) if len(inputs) > 3 and inputs[3] else None
    return ops.attention(q, k, v, mask, scale=attrs.get("scale"), causal=bool(attrs.get("is_causal", 0)),
                         softcap=attrs.get("softcap") or None)


def _range(cx, inputs, attrs, opset):
    start, limit, delta = (cx.known(n) for n in inputs)
    if start is None or limit is None or delta is None:
        raise FrontendError("Range needs known start, limit and delta")
    if limit.dtype != object:
        return np.arange(start, limit, delta)
    if int(start) != 0 or int(delta) != 1:
        raise FrontendError("a Range to a symbolic limit must start at 0 by steps of 1")
    return ops.arange(end=_dim(limit.item()), graph=cx.graph)


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
                                         ("Relu", "relu"))},
    "Gelu": _gelu, "Where": _where, "Cast": _cast, "Identity": _identity, "Constant": _constant, "Shape": _shape,
    "Reshape": _reshape, "Flatten": _flatten, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Concat": _concat,
    "Gather": _gather, "GatherElements": _gather_elements, "ArgMax": _argmax, "Slice": _slice, "Split": _split, "Transpose": _transpose, "Expand": _expand,
    "MatMul": _matmul, "Gemm": _gemm, "Conv": _conv,
    "ReduceSum": _reduce("sum"), "ReduceMean": _reduce("mean"), "ReduceMax": _reduce("max"),
    "ReduceMin": _reduce("min"), "Softmax": _softmax("softmax"), "LogSoftmax": _softmax("log_softmax"),
    "LayerNormalization": _norm("layer_norm"), "RMSNormalization": _norm("rms_norm"),
    "Attention": _attention, "Range": _range, "Trilu": _trilu, "IsNaN": _is_nan,
}
