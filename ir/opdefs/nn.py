"""Neural-network building blocks kept as single ops so that passes and backends see
them whole: rms_norm, layer_norm, rotary embedding and scaled-dot-product attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..registry import Attr, OpDef
from ..shapes import ShapeError, broadcast_shapes, dims_equal, shapes_equal
from ..types import TensorType


def _float_like(x: TensorType, *others: TensorType | None) -> None:
    if not x.dtype.is_float:
        raise ShapeError(f"expects a floating-point input, got {x}")
    for other in others:
        if other is not None and other.dtype != x.dtype:
            raise ShapeError(f"{other} must have the dtype of {x}")


def _norm_params(x: TensorType, *params: TensorType | None) -> None:
    _float_like(x, *params)
    if x.rank == 0:
        raise ShapeError("normalization needs at least one dim")
    for p in params:
        if p is not None and (p.rank != 1 or not dims_equal(p.shape[0], x.shape[-1])):
            raise ShapeError(f"parameter {p} does not match the last dim of {x}")


def _rms_norm(x: TensorType, weight: TensorType | None, eps: float) -> TensorType:
    _norm_params(x, weight)
    return x


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Normalize in float32, return to x's dtype, then scale (as Llama does)."""
    h = x.float()
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return h * weight if weight is not None else h


def _layer_norm(x: TensorType, weight: TensorType | None, bias: TensorType | None,
                eps: float) -> TensorType:
    _norm_params(x, weight, bias)
    return x


def _layer_norm_reference(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _rotary(x: TensorType, cos: TensorType, sin: TensorType, interleaved: bool) -> TensorType:
    _float_like(x, cos, sin)
    if not shapes_equal(cos.shape, sin.shape) or x.rank < 1 or cos.rank < 1:
        raise ShapeError(f"cos {cos} and sin {sin} must have one shape")
    rotated = cos.shape[-1]
    if not isinstance(rotated, int) or rotated % 2 or not isinstance(x.shape[-1], int) or rotated > x.shape[-1]:
        raise ShapeError(f"rotary dim {rotated} must be even, static and at most {x.shape[-1]}")
    target = x.shape[:-1] + (rotated,)
    if not shapes_equal(broadcast_shapes(target, cos.shape), target):
        raise ShapeError(f"cos {cos} does not broadcast to {x}")
    return x


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     interleaved: bool) -> torch.Tensor:
    """x * cos + rotate(x) * sin on the first cos.shape[-1] features; the rest pass through."""
    r = cos.shape[-1]
    xr, rest = x[..., :r], x[..., r:]
    if interleaved:
        rot = torch.stack((-xr[..., 1::2], xr[..., 0::2]), -1).flatten(-2)
    else:
        rot = torch.cat((-xr[..., r // 2:], xr[..., : r // 2]), -1)
    out = xr * cos + rot * sin
    return torch.cat((out, rest), -1) if rest.shape[-1] else out


def alibi_slopes(heads: int, bias_max: float) -> torch.Tensor:
    """ALiBi's per-head slopes (float32 ``[heads]``), as BLOOM and MPT compute them: for
    ``p``, the largest power of two not above ``heads``, head ``h < p`` gets
    ``2 ** (-bias_max * (h + 1) / p)``; the other heads take every other slope of the
    schedule for ``2 p`` heads (the odd powers). ``bias_max`` is 8 in both models."""
    if heads < 1 or bias_max <= 0:
        raise ValueError(f"ALiBi needs at least one head and a positive maximum bias, got {heads} and {bias_max}")
    p = 2 ** math.floor(math.log2(heads))
    slopes = [2.0 ** (-bias_max * h / p) for h in range(1, p + 1)]
    slopes += [2.0 ** (-bias_max * h / (2 * p)) for h in range(1, 2 * (heads - p), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(heads: int, query_pos: torch.Tensor, key_pos: torch.Tensor, bias_max: float) -> torch.Tensor:
    """ALiBi's additive bias ``[heads, queries, keys]``: each head's slope times the
    (non-positive, where causal) distance ``key - query``."""
    distance = (key_pos[None, :] - query_pos[:, None]).float()
    return alibi_slopes(heads, bias_max).to(distance.device)[:, None, None] * distance


def _attention(q: TensorType, k: TensorType, v: TensorType, mask: TensorType | None,
               scale: float | None, causal: bool, sliding_window: int | None,
               softcap: float | None, alibi_bias_max: float | None = None,
               chunk_size: int | None = None) -> TensorType:
    _float_like(q, k, v)
    if q.rank != 4 or k.rank != 4 or v.rank != 4:
        raise ShapeError(f"attention takes [batch, heads, seq, head_dim]; got {q}, {k}, {v}")
    b, hq, sq, d = q.shape
    if not (dims_equal(k.shape[0], b) and dims_equal(v.shape[0], b)):
        raise ShapeError("q, k and v batch sizes differ")
    if not (dims_equal(k.shape[3], d) and shapes_equal(k.shape[:3], v.shape[:3])):
        raise ShapeError(f"k {k} and v {v} do not fit q {q}")
    hkv = k.shape[1]
    if not (isinstance(hq, int) and isinstance(hkv, int) and hq % hkv == 0):
        raise ShapeError(f"query heads {hq} must be a static multiple of key/value heads {hkv}")
    if mask is not None:
        scores = (b, hq, sq, k.shape[2])
        if not shapes_equal(broadcast_shapes(scores, mask.shape), scores):
            raise ShapeError(f"mask {mask} does not broadcast to scores {list(scores)}")
        if mask.dtype.kind != "bool" and mask.dtype != q.dtype:
            raise ShapeError(f"an additive mask must have the dtype of q, got {mask.dtype}")
    if sliding_window is not None and sliding_window < 1:
        raise ShapeError(f"sliding_window must be positive, got {sliding_window}")
    if softcap is not None and softcap <= 0:
        raise ShapeError(f"softcap must be positive, got {softcap}")
    if alibi_bias_max is not None and alibi_bias_max <= 0:
        raise ShapeError(f"alibi_bias_max must be positive, got {alibi_bias_max}")
    check_chunk_size(chunk_size)
    return q.with_shape((b, hq, sq, v.shape[3]))


def check_chunk_size(chunk_size: int | None) -> None:
    """A chunk size, where set, is positive."""
    if chunk_size is not None and chunk_size < 1:
        raise ShapeError(f"chunk_size must be positive, got {chunk_size}")


def attention_reference(q, k, v, mask, scale, causal, sliding_window, softcap, alibi_bias_max=None, chunk_size=None):
    """Exact attention in float32. Causal masks align to the last query (lower right),
    so that a query block of length 1 attends to the whole cache; rows with every key
    masked produce zeros. With ``alibi_bias_max``, ALiBi's bias (``alibi_bias``) is added
    to the scaled (and soft-capped) scores. With ``chunk_size`` (Llama 4's chunked local
    attention), a query sees only the keys of its own chunk of positions:
    ``key // chunk_size == query // chunk_size``."""
    if q.shape[2] == 0 or k.shape[2] == 0:
        return q.new_zeros((*q.shape[:3], v.shape[3]))
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1).float()
    v = v.repeat_interleave(groups, dim=1).float()
    scale = scale if scale is not None else 1.0 / math.sqrt(max(q.shape[-1], 1))
    scores = (q.float() @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    sq, skv = q.shape[2], k.shape[2]
    query_pos = torch.arange(sq, device=q.device)[:, None] + (skv - sq)
    key_pos = torch.arange(skv, device=q.device)[None, :]
    if alibi_bias_max is not None:
        scores = scores + alibi_bias(q.shape[1], query_pos[:, 0], key_pos[0], alibi_bias_max)
    allowed = torch.ones(sq, skv, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= key_pos <= query_pos
    if sliding_window is not None:
        allowed &= query_pos - key_pos < sliding_window
    if chunk_size is not None:
        allowed &= query_pos // chunk_size == key_pos // chunk_size
    scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    row_max = scores.amax(-1, keepdim=True)
    probs = torch.exp(scores - row_max.clamp_min(torch.finfo(torch.float32).min))
    probs = probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return (probs @ v).to(q.dtype)


OPS = [
    OpDef("rms_norm", ("x", "weight?"), _rms_norm, rms_norm_reference,
          attrs={"eps": Attr("float", 1e-6)}, doc="x / rms(x) over the last dim, times weight"),
    OpDef("layer_norm", ("x", "weight?", "bias?"), _layer_norm, _layer_norm_reference,
          attrs={"eps": Attr("float", 1e-5)}, doc="layer normalization over the last dim"),
    OpDef("rotary", ("x", "cos", "sin"), _rotary, rotary_reference,
          attrs={"interleaved": Attr("bool", False)},
          doc="rotary position embedding (half-split, or interleaved pairs)"),
    OpDef("attention", ("q", "k", "v", "mask?"), _attention, attention_reference,
          attrs={"scale": Attr("float", optional=True), "causal": Attr("bool", False),
                 "sliding_window": Attr("int", optional=True),
                 "softcap": Attr("float", optional=True), "alibi_bias_max": Attr("float", optional=True),
                 "chunk_size": Attr("int", optional=True)},
          doc="softmax(q k^T * scale) v with grouped-query heads, causal and sliding-window "
              "masks, logit soft-capping, ALiBi's linear biases (slopes from the head count and "
              "alibi_bias_max, as BLOOM and MPT compute them), chunked local attention (a query sees the "
              "keys of its own chunk_size positions) and an optional bool or additive mask"),
]
