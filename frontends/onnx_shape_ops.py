"""ONNX's data-movement and shape ops in kiln: ``Shape``, ``Reshape``, ``Flatten``,
``(Un)Squeeze``, ``Concat``, ``Gather``, ``Slice``, ``Split``, ``Transpose``, ``Expand``,
``Cast``, ``Constant``, ``Where``, ``Range``. With every input known while importing they
compute a known value with numpy (the shape arithmetic exporters leave); otherwise they
become kiln ops. ``onnx_ops.py`` holds the table."""

from __future__ import annotations

import math

import numpy as np
import onnx
import sympy

from ..ir import Value, ops
from ..ir.shapes import normalize_dim
from .errors import FrontendError
from .onnx_context import OnnxImport, kiln_dtype


def known_all(cx: OnnxImport, inputs: list) -> list | None:
    """The known values of ``inputs`` (missing optional ones skipped), or None if any is not known."""
    values = [cx.known(n) for n in inputs if n]
    return values if all(v is not None for v in values) else None


def as_dim(value: object) -> object:
    """A known element as an int or a kiln dim."""
    return normalize_dim(value) if isinstance(value, sympy.Basic) else int(value)


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
    return ops.reshape(x, shape=_result_shape_reshape(x.shape, [as_dim(d) for d in target], attrs.get("allowzero", 0)))


def _flatten(cx, inputs, attrs, opset):
    x = cx.tensor(inputs[0])
    axis = attrs.get("axis", 1) % max(len(x.shape), 1)
    lead, rest = x.shape[:axis], x.shape[axis:]
    return ops.reshape(x, shape=(normalize_dim(math.prod(lead)), normalize_dim(math.prod(rest))))


def axes_of(cx: OnnxImport, inputs: list, attrs: dict) -> list[int]:
    if len(inputs) > 1 and inputs[1]:
        return [int(a) for a in cx.ints(inputs[1], "the axes")]
    return list(attrs.get("axes", []))


def _unsqueeze(cx, inputs, attrs, opset):
    axes = axes_of(cx, inputs, attrs)
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
    axes = axes_of(cx, inputs, attrs) or [i for i, d in enumerate(shape) if d == 1]
    if known is not None:
        return np.squeeze(known, tuple(a % rank for a in axes))
    x = cx.tensor(inputs[0])
    for axis in sorted((a % rank for a in axes), reverse=True):
        x = ops.squeeze(x, dim=axis)
    return x


def _concat(cx, inputs, attrs, opset):
    known = known_all(cx, inputs)
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
        x = ops.slice(x, dim=int(axis), start=as_dim(start), end=min(as_dim(end), 2**62) if isinstance(end, int)
                      else as_dim(end), step=int(step))
    return x


def _split(cx, inputs, attrs, opset):
    x = cx.tensor(inputs[0])
    axis = attrs.get("axis", 0) % len(x.shape)
    if len(inputs) > 1 and inputs[1]:
        sizes = [as_dim(s) for s in cx.ints(inputs[1], "split sizes")]
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
    target = [as_dim(d) for d in cx.ints(inputs[1], "the expanded shape")]
    rank = max(len(target), len(x.shape))
    have = (1,) * (rank - len(x.shape)) + tuple(x.shape)
    want = [1] * (rank - len(target)) + target
    return ops.expand(x, shape=tuple(h if w == 1 else w for h, w in zip(have, want)))


def _where(cx, inputs, attrs, opset):
    known = known_all(cx, inputs)
    if known is not None:
        return np.where(*known)
    return ops.where(*(cx.tensor(n) for n in inputs))


def _range(cx, inputs, attrs, opset):
    start, limit, delta = (cx.known(n) for n in inputs)
    if start is None or limit is None or delta is None:
        raise FrontendError("Range needs known start, limit and delta")
    if limit.dtype != object:
        return np.arange(start, limit, delta)
    if int(start) != 0 or int(delta) != 1:
        raise FrontendError("a Range to a symbolic limit must start at 0 by steps of 1")
    return ops.arange(end=as_dim(limit.item()), graph=cx.graph)


SHAPE_CONVERTERS = {
    "Shape": _shape, "Constant": _constant, "Identity": _identity, "Cast": _cast, "Reshape": _reshape,
    "Flatten": _flatten, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Concat": _concat, "Gather": _gather,
    "GatherElements": _gather_elements, "Slice": _slice, "Split": _split, "Transpose": _transpose, "Expand": _expand,
    "Where": _where, "Range": _range,
}
