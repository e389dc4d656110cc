"""Element types of kiln tensors and their mapping onto torch dtypes.

Each dtype has a short printed name (``f32``, ``bf16``, ``i4`` ...) used by the text
form. ``i4`` is a packed type: the interpreter holds int4 values unpacked in int8
tensors (values in [-8, 7]); ``pack_int4`` / ``unpack_int4`` convert to and from the
two-per-byte storage that weights and kernels use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DType:
    """An element type: its printed name, bit width, kind and torch compute dtype."""

    name: str
    bits: int
    kind: str  # "float", "int" or "bool"
    torch_dtype: torch.dtype
    signed: bool = True

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    @property
    def is_integer(self) -> bool:
        return self.kind == "int"

    @property
    def is_packed(self) -> bool:
        """Whether storage packs several elements into one byte."""
        return self.bits < 8 and self.kind == "int"

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"DType({self.name})"


float64 = DType("f64", 64, "float", torch.float64)
float32 = DType("f32", 32, "float", torch.float32)
float16 = DType("f16", 16, "float", torch.float16)
bfloat16 = DType("bf16", 16, "float", torch.bfloat16)
float8_e4m3fn = DType("f8e4m3", 8, "float", torch.float8_e4m3fn)
int64 = DType("i64", 64, "int", torch.int64)
int32 = DType("i32", 32, "int", torch.int32)
int8 = DType("i8", 8, "int", torch.int8)
uint8 = DType("u8", 8, "int", torch.uint8, signed=False)  # raw bytes: packed int4 weights, zero points
int4 = DType("i4", 4, "int", torch.int8)
bool_ = DType("bool", 1, "bool", torch.bool)

ALL_DTYPES: tuple[DType, ...] = (
    float64, float32, float16, bfloat16, float8_e4m3fn, int64, int32, int8, uint8, int4, bool_,
)
_BY_NAME = {d.name: d for d in ALL_DTYPES}
_ALIASES = {
    "float64": float64, "float32": float32, "float16": float16, "bfloat16": bfloat16,
    "float8_e4m3fn": float8_e4m3fn, "fp8": float8_e4m3fn, "int64": int64,
    "int32": int32, "int8": int8, "uint8": uint8, "int4": int4, "half": float16, "float": float32,
}
_BY_TORCH = {d.torch_dtype: d for d in ALL_DTYPES if d is not int4}


def dtype(spec: DType | str | torch.dtype) -> DType:
    """Resolve a printed name (``f32``), a long name (``float32``) or a torch dtype."""
    if isinstance(spec, DType):
        return spec
    if isinstance(spec, torch.dtype):
        if spec not in _BY_TORCH:
            raise TypeError(f"torch dtype {spec} has no kiln dtype")
        return _BY_TORCH[spec]
    found = _BY_NAME.get(spec) or _ALIASES.get(spec)
    if found is None:
        known = ", ".join(sorted(_BY_NAME))
        raise TypeError(f"unknown dtype {spec!r}; kiln dtypes are {known}")
    return found


def can_represent(wide: DType, narrow: DType) -> bool:
    """Whether every value of ``narrow`` is exactly a value of ``wide``."""
    if wide == narrow:
        return True
    if narrow.kind == "bool":
        return wide.kind in ("int", "float")
    if wide.kind == "bool":
        return False
    if narrow.kind == "int" and wide.kind == "int":
        if narrow.signed and not wide.signed:
            return False
        return wide.bits > narrow.bits if wide.signed and not narrow.signed else wide.bits >= narrow.bits
    if narrow.kind == "int" and wide.kind == "float":
        mantissa = {64: 53, 32: 24, 16: 11 if wide is float16 else 8, 8: 4}[wide.bits]
        return narrow.bits <= mantissa
    if narrow.kind == "float" and wide.kind == "float":
        return (wide, narrow) in _EXACT_FLOAT_WIDENINGS
    return False


_EXACT_FLOAT_WIDENINGS = {
    (float64, float32), (float64, float16), (float64, bfloat16), (float64, float8_e4m3fn),
    (float32, float16), (float32, bfloat16), (float32, float8_e4m3fn),
    (float16, float8_e4m3fn), (bfloat16, float8_e4m3fn),
}


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pack int4 values (int8 tensor, last dim even, values in [-8, 7]) two per byte."""
    if values.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {tuple(values.shape)}")
    if values.min() < -8 or values.max() > 7:
        raise ValueError("int4 values must lie in [-8, 7]")
    nibbles = (values.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: a uint8 tensor to int8 values in [-8, 7]."""
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    both = torch.stack([low, high], dim=-1).flatten(-2)
    return torch.where(both > 7, both - 16, both)
