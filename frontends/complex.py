"""Complex tensors as real pairs: how the ATen ops that DeepSeek-V2's and Llama 4's rotary
embeddings leave on complex tensors (``polar``, ``complex``, ``view_as_complex``, complex
``mul`` and ``add``, the shape ops ``unsqueeze``, ``slice``, ``view``, ``transpose``,
``view_as_real``) become kiln ops.

kiln's IR has no complex dtype. A complex tensor of shape ``S`` is held as a real tensor
of shape ``S + (2,)``, its real and imaginary parts along the last dim: exactly the layout
of ``torch.view_as_real``, so ``view_as_complex`` and ``view_as_real`` cost nothing.
Arithmetic on complex tensors is written out on the two parts; the ``raise`` stage then
recognizes a rotation by unit complex numbers as kiln's interleaved ``rotary``
(``passes/complex_rotary.py``).

The importer sends every node that takes or makes a complex tensor here
(``COMPLEX_CONVERTERS``), its complex arguments wrapped as ``Complex``; the others never
see a complex tensor. A complex op without a converter here is reported by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..ir import DType, Value, dtypes, ops
from ..ir.opdefs.shape import END
from .aten import Conversion

_REAL_OF = {torch.complex64: torch.float32, torch.complex128: torch.float64, torch.complex32: torch.float16}


@dataclass(frozen=True)
class Complex:
    """A complex argument: ``pairs`` holds it as real ``[..., 2]`` (real, imaginary)."""

    pairs: Value

    @property
    def rank(self) -> int:
        """The rank of the complex tensor (one less than its pairs')."""
        return self.pairs.type.rank - 1


def is_complex(value: Any) -> bool:
    """Whether ``value`` (a traced node's fake tensor) is a complex tensor."""
    return isinstance(value, torch.Tensor) and value.is_complex()


def real_dtype(dtype: torch.dtype) -> DType:
    """The kiln dtype of a torch dtype, complex ones as the dtype of their parts."""
    return dtypes.dtype(_REAL_OF.get(dtype, dtype))


def pair_shape(fake: torch.Tensor) -> tuple:
    """The shape of a fake tensor as kiln holds it: complex ones gain the pair dim."""
    return (*fake.shape, 2) if fake.is_complex() else tuple(fake.shape)


def _parts(z: Complex) -> tuple[Value, Value]:
    last = z.pairs.type.rank - 1
    return tuple(ops.squeeze(ops.slice(z.pairs, dim=last, start=i, end=i + 1), dim=last) for i in (0, 1))


def _pairs(real: Value, imag: Value) -> Value:
    last = real.type.rank
    return ops.concat([ops.unsqueeze(real, dim=last), ops.unsqueeze(imag, dim=last)], dim=last)


def _polar(cx: Conversion, magnitude: Value, angle: Value) -> Value:
    return _pairs(ops.mul(magnitude, ops.cos(angle)), ops.mul(magnitude, ops.sin(angle)))


def _complex(cx: Conversion, real: Value, imag: Value) -> Value:
    """``torch.complex(real, imag)``."""
    return _pairs(cx.value(real), cx.value(imag))


def _mul(cx: Conversion, a: Any, b: Any) -> Value:
    """``(ar + i ai)(br + i bi)``; a real factor (a tensor or a number) scales both parts."""
    if isinstance(a, Complex) and isinstance(b, Complex):
        (ar, ai), (br, bi) = _parts(a), _parts(b)
        return _pairs(ops.sub(ops.mul(ar, br), ops.mul(ai, bi)), ops.add(ops.mul(ar, bi), ops.mul(ai, br)))
    z, r = (a, b) if isinstance(a, Complex) else (b, a)
    if isinstance(r, Value):
        if r.type.rank > z.rank:
            raise NotImplementedError("a complex tensor times a real one of higher rank")
        r = ops.unsqueeze(cx.value(r), dim=r.type.rank)
    return ops.mul(z.pairs, cx.value(r))


def _add(cx: Conversion, a: Any, b: Any, alpha: float = 1) -> Value:
    if not (isinstance(a, Complex) and isinstance(b, Complex)) or alpha != 1:
        raise NotImplementedError("a sum of a complex tensor with anything but another complex tensor")
    return ops.add(a.pairs, b.pairs)


def _unsqueeze(cx: Conversion, z: Complex, dim: int) -> Value:
    return ops.unsqueeze(z.pairs, dim=dim % (z.rank + 1))


def _slice(cx: Conversion, z: Complex, dim: int = 0, start: int | None = None, end: int | None = None,
           step: int = 1) -> Value:
    return ops.slice(z.pairs, dim=dim % z.rank, start=start or 0, end=END if end is None else end, step=step)


def _reshape(cx: Conversion, z: Complex, shape: Any) -> Value:
    """``view``, ``reshape`` (the pair dim stays last, so any ``-1`` still means the same)."""
    return ops.reshape(z.pairs, shape=(*shape, 2))


def _transpose(cx: Conversion, z: Complex, dim0: int, dim1: int) -> Value:
    return ops.transpose(z.pairs, dim0=dim0 % z.rank, dim1=dim1 % z.rank)


def _same(cx: Conversion, z: Any, *args: Any, **kwargs: Any) -> Value:
    """A copy, view or move that keeps the values (a cast between complex dtypes casts both parts)."""
    if not isinstance(z, Complex):
        raise NotImplementedError("a cast from real to complex")
    return cx.value(z.pairs)


def _view_as_complex(cx: Conversion, x: Value) -> Value:
    if x.type.rank < 1 or x.shape[-1] != 2:
        raise NotImplementedError("view_as_complex of a tensor whose last dim is not 2")
    return x


COMPLEX_CONVERTERS: dict[str, Callable[..., Any]] = {
    "aten.polar.default": _polar,
    "aten.view_as_complex.default": _view_as_complex,
    "aten.view_as_real.default": lambda cx, z: z.pairs,
    "aten.complex.default": _complex,
    "aten.mul.Tensor": _mul,
    "aten.mul.Scalar": _mul,
    "aten.add.Tensor": _add,
    "aten.unsqueeze.default": _unsqueeze,
    "aten.slice.Tensor": _slice,
    "aten.view.default": _reshape,
    "aten.reshape.default": _reshape,
    "aten.transpose.int": _transpose,
    **{f"aten.{name}": _same for name in ("to.dtype", "to.device", "to.dtype_layout", "_to_copy.default",
                                          "clone.default", "alias.default", "contiguous.default",
                                          "detach.default")},
}
