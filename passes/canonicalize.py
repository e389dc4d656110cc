"""Algebraic canonicalization as rewrite rules: identities (x*1, x+0, x-0, x/1, -(-x)),
inverse and chained data movement (transpose of transpose, permute chains, reshape
chains, squeeze/unsqueeze pairs, full slices, one-input concat, concat with an empty
piece) and cast chains.

Rules whose replacement is ``x`` itself rely on the rewriter's type check: a reshape,
expand or cast is dropped only when its result type equals its input's, which for these
ops means it does nothing. Adding +0.0 maps -0.0 to +0.0; dropping it keeps -0.0, a
difference that no comparison or arithmetic other than a sign test can see.
"""

from __future__ import annotations

from ..ir import DType, ops
from ..ir.dtypes import can_represent
from ..ir.shapes import Dim, normalize_axis
from .pattern import Match
from .rewriter import Rule


def _identity(x):
    return x


def _mul_one(x):
    return x * 1.0


def _div_one(x):
    return x / 1.0


def _add_zero(x):
    return x + 0.0


def _sub_zero(x):
    return x - 0.0


def _neg_neg(x):
    return ops.neg(ops.neg(x))


def _transpose_twice(x, a: int, b: int, c: int, d: int):
    return ops.transpose(ops.transpose(x, dim0=a, dim1=b), dim0=c, dim1=d)


def _undoes_transpose(m: Match) -> bool:
    rank = m["x"].type.rank
    first = {normalize_axis(m["a"], rank), normalize_axis(m["b"], rank)}
    return first == {normalize_axis(m["c"], rank), normalize_axis(m["d"], rank)}


def _permute_twice(x, first: tuple, second: tuple):
    return ops.permute(ops.permute(x, dims=first), dims=second)


def _composed_permute(x, first: tuple, second: tuple):
    rank = len(first)
    return ops.permute(x, dims=tuple(normalize_axis(first[normalize_axis(j, rank)], rank) for j in second))


def _permute(x, dims: tuple):
    return ops.permute(x, dims=dims)


def _is_identity_permutation(m: Match) -> bool:
    rank = len(m["dims"])
    return [normalize_axis(d, rank) for d in m["dims"]] == list(range(rank))


def _reshape_twice(x, first: tuple, shape: tuple):
    return ops.reshape(ops.reshape(x, shape=first), shape=shape)


def _reshape_once(x, shape: tuple[Dim, ...]):
    return ops.reshape(x, shape=shape)


def _expand(x, shape: tuple):
    return ops.expand(x, shape=shape)


def _cast(x, dtype: DType):
    return ops.cast(x, dtype=dtype)


def _cast_twice(x, middle: DType, dtype: DType):
    return ops.cast(ops.cast(x, dtype=middle), dtype=dtype)


def _middle_is_lossless(m: Match) -> bool:
    return can_represent(m["middle"], m["x"].type.dtype)


def _squeeze_unsqueeze(x, a: int, b: int):
    return ops.squeeze(ops.unsqueeze(x, dim=a), dim=b)


def _unsqueeze_squeeze(x, a: int, b: int):
    return ops.unsqueeze(ops.squeeze(x, dim=a), dim=b)


def _slice(x, dim: int, start: Dim, end: Dim, step: int):
    return ops.slice(x, dim=dim, start=start, end=end, step=step)


def _slice_from_start(m: Match) -> bool:
    return m["start"] == 0 and m["step"] == 1


def _concat_one(x, dim: int):
    return ops.concat([x], dim=dim)


def _concat_two(x, y, dim: int):
    return ops.concat([x, y], dim=dim)


def _empty_along(name: str):
    return lambda m: m[name].shape[normalize_axis(m["dim"], m[name].type.rank)] == 0


CANONICAL_RULES = [
    Rule(_mul_one, _identity, name="mul_one"),
    Rule(_div_one, _identity, name="div_one"),
    Rule(_add_zero, _identity, name="add_zero"),
    Rule(_sub_zero, _identity, name="sub_zero"),
    Rule(_neg_neg, _identity, name="neg_neg"),
    Rule(_transpose_twice, _identity, when=_undoes_transpose, name="transpose_transpose"),
    Rule(_permute_twice, _composed_permute, name="permute_permute"),
    Rule(_permute, _identity, when=_is_identity_permutation, name="identity_permute"),
    Rule(_reshape_twice, _reshape_once, name="reshape_reshape"),
    Rule(_reshape_once, _identity, name="identity_reshape"),
    Rule(_expand, _identity, name="identity_expand"),
    Rule(_cast_twice, _cast, when=_middle_is_lossless, name="cast_cast"),
    Rule(_cast, _identity, name="identity_cast"),
    Rule(_squeeze_unsqueeze, _identity, name="squeeze_unsqueeze"),
    Rule(_unsqueeze_squeeze, _identity, name="unsqueeze_squeeze"),
    Rule(_slice, _identity, when=_slice_from_start, name="full_slice"),
    Rule(_concat_one, _identity, name="concat_one"),
    Rule(_concat_two, lambda x, y, dim: x, when=_empty_along("y"), name="concat_empty_last"),
    Rule(_concat_two, lambda x, y, dim: y, when=_empty_along("x"), name="concat_empty_first"),
]
