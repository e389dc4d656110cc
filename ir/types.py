"""``TensorType``: a dtype and a (possibly symbolic) shape, the type of every IR value."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .dtypes import DType, dtype as to_dtype
from .shapes import Dim, Shape, format_shape, normalize_shape, product, shapes_equal, static_numel


@dataclass(frozen=True, init=False)
class TensorType:
    """The type of a tensor value: ``f32[batch, 4096]``.

    Two types are ``equivalent`` when their dtypes are equal and their dims are provably
    equal (``batch*seq`` and ``seq*batch`` are).
    """

    dtype: DType
    shape: Shape

    def __init__(self, dtype: DType | str, shape: Iterable[Dim]):
        object.__setattr__(self, "dtype", to_dtype(dtype))
        object.__setattr__(self, "shape", normalize_shape(shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> Dim:
        return product(self.shape)

    @property
    def static_numel(self) -> int | None:
        return static_numel(self.shape)

    @property
    def is_static(self) -> bool:
        return self.static_numel is not None

    def with_shape(self, shape: Iterable[Dim]) -> TensorType:
        return TensorType(self.dtype, shape)

    def with_dtype(self, dtype: DType | str) -> TensorType:
        return TensorType(dtype, self.shape)

    def equivalent(self, other: TensorType) -> bool:
        return self.dtype == other.dtype and shapes_equal(self.shape, other.shape)

    def __str__(self) -> str:
        return f"{self.dtype.name}{format_shape(self.shape)}"
