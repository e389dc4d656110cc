"""Complex tensors in the importer, held as real pairs.

kiln's IR has no complex dtypes. Models that rotate with complex numbers (Llama 4 and
DeepSeek-V2: ``torch.polar`` for the frequencies, ``view_as_complex`` of the queries and
keys cut into pairs, a complex product, ``view_as_real``) are imported with each complex
tensor of shape ``S`` held as a real ``Value`` of shape ``S + (2,)``: its real and
imaginary parts side by side along a trailing dim, which is exactly the memory layout that
``view_as_complex`` and ``view_as_real`` reinterpret. Those two views are then free, and
the arithmetic is written out on the parts: ``(a + ib)(c + id) = (ac - bd) + i(ad + bc)``.
The ``raise`` stage recognizes a product of pairs with rotation factors as an interleaved
``rotary`` (``passes/complex_rotary.py``).

``COMPLEX_CONVERTERS`` holds the converters used when a node's operands or result are
complex; an op outside it is reported by name, as any unmapped op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..ir import DType, Value, dtypes, ops
from ..ir.opdefs.shape import END

_REAL = {torch.complex32: dtypes.float16, torch.complex64: dtypes.float32, torch.complex128: dtypes.float64}


@dataclass(frozen=True)
class Complex:
    """A complex tensor as a real value ``pairs`` of shape ``[..., 2]`` (real, imaginary)."""

    pairs: Value

    @property
    def rank(self) -> int:
        return self.pairs.type.rank - 1

    @property
    def shape(self) -> tuple:
        return tuple(self.pairs.shape[:-1])

    def parts(self) -> tuple[Value, Value]:
        """The real and imaginary parts, each ``[..., 1]``."""
        last = self.rank
        return (ops.slice(self.pairs, dim=last, start=0, end=1), ops.slice(self.pairs, dim=last, start=1, end=2))


def real_dtype(dtype: torch.dtype) -> DType | None:
    """The dtype of the parts of a complex torch dtype; None for a dtype that is not complex."""
    return _REAL.get(dtype)


def is_complex_call(args: Any, fake: Any) -> bool:
    """Whether a node takes or makes a complex tensor (its arguments hold a ``Complex``, or
    torch computed a complex result)."""
    if isinstance(fake, torch.Tensor) and fake.dtype.is_complex:
        return True
    if isinstance(args, (list, tuple)):
        return any(is_complex_call(a, None) for a in args)
    if isinstance(args, dict):
        return any(is_complex_call(a, None) for a in args.values())
    return isinstance(args, Complex)


def _of(re: Value, im: Value) -> Complex:
    return Complex(ops.concat([re, im], dim=re.type.rank - 1))


def _polar(cx, magnitude: Value, angle: Value) -> Complex:
    """``magnitude * (cos(angle) + i sin(angle))``."""
    last = angle.type.rank
    return _of(ops.unsqueeze(ops.mul(magnitude, ops.cos(angle)), dim=last),
               ops.unsqueeze(ops.mul(magnitude, ops.sin(angle)), dim=last))


def _complex(cx, real: Value, imag: Value) -> Complex:
    """``torch.complex(real, imag)``."""
    return _of(*(ops.unsqueeze(cx.value(part), dim=part.type.rank) for part in (real, imag)))


def _view_as_complex(cx, x: Value) -> Complex:
    if x.type.rank == 0 or x.shape[-1] != 2:
        raise NotImplementedError(f"view_as_complex of {x.type}, whose last dim is not 2")
    return Complex(x)


def _view_as_real(cx, z: Complex) -> Value:
    return z.pairs


def _product(a: Complex, b: Complex) -> Complex:
    ar, ai = a.parts()
    br, bi = b.parts()
    return _of(ops.sub(ops.mul(ar, br), ops.mul(ai, bi)), ops.add(ops.mul(ar, bi), ops.mul(ai, br)))


def _scaled(cx, z: Complex, factor: Any) -> Complex:
    """A complex tensor times a real tensor or number (both parts scaled)."""
    if isinstance(factor, Value):
        factor = ops.unsqueeze(cx.value(factor, z.pairs.dtype), dim=factor.type.rank)
    else:
        factor = cx.value(factor, z.pairs.dtype)
    return Complex(ops.mul(z.pairs, factor))


def _mul(cx, a: Any, b: Any) -> Complex:
    if isinstance(a, Complex) and isinstance(b, Complex):
        return _product(a, b)
    if isinstance(b, Complex):
        a, b = b, a
    if isinstance(b, complex):
        raise NotImplementedError("a product with a Python complex number")
    return _scaled(cx, a, b)


def _add(cx, a: Any, b: Any, alpha: float = 1) -> Complex:
    if not (isinstance(a, Complex) and isinstance(b, Complex)) or alpha != 1:
        raise NotImplementedError("a sum of a complex tensor with anything but another complex tensor")
    return Complex(ops.add(a.pairs, b.pairs))


def _axis(z: Complex, dim: int, extra: int = 0) -> int:
    """A dim of the complex tensor as a dim of its pairs (``extra`` for ops that add a dim)."""
    return dim % (z.rank + extra)


def _same(cx, z: Complex, *args: Any, **kwargs: Any) -> Complex:
    """Copies, aliases and conversions that keep the complex dtype."""
    if cx.result_dtype != z.pairs.dtype:
        raise NotImplementedError(f"a conversion of a complex tensor of {z.pairs.dtype} parts to "
                                  f"{cx.result_dtype} parts")
    return z


COMPLEX_CONVERTERS = {
    "aten.polar.default": _polar,
    "aten.complex.default": _complex,
    "aten.view_as_complex.default": _view_as_complex,
    "aten.view_as_real.default": _view_as_real,
    "aten.mul.Tensor": _mul,
    "aten.mul.Scalar": _mul,
    "aten.add.Tensor": _add,
    "aten.unsqueeze.default": lambda cx, z, dim: Complex(ops.unsqueeze(z.pairs, dim=_axis(z, dim, 1))),
    "aten.slice.Tensor": lambda cx, z, dim=0, start=None, end=None, step=1: Complex(ops.slice(
        z.pairs, dim=_axis(z, dim), start=start or 0, end=END if end is None else end, step=step)),
    "aten.view.default": lambda cx, z, shape: Complex(ops.reshape(z.pairs, shape=(*shape, 2))),
    "aten.reshape.default": lambda cx, z, shape: Complex(ops.reshape(z.pairs, shape=(*shape, 2))),
    "aten.expand.default": lambda cx, z, sizes, **kwargs: Complex(ops.expand(z.pairs, shape=(*sizes, 2))),
    "aten.transpose.int": lambda cx, z, a, b: Complex(ops.transpose(z.pairs, dim0=_axis(z, a), dim1=_axis(z, b))),
    **{f"aten.{name}": _same for name in ("to.dtype", "to.dtype_layout", "to.device", "_to_copy.default",
                                         "clone.default", "alias.default", "contiguous.default", "detach.default")},
}
