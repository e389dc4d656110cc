"""Ops that move data without arithmetic: reshape, transpose, permute, expand, slice,
concat, split, squeeze, unsqueeze. Sizes in attributes may be symbolic; the interpreter
evaluates them before calling the reference."""

from __future__ import annotations

import sympy
import torch

from ..registry import Attr, OpDef
from ..shapes import Dim, ShapeError, dims_equal, format_shape, normalize_axis, normalize_dim, product
from ..types import TensorType

# torch.export writes "to the end" as the largest int64.
END = 2**63 - 1


def _reshape(x: TensorType, shape: tuple[Dim, ...]) -> TensorType:
    unknown = [i for i, d in enumerate(shape) if d == -1]
    if len(unknown) > 1:
        raise ShapeError(f"at most one -1 in {format_shape(shape)}")
    if any(isinstance(d, int) and d < -1 for d in shape):
        raise ShapeError(f"negative size in {format_shape(shape)}")
    if unknown:
        known = product(d for d in shape if d != -1)
        inferred = normalize_dim(sympy.sympify(x.numel) / sympy.sympify(known))
        if isinstance(inferred, sympy.Expr) and not inferred.is_integer:
            raise ShapeError(f"cannot reshape {x} to {format_shape(shape)}")
        shape = tuple(inferred if d == -1 else d for d in shape)
    if not dims_equal(product(shape), x.numel):
        raise ShapeError(f"cannot reshape {x} to {format_shape(shape)}: element counts differ")
    return x.with_shape(shape)


def _transpose(x: TensorType, dim0: int, dim1: int) -> TensorType:
    shape = list(x.shape)
    a, b = normalize_axis(dim0, x.rank), normalize_axis(dim1, x.rank)
    shape[a], shape[b] = shape[b], shape[a]
    return x.with_shape(shape)


def _permute(x: TensorType, dims: tuple[int, ...]) -> TensorType:
    axes = [normalize_axis(d, x.rank) for d in dims]
    if sorted(axes) != list(range(x.rank)):
        raise ShapeError(f"{dims} is not a permutation of {x.rank} axes")
    return x.with_shape([x.shape[a] for a in axes])


def _expand(x: TensorType, shape: tuple[Dim, ...]) -> TensorType:
    if len(shape) < x.rank:
        raise ShapeError(f"cannot expand {x} to fewer dims {format_shape(shape)}")
    lead = len(shape) - x.rank
    out = list(shape[:lead])
    for have, want in zip(x.shape, shape[lead:]):
        if want == -1 or dims_equal(have, want):
            out.append(have)
        elif have == 1:
            out.append(want)
        else:
            raise ShapeError(f"cannot expand {x} to {format_shape(shape)}")
    if any(d == -1 for d in out):
        raise ShapeError(f"-1 is not allowed for new leading dims in {format_shape(shape)}")
    return x.with_shape(out)


def _expand_ref(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return x.expand(*shape)


def slice_bounds(size: Dim, start: Dim, end: Dim, step: int) -> tuple[Dim, Dim]:
    """Python slice semantics on a dim that may be symbolic; ints are clamped."""
    if isinstance(end, int) and end >= END // 2:
        end = size
    if isinstance(start, int) and start < 0:
        start = normalize_dim(size + start)
    if isinstance(end, int) and end < 0:
        end = normalize_dim(size + end)
    if isinstance(size, int):
        if isinstance(start, int):
            start = min(max(start, 0), size)
        if isinstance(end, int):
            end = min(max(end, 0), size)
    return start, end


def _slice(x: TensorType, dim: int, start: Dim, end: Dim, step: int) -> TensorType:
    if step < 1:
        raise ShapeError(f"slice step must be positive, got {step}")
    axis = normalize_axis(dim, x.rank)
    lo, hi = slice_bounds(x.shape[axis], start, end, step)
    length = normalize_dim(sympy.ceiling((sympy.sympify(hi) - lo) / step)) if step > 1 else normalize_dim(hi - lo)
    if isinstance(length, int) and length < 0:
        length = 0
    shape = list(x.shape)
    shape[axis] = length
    return x.with_shape(shape)


def _slice_ref(x: torch.Tensor, dim: int, start: int, end: int, step: int) -> torch.Tensor:
    axis = dim % x.dim()
    index = [slice(None)] * x.dim()
    index[axis] = slice(start, None if end >= END // 2 else end, step)
    return x[tuple(index)]


def _concat(inputs: list[TensorType], dim: int) -> TensorType:
    if not inputs:
        raise ShapeError("concat needs at least one input")
    first = inputs[0]
    axis = normalize_axis(dim, first.rank)
    for t in inputs[1:]:
        if t.dtype != first.dtype or t.rank != first.rank:
            raise ShapeError(f"cannot concat {first} with {t}")
        if not all(dims_equal(a, b) for i, (a, b) in enumerate(zip(first.shape, t.shape)) if i != axis):
            raise ShapeError(f"cannot concat {first} with {t} along {dim}")
    shape = list(first.shape)
    shape[axis] = normalize_dim(sympy.Add(*[sympy.sympify(t.shape[axis]) for t in inputs]))
    return first.with_shape(shape)


def _concat_ref(inputs: list[torch.Tensor], dim: int) -> torch.Tensor:
    return torch.cat(inputs, dim)


def _split(x: TensorType, dim: int, sizes: tuple[Dim, ...]) -> tuple[TensorType, ...]:
    axis = normalize_axis(dim, x.rank)
    if not dims_equal(sum(sympy.sympify(s) for s in sizes), x.shape[axis]):
        raise ShapeError(f"split sizes {format_shape(sizes)} do not add up to {x.shape[axis]}")
    out = []
    for s in sizes:
        shape = list(x.shape)
        shape[axis] = s
        out.append(x.with_shape(shape))
    return tuple(out)


def _split_ref(x: torch.Tensor, dim: int, sizes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.split(x, list(sizes), dim))


def _squeeze(x: TensorType, dim: int) -> TensorType:
    axis = normalize_axis(dim, x.rank)
    if x.shape[axis] != 1:
        raise ShapeError(f"cannot squeeze dim {dim} of {x}: it is not 1")
    return x.with_shape(x.shape[:axis] + x.shape[axis + 1:])


def _unsqueeze(x: TensorType, dim: int) -> TensorType:
    axis = normalize_axis(dim, x.rank + 1)
    return x.with_shape(x.shape[:axis] + (1,) + x.shape[axis:])


OPS = [
    OpDef("reshape", ("x",), _reshape, lambda x, shape: x.reshape(shape),
          attrs={"shape": Attr("dims")}, doc="same elements, new shape (one -1 allowed)"),
    OpDef("transpose", ("x",), _transpose, torch.transpose,
          attrs={"dim0": Attr("int"), "dim1": Attr("int")}, doc="swap two axes"),
    OpDef("permute", ("x",), _permute, torch.permute, attrs={"dims": Attr("ints")},
          doc="reorder axes"),
    OpDef("expand", ("x",), _expand, _expand_ref, attrs={"shape": Attr("dims")},
          doc="broadcast size-1 axes (and new leading axes) to a shape; -1 keeps a size"),
    OpDef("slice", ("x",), _slice, _slice_ref,
          attrs={"dim": Attr("int"), "start": Attr("dim", 0), "end": Attr("dim", END),
                 "step": Attr("int", 1)},
          doc="x[start:end:step] along dim, with Python's clamping"),
    OpDef("concat", ("inputs*",), _concat, _concat_ref, attrs={"dim": Attr("int")},
          doc="join tensors along dim"),
    OpDef("split", ("x",), _split, _split_ref,
          attrs={"dim": Attr("int"), "sizes": Attr("dims")},
          results=lambda attrs: len(attrs["sizes"]), doc="cut x along dim into pieces of sizes"),
    OpDef("squeeze", ("x",), _squeeze, torch.squeeze, attrs={"dim": Attr("int")},
          doc="drop a size-1 axis"),
    OpDef("unsqueeze", ("x",), _unsqueeze, torch.unsqueeze, attrs={"dim": Attr("int")},
          doc="insert a size-1 axis"),
]
