"""Recognition and fusion rules for decoder LLMs, written as declarative rewrites.

``RAISE_RULES`` recognize RMSNorm among the primitives export leaves (Llama's
float32 normalize-cast-scale, with or without the casts a bf16 model has) and rotary
embedding written as ``x * cos + rotate_half(x) * sin``, over the whole head or, concatenated
with the rest, over its first features (partial rotary).
``FUSION_RULES`` fuse what the runtime wants whole: the residual add with the next
RMSNorm or LayerNorm; the Q, K and V projections into one GEMM (with biases); the gate and up
projections into one GEMM followed by a gated activation (SwiGLU, GeGLU). Fused weights
are concatenations of constants, which constant folding turns into lazy constants.
``ROTARY_RULES`` work on the paged step graph: rotary moves below the head transposes
(which then cancel), and the split of the fused QKV projection into heads, with rotary
on q and k, becomes one ``qkv_rotary``. ``SELECTION_RULES`` compute the last layers only
for the tokens whose logits are asked for.
"""

from __future__ import annotations

from ..ir import DType, dtypes, ops
from ..ir.shapes import dims_equal
from .pattern import Match
from .rewriter import Rule


def _scalar_literal(value) -> bool:
    return value.is_literal and value.type.static_numel == 1


def _normalize(x, eps):
    return ops.mul(x, ops.rsqrt(ops.add(ops.mean(ops.pow(x, 2.0), dims=(-1,), keepdim=True), eps)))


def _raised_norm(x, eps):
    return ops.rms_norm(x, eps=float(eps.tensor()))


def _scaled_norm(x, weight, eps: float):
    return ops.mul(ops.rms_norm(x, eps=eps), weight)


def _cast_scaled_norm(x, weight, eps: float, wide: DType, narrow: DType):
    return ops.mul(ops.cast(ops.rms_norm(ops.cast(x, dtype=wide), eps=eps), dtype=narrow), weight)


def _norm_with_weight(x, weight, eps: float):
    return ops.rms_norm(x, weight, eps=eps)


def _is_weight_of(m: Match) -> bool:
    w, x = m["weight"].type, m["x"].type
    return m["weight"].is_constant and w.rank == 1 and w.dtype == x.dtype


def _is_weight_of_narrow(m: Match) -> bool:
    return _is_weight_of(m) and m["x"].type.dtype == m["narrow"] and m["wide"] == dtypes.float32


def _rotate_half(x, cos, sin, half: int, end: int, d1: int, d2: int, d3: int):
    first = ops.slice(x, dim=d1, start=0, end=half)
    second = ops.slice(x, dim=d2, start=half, end=end)
    rotated = ops.concat([ops.neg(second), first], dim=d3)
    return ops.add(ops.mul(x, cos), ops.mul(rotated, sin))


def _rotary(x, cos, sin):
    return ops.rotary(x, cos, sin)


def _halves_of_the_last_dim(m: Match) -> bool:
    rank, size = m["x"].type.rank, m["x"].shape[-1]
    last = all(m[d] in (-1, rank - 1) for d in ("d1", "d2", "d3"))
    return last and isinstance(size, int) and m["half"] * 2 == size and m["end"] >= size


def _partial_rotary(x, cos, sin, r: int, end: int, d1: int, d2: int, d3: int, interleaved: bool):
    rotated = ops.rotary(ops.slice(x, dim=d1, start=0, end=r), cos, sin, interleaved=interleaved)
    return ops.concat([rotated, ops.slice(x, dim=d2, start=r, end=end)], dim=d3)


def _whole_rotary(x, cos, sin, r, end, d1, d2, d3, interleaved):
    return ops.rotary(x, cos, sin, interleaved=interleaved)


def _rotates_a_prefix(m: Match) -> bool:
    rank, size = m["x"].type.rank, m["x"].shape[-1]
    last = all(m[d] in (-1, rank - 1) for d in ("d1", "d2", "d3"))
    return last and isinstance(size, int) and m["r"] == m["cos"].shape[-1] and m["end"] >= size


RAISE_RULES = [
    Rule(_rotate_half, _rotary, when=_halves_of_the_last_dim, name="raise_rotary"),
    Rule(_partial_rotary, _whole_rotary, when=_rotates_a_prefix, name="raise_partial_rotary"),
    Rule(_normalize, _raised_norm, when=lambda m: _scalar_literal(m["eps"]), name="raise_rms_norm"),
    Rule(_scaled_norm, _norm_with_weight, when=_is_weight_of, name="rms_norm_weight"),
    Rule(_cast_scaled_norm, _norm_with_weight, when=_is_weight_of_narrow, name="rms_norm_cast_weight"),
]


def _residual_norm(x, residual, weight, eps: float):
    total = ops.add(x, residual)
    return ops.rms_norm(total, weight, eps=eps), total


def _add_rms_norm(x, residual, weight, eps: float):
    return ops.add_rms_norm(x, residual, weight, eps=eps)


def _residual_layer_norm(x, residual, weight, bias, eps: float):
    total = ops.add(x, residual)
    return ops.layer_norm(total, weight, bias, eps=eps), total


def _add_layer_norm(x, residual, weight, bias, eps: float):
    return ops.add_layer_norm(x, residual, weight, bias, eps=eps)


def _same_type(m: Match) -> bool:
    return m["x"].type.equivalent(m["residual"].type)


def _projections(x, wq, wk, wv):
    return ops.linear(x, wq), ops.linear(x, wk), ops.linear(x, wv)


def _projections_with_bias(x, wq, bq, wk, bk, wv, bv):
    return ops.linear(x, wq, bq), ops.linear(x, wk, bk), ops.linear(x, wv, bv)


def _one_projection(x, wq, wk, wv, bq=None, bk=None, bv=None):
    weight = ops.concat([wq, wk, wv], dim=0)
    bias = ops.concat([bq, bk, bv], dim=0) if bq is not None else None
    return ops.split(ops.linear(x, weight, bias), dim=-1, sizes=(wq.shape[0], wk.shape[0], wv.shape[0]))


def _constant_weights(*names: str):
    return lambda m: all(m[n].is_constant for n in names)


def _qkv_weights(*names: str):
    """Constant weights, and no projection is the gate of a gated MLP (four projections of
    one input, as in Qwen2-MoE's shared expert beside its router, are left to fuse_swiglu)."""
    constant = _constant_weights(*names)
    return lambda m: constant(m) and not any(_feeds_gated_mlp(v) for v in m.outputs)


def _feeds_gated_mlp(value) -> bool:
    """Whether ``value`` is a gate (activated) or an up projection (times an activated gate)."""
    activated = ("silu", "gelu")
    return any(u.op in activated or (u.op == "mul" and any(i.producer is not None and i.producer.op in activated
                                                             for i in u.inputs)) for u in value.users)


def _swiglu(x, gate, up):
    return ops.mul(ops.silu(ops.linear(x, gate)), ops.linear(x, up))


def _geglu(x, gate, up, approximate: str):
    return ops.mul(ops.gelu(ops.linear(x, gate), approximate=approximate), ops.linear(x, up))


def _gated(activation: str):
    def replacement(x, gate, up, approximate: str = "none"):
        name = activation if activation == "silu" else ("gelu_tanh" if approximate == "tanh" else "gelu")
        return ops.gated_activation(ops.linear(x, ops.concat([gate, up], dim=0)), activation=name)
    return replacement


FUSION_RULES = [
    Rule(_residual_norm, _add_rms_norm, when=_same_type, name="add_rms_norm"),
    Rule(_residual_layer_norm, _add_layer_norm, when=_same_type, name="add_layer_norm"),
    Rule(_projections_with_bias, lambda x, wq, bq, wk, bk, wv, bv: _one_projection(x, wq, wk, wv, bq, bk, bv),
         when=_qkv_weights("wq", "wk", "wv", "bq", "bk", "bv"), name="fuse_qkv_bias"),
    Rule(_projections, _one_projection, when=_qkv_weights("wq", "wk", "wv"), name="fuse_qkv"),
    Rule(_swiglu, _gated("silu"), when=_constant_weights("gate", "up"), name="fuse_swiglu"),
    Rule(_geglu, _gated("gelu"), when=_constant_weights("gate", "up"), name="fuse_geglu"),
]


def _rotary_of_transposed(x, cos, sin, interleaved: bool):
    return ops.rotary(ops.transpose(x, dim0=1, dim1=2), cos, sin, interleaved=interleaved)


def _transposed_rotary(x, cos, sin, interleaved: bool):
    cos, sin = (ops.transpose(t, dim0=1, dim1=2) for t in (cos, sin))
    return ops.transpose(ops.rotary(x, cos, sin, interleaved=interleaved), dim0=1, dim1=2)


def _same_over_dim_1(m: Match) -> bool:
    """cos and sin broadcast over dim 1 (the heads), so rotary commutes with swapping dims 1 and 2."""
    return m["x"].type.rank == 4 and all(m[t].type.rank == 4 and m[t].shape[1] == 1 for t in ("cos", "sin"))


def _heads_rotary(qkv, cos, sin, q_size: int, k_size: int, v_size: int, q4: tuple, q3: tuple, k4: tuple,
                  k3: tuple, v3: tuple, interleaved: bool):
    q, k, v = ops.split(qkv, dim=-1, sizes=(q_size, k_size, v_size))
    q = ops.reshape(ops.rotary(ops.reshape(q, shape=q4), cos, sin, interleaved=interleaved), shape=q3)
    k = ops.reshape(ops.rotary(ops.reshape(k, shape=k4), cos, sin, interleaved=interleaved), shape=k3)
    return q, k, ops.reshape(v, shape=v3)


def _qkv_rotary(qkv, cos, sin, q_size, k_size, v_size, q4, q3, k4, k3, v3, interleaved):
    return ops.qkv_rotary(qkv, cos, sin, q_heads=q3[-2], kv_heads=k3[-2], head_dim=q3[-1], interleaved=interleaved)


def _cut_into_heads(m: Match) -> bool:
    """The reshapes cut q, k and v into heads of one size, keeping the projection's leading
    dims; the replacement's type check covers the rest."""
    lead, d = m["qkv"].shape[:-1], m["q3"][-1]
    cut = all(len(m[s]) == len(lead) + 2 and m[s][-1] == d and all(dims_equal(a, b) for a, b in zip(m[s], lead))
              for s in ("q4", "k4"))
    heads = all(len(m[s]) == 3 and isinstance(m[s][-2], int) and m[s][-1] == d for s in ("q3", "k3", "v3"))
    return cut and heads and isinstance(d, int) and m["k3"][-2] == m["v3"][-2]


ROTARY_RULES = [
    Rule(_rotary_of_transposed, _transposed_rotary, when=_same_over_dim_1, name="rotary_before_transpose"),
    Rule(_heads_rotary, _qkv_rotary, when=_cut_into_heads, name="fuse_qkv_rotary"),
]


# Selecting rows early: ``index_select`` along a token axis moves above the ops that work
# token by token, so the LM head and the final norm run only on the selected tokens.
def _not_last(m: Match) -> bool:
    rank = m["x"].type.rank  # a 0-d x (a scalar broadcast into the product) has no token axis to select along
    return rank > 0 and m["dim"] % rank != rank - 1


def _select_tanh(x, index, dim: int):
    return ops.index_select(ops.tanh(x), index, dim=dim)


def _tanh_selected(x, index, dim: int):
    return ops.tanh(ops.index_select(x, index, dim=dim))


def _select_gated(x, index, dim: int, activation: str):
    return ops.index_select(ops.gated_activation(x, activation=activation), index, dim=dim)


def _gated_selected(x, index, dim: int, activation: str):
    return ops.gated_activation(ops.index_select(x, index, dim=dim), activation=activation)


def _select_linear(x, weight, index, dim: int):
    return ops.index_select(ops.linear(x, weight), index, dim=dim)


def _select_biased_linear(x, weight, bias, index, dim: int):
    return ops.index_select(ops.linear(x, weight, bias), index, dim=dim)


def _linear_selected(x, weight, index, dim: int, bias=None):
    return ops.linear(ops.index_select(x, index, dim=dim), weight, bias)


def _select_scaled(x, scale, index, dim: int):
    return ops.index_select(ops.mul(x, scale), index, dim=dim)


def _scaled_selected(x, scale, index, dim: int):
    return ops.mul(ops.index_select(x, index, dim=dim), scale)


def _select_divided(x, scale, index, dim: int):
    return ops.index_select(ops.div(x, scale), index, dim=dim)


def _divided_selected(x, scale, index, dim: int):
    return ops.div(ops.index_select(x, index, dim=dim), scale)


def _select_norm(x, weight, index, dim: int, eps: float):
    return ops.index_select(ops.rms_norm(x, weight, eps=eps), index, dim=dim)


def _norm_selected(x, weight, index, dim: int, eps: float):
    return ops.rms_norm(ops.index_select(x, index, dim=dim), weight, eps=eps)


def _select_layer_norm(x, weight, bias, index, dim: int, eps: float):
    return ops.index_select(ops.layer_norm(x, weight, bias, eps=eps), index, dim=dim)


def _layer_norm_selected(x, weight, bias, index, dim: int, eps: float):
    return ops.layer_norm(ops.index_select(x, index, dim=dim), weight, bias, eps=eps)


def _select_residual_norm(x, residual, weight, index, dim: int, eps: float):
    normed, _ = ops.add_rms_norm(x, residual, weight, eps=eps)
    return ops.index_select(normed, index, dim=dim)


def _residual_norm_selected(x, residual, weight, index, dim: int, eps: float):
    normed, _ = ops.add_rms_norm(ops.index_select(x, index, dim=dim), ops.index_select(residual, index, dim=dim),
                                 weight, eps=eps)
    return normed


def _scalar_operand(name: str):
    return lambda m: _not_last(m) and m[name].type.rank == 0


SELECTION_RULES = [
    Rule(_select_tanh, _tanh_selected, when=_not_last, name="select_before_tanh"),
    Rule(_select_gated, _gated_selected, when=_not_last, name="select_before_gated_activation"),
    Rule(_select_linear, _linear_selected, when=_not_last, name="select_before_linear"),
    Rule(_select_biased_linear, _linear_selected, when=_not_last, name="select_before_biased_linear"),
    Rule(_select_scaled, _scaled_selected, when=_scalar_operand("scale"), name="select_before_scale"),
    Rule(_select_divided, _divided_selected, when=_scalar_operand("scale"), name="select_before_division"),
    Rule(_select_norm, _norm_selected, when=_not_last, name="select_before_rms_norm"),
    Rule(_select_layer_norm, _layer_norm_selected, when=_not_last, name="select_before_layer_norm"),
    Rule(_select_residual_norm, _residual_norm_selected, when=_not_last, name="select_before_add_rms_norm"),
]
