import pytest
import sympy
import torch
from hypothesis import given
from hypothesis import strategies as st

from kiln.ir import ShapeError, TensorType, dims_equal, dtype, dtypes, sym
from kiln.ir.dtypes import can_represent, pack_int4, unpack_int4
from kiln.ir.shapes import broadcast_shapes, evaluate_dim, format_dim, parse_dim


def test_dtype_lookup_by_every_spelling():
    assert dtype("f32") is dtypes.float32
    assert dtype("bfloat16") is dtypes.bfloat16
    assert dtype(torch.float8_e4m3fn) is dtypes.float8_e4m3fn
    assert dtype("i4").is_packed and not dtype("i8").is_packed
    with pytest.raises(TypeError, match="unknown dtype 'f33'"):
        dtype("f33")


def test_exact_widenings():
    assert can_represent(dtypes.float32, dtypes.bfloat16)
    assert can_represent(dtypes.float32, dtypes.float16)
    assert not can_represent(dtypes.float16, dtypes.bfloat16)
    assert not can_represent(dtypes.bfloat16, dtypes.float16)
    assert can_represent(dtypes.float32, dtypes.int8) and not can_represent(dtypes.float16, dtypes.int32)
    assert can_represent(dtypes.int64, dtypes.int32) and not can_represent(dtypes.int8, dtypes.int32)


@given(st.lists(st.integers(-8, 7), min_size=2, max_size=64).filter(lambda v: len(v) % 2 == 0))
def test_int4_pack_roundtrip(values):
    t = torch.tensor(values, dtype=torch.int8)
    packed = pack_int4(t)
    assert packed.dtype == torch.uint8 and packed.numel() == len(values) // 2
    assert torch.equal(unpack_int4(packed), t)


def test_int4_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([8, 0], dtype=torch.int8))


def test_symbols_are_canonical_and_compare_symbolically():
    b, s = sym("batch"), sym("seq")
    assert sym("batch") is b
    assert dims_equal(b * s, s * b) and dims_equal(2 * (s + 1), 2 * s + 2)
    assert not dims_equal(b, s)
    assert TensorType("f32", (b * s, 4)).equivalent(TensorType("f32", (s * b, 4)))
    assert TensorType("f32", (sympy.Integer(3),)).shape == (3,)


def test_broadcasting_with_symbols():
    b = sym("batch")
    assert broadcast_shapes((b, 1, 4), (3, 1)) == (b, 3, 4)
    assert broadcast_shapes((1,), (b,)) == (b,)
    with pytest.raises(ShapeError, match="cannot broadcast"):
        broadcast_shapes((b,), (sym("seq"),))


@given(st.sampled_from(["batch", "seq"]), st.integers(1, 9), st.integers(-5, 5))
def test_dim_text_roundtrip(name, scale, offset):
    dim = scale * sym(name) + offset
    assert dims_equal(parse_dim(format_dim(dim)), dim)
    assert evaluate_dim(dim, {sym(name): 3}) == 3 * scale + offset


def test_bad_dim_text():
    with pytest.raises(ShapeError, match="invalid dimension"):
        parse_dim("batch;import os")
