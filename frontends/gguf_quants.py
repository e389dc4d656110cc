"""GGUF's block-quantized weights repacked, exactly, into kiln's weight-only ops.

Each row of a GGUF matrix is a run of blocks along the input dim (llama.cpp's
``ggml-common.h`` gives the layouts; ``d``, ``m``, ``dmin`` are float16):

- Q8_0, blocks of 32: ``d``, 32 int8 ``q``; ``w = d q``. -> ``linear_int8``, scales ``[out, in/32]``.
- Q4_0, blocks of 32: ``d``, 16 bytes (``q[j]`` in the low nibble of byte j, ``q[j + 16]`` in
  its high one); ``w = d (q - 8)``. -> ``linear_int4``, zero point 8.
- Q4_1, blocks of 32: ``d``, ``m``, nibbles as Q4_0; ``w = d q + m``. -> ``linear_int4``,
  float zero point ``-m / d``.
- Q4_K, blocks of 256: ``d``, ``dmin``, 12 bytes of 6-bit scales ``sc`` and mins ``mn`` for 8
  sub-blocks of 32, 128 bytes of nibbles (each run of 32 bytes: a sub-block in the low
  nibbles, the next in the high); ``w = d sc q - dmin mn``. -> ``linear_int4``, groups of 32.
- Q6_K, blocks of 256: 128 bytes of low nibbles, 64 of 2-bit high pairs, 16 int8 scales
  (sub-blocks of 16), ``d``; ``w = d sc (q - 32)``. -> ``linear_int8``, scales ``[out, in/16]``.

An offset ``m`` becomes the zero point ``-m / d`` of ``w = (q - zero) d``; a block whose
scale is 0 (all its weights equal ``m``) gets codes 1, zero 0 and scale ``m`` instead. Scales
of 4-bit types are kept in the model's dtype (the op's rule), so float32 and float16 models
hold them exactly; INT8 scales and float zero points are float32. ``repack`` takes a row
order too: llama.cpp stores the rows of Llama's query and key projections permuted.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..ir import TensorType, dtypes
from ..passes.quantization.weights import pack_int4_codes
from .quantized_linear import QuantizedLinear, SharedParts

# type name -> (block size in weights, bytes a block)
BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144), "Q6_K": (256, 210)}


def _f16(raw: np.ndarray) -> torch.Tensor:
    """Float16 values stored as byte pairs in the last dim, as float32."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32))


def _nibbles(raw: np.ndarray, run: int) -> torch.Tensor:
    """Runs of ``run`` bytes holding ``run`` codes in their low nibbles, then ``run`` in their high."""
    data = torch.from_numpy(np.ascontiguousarray(raw)).view(*raw.shape[:-1], -1, 1, run)
    return torch.cat([data & 0xF, data >> 4], dim=-2).flatten(-3)


def _q8_0(blocks: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8)), _f16(blocks[..., 0:2])


def _q4_0(blocks: np.ndarray):
    return _nibbles(blocks[..., 2:], 16), _f16(blocks[..., 0:2]), torch.full(blocks.shape[:-1], 8.0)


def _q4_1(blocks: np.ndarray):
    return _with_offsets(_nibbles(blocks[..., 4:], 16).flatten(-2), _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4]))


def _k_scales(packed: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 8 six-bit scales and mins from its 12 bytes (llama.cpp's ``get_scale_min_k4``)."""
    b = torch.from_numpy(np.ascontiguousarray(packed)).int()
    low, high, extra = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    scales = torch.cat([low & 0x3F, (extra & 0xF) | ((low >> 6) << 4)], dim=-1)
    mins = torch.cat([high & 0x3F, (extra >> 4) | ((high >> 6) << 4)], dim=-1)
    return scales.float(), mins.float()


def _q4_k(blocks: np.ndarray):
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    scales, mins = _k_scales(blocks[..., 4:16])
    codes = _nibbles(blocks[..., 16:], 32)  # [rows, blocks, 256]: 8 sub-blocks of 32 in order
    return _with_offsets(codes.flatten(-2), (d[..., None] * scales).flatten(-2), (-dmin[..., None] * mins).flatten(-2))


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


# type name -> (kiln op, the repacker of [rows, blocks, bytes] into codes, scales (and zeros))
REPACKERS: dict[str, tuple[str, Callable]] = {
    "Q8_0": ("linear_int8", _q8_0), "Q6_K": ("linear_int8", _q6_k),
    "Q4_0": ("linear_int4", _q4_0), "Q4_1": ("linear_int4", _q4_1), "Q4_K": ("linear_int4", _q4_k),
}


def repack(kind: str, data: np.ndarray, in_features: int, dtype: torch.dtype,
           rows: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The operands of ``kind``'s kiln op for a GGUF matrix (``data``: ``[out, bytes a row]``),
    its rows taken in the order ``rows`` (all, in order, by default)."""
    block, size = BLOCKS[kind]
    op, repacker = REPACKERS[kind]
    parts = repacker(np.array(data).reshape(data.shape[0], in_features // block, size))
    codes = parts[0].reshape(data.shape[0], in_features)
    scales = parts[1].reshape(data.shape[0], -1)
    if rows is not None:
        codes, scales = codes[rows], scales[rows]
    if op == "linear_int8":
        return codes.contiguous(), scales.contiguous()
    zeros = parts[2].reshape(data.shape[0], -1)
    zeros = zeros if rows is None else zeros[rows]
    return pack_int4_codes(codes), scales.to(dtype).contiguous(), zeros.float().contiguous()


def quantized_linear(kind: str, data: np.ndarray, in_features: int, dtype: torch.dtype,
                     rows: torch.Tensor | None = None, where: str = "gguf") -> QuantizedLinear:
    """The ``QuantizedLinear`` of a GGUF matrix of type ``kind``, its operands repacked lazily."""
    block = BLOCKS[kind][0]
    if in_features % block:
        raise ValueError(f"{where}: {in_features} input features are not whole {kind} blocks of {block}")
    op = REPACKERS[kind][0]
    out_features = data.shape[0]
    parts = SharedParts(lambda: repack(kind, data, in_features, dtype, rows), where)
    if op == "linear_int8":
        groups = (out_features, in_features // (16 if kind == "Q6_K" else block))
        return QuantizedLinear(op, (("qweight", TensorType(dtypes.int8, (out_features, in_features)), parts.lazy(0)),
                                    ("scale", TensorType(dtypes.float32, groups), parts.lazy(1))))
    groups = (out_features, in_features // 32)
    return QuantizedLinear(op, (
        ("qweight", TensorType(dtypes.uint8, (out_features, in_features // 2)), parts.lazy(0)),
        ("scales", TensorType(dtypes.dtype(dtype), groups), parts.lazy(1)),
        ("zeros", TensorType(dtypes.float32, groups), parts.lazy(2))))
