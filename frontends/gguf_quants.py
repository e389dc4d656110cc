"""GGUF's block-quantized weights repacked, exactly, into kiln's weight-only ops.

Each row of a GGUF matrix is a run of blocks along the input dim (llama.cpp's
``ggml-common.h`` gives the layouts; ``d``, ``m``, ``dmin`` are float16):

- Q8_0, blocks of 32: ``d``, 32 int8 ``q``; ``w = d q``. -> ``linear_int8``, scales ``[out, in/32]``.
- Q4_0, blocks of 32: ``d``, 16 bytes (``q[j]`` in the low nibble of byte j, ``q[j + 16]`` in
  its high one); ``w = d (q - 8)``. -> ``linear_int4``, zero point 8.
- Q4_1, blocks of 32: ``d``, ``m``, nibbles as Q4_0; ``w = d q + m``. -> ``linear_int4``,
  float zero point ``-m / d``.
- Q5_0, blocks of 32: ``d``, 4 bytes ``qh`` (bit j of the little-endian word is the fifth bit
  of ``q[j]``), nibbles as Q4_0; ``w = d (q - 16)``. -> ``linear_int8``, codes ``q - 16``.
- Q5_1, blocks of 32: ``d``, ``m``, ``qh`` and nibbles as Q5_0; ``w = d q + m``. ->
  ``linear_int8``, codes ``q`` and float zero point ``-m / d``.
- Q4_K, blocks of 256: ``d``, ``dmin``, 12 bytes of 6-bit scales ``sc`` and mins ``mn`` for 8
  sub-blocks of 32, 128 bytes of nibbles (each run of 32 bytes: a sub-block in the low
  nibbles, the next in the high); ``w = d sc q - dmin mn``. -> ``linear_int4``, groups of 32.
- Q5_K, blocks of 256: ``d``, ``dmin``, scales and mins as Q4_K, 32 bytes ``qh`` (bit i of byte
  l is the fifth bit of sub-block i's code l), nibbles as Q4_K; ``w = d sc q - dmin mn``. ->
  ``linear_int8``, groups of 32 with float zero points.
- Q6_K, blocks of 256: 128 bytes of low nibbles, 64 of 2-bit high pairs, 16 int8 scales
  (sub-blocks of 16), ``d``; ``w = d sc (q - 32)``. -> ``linear_int8``, scales ``[out, in/16]``.

An offset ``m`` becomes the zero point ``-m / d`` of ``w = (q - zero) d``; a block whose
scale is 0 (all its weights equal ``m``) gets codes 1, zero 0 and scale ``m`` instead. Scales
of 4-bit types are kept in the model's dtype (the op's rule), so float32 and float16 models
hold them exactly; INT8 scales and float zero points are float32. The types without an
offset dequantize to exactly ``gguf.quants``' float32 weights; those with one (``(q - zero)
d`` against ``d q + m``) to within float32 rounding. ``repack`` takes a row order too:
llama.cpp stores the rows of Llama's query and key projections permuted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..ir import TensorType, dtypes
from ..passes.quantization.weights import pack_int4_codes
from .quantized_linear import QuantizedLinear, SharedParts


def _f16(raw: np.ndarray) -> torch.Tensor:
    """Float16 values stored as byte pairs in the last dim, as float32."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32))


def _nibbles(raw: np.ndarray, run: int) -> torch.Tensor:
    """Runs of ``run`` bytes holding ``run`` codes in their low nibbles, then ``run`` in their high."""
    data = torch.from_numpy(np.ascontiguousarray(raw)).view(*raw.shape[:-1], -1, 1, run)
    return torch.cat([data & 0xF, data >> 4], dim=-2).flatten(-3)


def _fifth_bits(raw: np.ndarray, bit_major: bool) -> torch.Tensor:
    """The bits of ``raw``'s bytes (last dim) as 0/1 codes, by byte then bit (bit j of a
    little-endian word is code j: Q5_0, Q5_1) or by bit then byte (bit i of byte l is code
    l of sub-block i: Q5_K), shifted to the fifth bit of a code."""
    data = torch.from_numpy(np.ascontiguousarray(raw)).to(torch.int16)
    bits = (data[..., None, :] >> torch.arange(8, dtype=torch.int16)[:, None]) & 1  # [..., bit, byte]
    return (bits if bit_major else bits.transpose(-1, -2)).flatten(-2) << 4


def _q8_0(blocks: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8)), _f16(blocks[..., 0:2])


def _q4_0(blocks: np.ndarray):
    return _nibbles(blocks[..., 2:], 16), _f16(blocks[..., 0:2]), torch.full(blocks.shape[:-1], 8.0)


def _q4_1(blocks: np.ndarray):
    return _with_offsets(_nibbles(blocks[..., 4:], 16).flatten(-2), _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4]))


def _q5_0(blocks: np.ndarray):
    codes = _nibbles(blocks[..., 6:], 16) | _fifth_bits(blocks[..., 2:6], bit_major=False)
    return (codes - 16).to(torch.int8), _f16(blocks[..., 0:2])


def _q5_1(blocks: np.ndarray):
    codes = _nibbles(blocks[..., 8:], 16) | _fifth_bits(blocks[..., 4:8], bit_major=False)
    return _with_offsets(codes.flatten(-2), _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4]))


def _k_scales(packed: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 8 six-bit scales and mins from its 12 bytes (llama.cpp's ``get_scale_min_k4``)."""
    b = torch.from_numpy(np.ascontiguousarray(packed)).int()
    low, high, extra = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    scales = torch.cat([low & 0x3F, (extra & 0xF) | ((low >> 6) << 4)], dim=-1)
    mins = torch.cat([high & 0x3F, (extra >> 4) | ((high >> 6) << 4)], dim=-1)
    return scales.float(), mins.float()


def _k_offsets(blocks: np.ndarray, codes: torch.Tensor):
    """Q4_K's and Q5_K's codes ``[rows, blocks, 256]`` (8 sub-blocks of 32 in order) with the
    scales ``d sc`` and offsets ``-dmin mn`` of their blocks' headers."""
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    scales, mins = _k_scales(blocks[..., 4:16])
    return _with_offsets(codes.flatten(-2), (d[..., None] * scales).flatten(-2), (-dmin[..., None] * mins).flatten(-2))


def _q4_k(blocks: np.ndarray):
    return _k_offsets(blocks, _nibbles(blocks[..., 16:], 32))


def _q5_k(blocks: np.ndarray):
    return _k_offsets(blocks, _nibbles(blocks[..., 48:], 32) | _fifth_bits(blocks[..., 16:48], bit_major=True))


def _q6_k(blocks: np.ndarray):
    raw = torch.from_numpy(np.ascontiguousarray(blocks))
    low = raw[..., :128].reshape(*raw.shape[:-1], 2, 1, 64)
    low = torch.cat([low & 0xF, low >> 4], dim=-2).reshape(*raw.shape[:-1], 8, 32)
    high = raw[..., 128:192].reshape(*raw.shape[:-1], 2, 1, 32)
    high = torch.cat([(high >> s) & 3 for s in (0, 2, 4, 6)], dim=-2).reshape(*raw.shape[:-1], 8, 32)
    codes = ((low | (high << 4)).to(torch.int16) - 32).to(torch.int8).flatten(-2)
    scales = torch.from_numpy(np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).astype(np.float32))
    return codes, (_f16(blocks[..., 208:210])[..., None] * scales).flatten(-2)


def _with_offsets(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor):
    """Codes ``[rows, in]``, scales and float zero points ``[rows, groups]`` for
    ``w = scale * q + offset`` per group."""
    flat = scale == 0  # all of the group's weights are ``offset``: (1 - 0) * offset
    codes = codes.reshape(*scale.shape, -1).masked_fill(flat[..., None], 1).flatten(-2)
    zeros = torch.where(flat, torch.zeros_like(offset), -offset / torch.where(flat, torch.ones_like(scale), scale))
    return codes, torch.where(flat, offset, scale), zeros


@dataclass(frozen=True)
class GGUFType:
    """How kiln serves a GGUF block type: its block (weights, bytes), the kiln op, the
    repacker of ``[rows, blocks, bytes]`` into codes, scales (and float zero points, where
    ``zeros``), and the input features a scale covers."""

    block: int
    size: int
    op: str
    repacker: Callable[[np.ndarray], tuple[torch.Tensor, ...]]
    zeros: bool
    group: int = 32


INT8, INT4 = "linear_int8", "linear_int4"
REPACKERS: dict[str, GGUFType] = {
    "Q8_0": GGUFType(32, 34, INT8, _q8_0, zeros=False), "Q4_0": GGUFType(32, 18, INT4, _q4_0, zeros=True),
    "Q4_1": GGUFType(32, 20, INT4, _q4_1, zeros=True), "Q5_0": GGUFType(32, 22, INT8, _q5_0, zeros=False),
    "Q5_1": GGUFType(32, 24, INT8, _q5_1, zeros=True), "Q4_K": GGUFType(256, 144, INT4, _q4_k, zeros=True),
    "Q5_K": GGUFType(256, 176, INT8, _q5_k, zeros=True), "Q6_K": GGUFType(256, 210, INT8, _q6_k, zeros=False, group=16),
}


def repack(kind: str, data: np.ndarray, in_features: int, dtype: torch.dtype,
           rows: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The operands of ``kind``'s kiln op for a GGUF matrix (``data``: ``[out, bytes a row]``),
    its rows taken in the order ``rows`` (all, in order, by default)."""
    gguf_type = REPACKERS[kind]
    parts = gguf_type.repacker(np.array(data).reshape(data.shape[0], in_features // gguf_type.block, gguf_type.size))
    codes = parts[0].reshape(data.shape[0], in_features)
    scales, *zeros = (part.reshape(data.shape[0], -1) for part in parts[1:])
    if rows is not None:
        codes, scales, zeros = codes[rows], scales[rows], [z[rows] for z in zeros]
    if gguf_type.op == INT4:
        codes, scales = pack_int4_codes(codes), scales.to(dtype)
    else:
        codes = codes.to(torch.int8)
    return codes.contiguous(), scales.contiguous(), *(z.float().contiguous() for z in zeros)


def quantized_linear(kind: str, data: np.ndarray, in_features: int, dtype: torch.dtype,
                     rows: torch.Tensor | None = None, where: str = "gguf") -> QuantizedLinear:
    """The ``QuantizedLinear`` of a GGUF matrix of type ``kind``, its operands repacked lazily."""
    gguf_type = REPACKERS[kind]
    if in_features % gguf_type.block:
        raise ValueError(f"{where}: {in_features} input features are not whole {kind} blocks of {gguf_type.block}")
    out_features = data.shape[0]
    groups = (out_features, in_features // gguf_type.group)
    parts = SharedParts(lambda: repack(kind, data, in_features, dtype, rows), where)
    if gguf_type.op == INT8:
        operands = [("qweight", TensorType(dtypes.int8, (out_features, in_features)), parts.lazy(0)),
                    ("scale", TensorType(dtypes.float32, groups), parts.lazy(1))]
    else:
        operands = [("qweight", TensorType(dtypes.uint8, (out_features, in_features // 2)), parts.lazy(0)),
                    ("scales", TensorType(dtypes.dtype(dtype), groups), parts.lazy(1))]
    if gguf_type.zeros:
        operands.append(("zeros", TensorType(dtypes.float32, groups), parts.lazy(2)))
    return QuantizedLinear(gguf_type.op, tuple(operands))
