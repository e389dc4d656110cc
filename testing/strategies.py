"""Hypothesis strategies for kiln graphs: random well-typed graphs over the registry's
ops, random inputs for a graph, and targeted corruptions for testing the verifier.

``graphs()`` builds a graph step by step. Each step picks a *generator* (a small
function that proposes one or a few nodes over the values built so far) and keeps its
nodes when the op's shape rule accepts them. Generators also make the redundancy that
cleanup passes remove (x*1, duplicate nodes, transpose pairs, cast chains), so that
property tests exercise the passes rather than pass through them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from ..ir import Graph, ShapeError, TensorType, Value, dtypes, ops, sym
from ..ir.graph import GraphError
from ..ir.shapes import broadcast_shapes, evaluate_shape, free_symbols

Draw = Callable[[st.SearchStrategy], object]
SYMBOLS = (sym("s0"), sym("s1"))


@dataclass
class GraphDraft:
    """A graph under construction, handed to each generator.

    ``value(where)`` draws one of the float32 values built so far; ``constant(shape)``
    adds a random constant; ``draw`` draws from any hypothesis strategy; ``dims`` are the
    dims a new shape may use. A generator returns the value it made (or None).
    """

    graph: Graph
    draw: Draw
    dims: list  # dims that new shapes may use: those bound by inputs, and small ints
    pool: list[Value]
    seed: int = 0

    def value(self, where=None) -> Value | None:
        found = [v for v in self.pool if where is None or where(v)]
        return self.draw(st.sampled_from(found)) if found else None

    def constant(self, shape, low: float = -1.0, high: float = 1.0, dtype=dtypes.float32) -> Value:
        self.seed += 1
        gen = torch.Generator().manual_seed(self.seed)
        data = torch.rand(tuple(shape), generator=gen) * (high - low) + low
        return self.graph.add_constant(data.to(dtype.torch_dtype), name="k")

    def static_axes(self, v: Value) -> list[int]:
        return [i for i, d in enumerate(v.shape) if isinstance(d, int)]


def _broadcastable(a, b) -> bool:
    try:
        broadcast_shapes(a, b)
    except ShapeError:
        return False
    return True


def _unary(b: GraphDraft):
    v = b.value()
    name = b.draw(st.sampled_from(["silu", "neg", "abs", "tanh", "sigmoid", "relu", "sin", "cos", "erf", "gelu"]))
    attrs = {"approximate": b.draw(st.sampled_from(["none", "tanh"]))} if name == "gelu" else {}
    return ops.call(name, v, **attrs)


def _binary(b: GraphDraft):
    x = b.value()
    kind = b.draw(st.sampled_from(["value", "constant", "scalar", "identity"]))
    name = b.draw(st.sampled_from(["add", "sub", "mul", "maximum", "minimum", "div"]))
    if kind == "value":
        y = b.value(lambda v: _broadcastable(v.shape, x.shape))
    elif kind == "constant":
        suffix = b.draw(st.integers(0, x.type.rank))
        shape = [d if isinstance(d, int) else 1 for d in x.shape[x.type.rank - suffix:]]
        y = b.constant(shape, 0.5, 2.0) if name == "div" else b.constant(shape)
    elif kind == "scalar":
        y = b.graph.scalar(b.draw(st.sampled_from([0.5, 2.0, -1.5])), x.dtype)
    else:  # an identity element the canonicalizer should remove
        name = b.draw(st.sampled_from(["add", "sub", "mul", "div"]))
        y = b.graph.scalar(0.0 if name in ("add", "sub") else 1.0, x.dtype)
    if name == "div" and kind == "value":
        y = ops.add(ops.abs(y), 1.0)
    swap = kind != "identity" and b.draw(st.booleans())
    return ops.call(name, y, x) if swap else ops.call(name, x, y)


def _select(b: GraphDraft):
    x = b.value()
    y = b.value(lambda v: v.shape == x.shape) or x
    cond = ops.call(b.draw(st.sampled_from(["lt", "le", "gt", "ge", "eq", "ne"])), x, y)
    if b.draw(st.booleans()):
        cond = ops.logical_or(cond, ops.logical_not(cond)) if b.draw(st.booleans()) else ops.logical_not(cond)
    return ops.where(cond, x, y)


def _linear(b: GraphDraft):
    x = b.value(lambda v: v.type.rank >= 1 and isinstance(v.shape[-1], int))
    if x is None:
        return None
    out = b.draw(st.integers(1, 5))
    w = b.constant((out, x.shape[-1]))
    bias = b.constant((out,)) if b.draw(st.booleans()) else None
    if b.draw(st.booleans()):
        return ops.linear(x, w, bias)
    y = ops.matmul(x, ops.transpose(w, dim0=0, dim1=1))
    return y + bias if bias is not None else y


def _conv(b: GraphDraft):
    """A convolution over a value of 1 or 2 static spatial dims (and static channels)."""
    x = b.value(lambda v: v.type.rank in (3, 4) and all(isinstance(d, int) and d > 0 for d in v.shape[1:]))
    if x is None:
        return None
    channels, spatial = x.shape[1], x.shape[2:]
    groups = b.draw(st.sampled_from([1, channels]))
    padding = tuple(b.draw(st.integers(0, 1)) for _ in spatial)
    dilation = tuple(b.draw(st.integers(1, 2)) for _ in spatial)
    kernel = tuple(b.draw(st.integers(1, (d + 2 * p - 1) // dil + 1)) for d, p, dil in zip(spatial, padding, dilation))
    stride = tuple(b.draw(st.integers(1, 2)) for _ in spatial)
    weight = b.constant((groups * b.draw(st.integers(1, 2)), channels // groups, *kernel))
    bias = b.constant((weight.shape[0],)) if b.draw(st.booleans()) else None
    return ops.conv(x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)


def _reduce(b: GraphDraft):
    x = b.value(lambda v: v.type.rank >= 1)
    if x is None:
        return None
    axis = b.draw(st.integers(-x.type.rank, x.type.rank - 1))
    name = b.draw(st.sampled_from(["sum", "mean", "max", "min", "softmax", "log_softmax"]))
    if name in ("softmax", "log_softmax"):
        return ops.call(name, x, dim=axis)
    return ops.call(name, x, dims=(axis,), keepdim=b.draw(st.booleans()))


def _norm(b: GraphDraft):
    x = b.value(lambda v: v.type.rank >= 1 and isinstance(v.shape[-1], int))
    if x is None:
        return None
    d = x.shape[-1]
    if b.draw(st.booleans()):
        return ops.rms_norm(x, b.constant((d,)) if b.draw(st.booleans()) else None, eps=1e-5)
    return ops.layer_norm(x, b.constant((d,)), b.constant((d,)), eps=1e-5)


def _movement(b: GraphDraft):
    x = b.value(lambda v: v.type.rank >= 1)
    if x is None:
        return None
    rank = x.type.rank
    kind = b.draw(st.sampled_from(["transpose", "transpose_pair", "permute", "reshape", "reshape_chain",
                                   "unsqueeze", "expand", "slice", "concat", "split"]))
    axis = b.draw(st.integers(0, rank - 1))
    if kind in ("transpose", "transpose_pair"):
        other = b.draw(st.integers(0, rank - 1))
        y = ops.transpose(x, dim0=axis, dim1=other)
        return ops.transpose(y, dim0=other - rank, dim1=axis) if kind == "transpose_pair" else y
    if kind == "permute":
        order = b.draw(st.permutations(range(rank)))
        return ops.permute(ops.permute(x, dims=tuple(order)), dims=tuple(b.draw(st.permutations(range(rank)))))
    if kind in ("reshape", "reshape_chain"):
        flat = ops.reshape(x, shape=(-1,))
        return ops.reshape(flat, shape=x.shape) if kind == "reshape_chain" else flat
    if kind == "unsqueeze":
        y = ops.unsqueeze(x, dim=axis)
        return ops.squeeze(y, dim=axis) if b.draw(st.booleans()) else y
    if kind == "expand":
        ones = [i for i, d in enumerate(x.shape) if d == 1]
        if not ones:
            return ops.expand(x, shape=x.shape)
        shape = list(x.shape)
        shape[ones[0]] = b.draw(st.sampled_from(b.dims))
        return ops.expand(x, shape=tuple(shape))
    static = b.static_axes(x)
    if kind == "slice" and static:
        axis = b.draw(st.sampled_from(static))
        start = b.draw(st.integers(0, x.shape[axis]))
        return ops.slice(x, dim=axis, start=start, end=b.draw(st.integers(start, x.shape[axis] + 2)),
                         step=b.draw(st.integers(1, 2)))
    if kind == "split" and static:
        axis = b.draw(st.sampled_from(static))
        size = x.shape[axis]
        cut = b.draw(st.integers(0, size))
        first, second = ops.split(x, dim=axis, sizes=(cut, size - cut))
        return ops.concat([second, first], dim=axis)
    same = b.value(lambda v: v.shape == x.shape) or x
    return ops.concat([x, same] if b.draw(st.booleans()) else [x], dim=axis)


def _cast(b: GraphDraft):
    x = b.value()
    middle = b.draw(st.sampled_from([dtypes.float64, dtypes.float16, dtypes.bfloat16, dtypes.float32]))
    return ops.cast(ops.cast(x, dtype=middle), dtype=dtypes.float32)


def _duplicate(b: GraphDraft):
    nodes = [n for n in b.graph.nodes if any(r.type.dtype == dtypes.float32 for r in n.results)]
    if not nodes:
        return None
    node = b.draw(st.sampled_from(nodes))
    results = b.graph.call(node.op, list(node.inputs), node.attrs).results
    return next(r for r in results if r.type.dtype == dtypes.float32)


def _attention(b: GraphDraft):
    x = b.value(lambda v: v.type.rank == 3 and isinstance(v.shape[-1], int))
    if x is None:
        return None
    q = ops.unsqueeze(x, dim=1)
    heads = b.draw(st.sampled_from([1, 2]))
    if heads == 2:
        q = ops.concat([q, ops.neg(q)], dim=1)
    kv = ops.unsqueeze(b.value(lambda v: v.shape == x.shape) or x, dim=1)
    out = ops.attention(q, kv, kv, causal=b.draw(st.booleans()),
                        sliding_window=b.draw(st.sampled_from([None, 1, 2])),
                        softcap=b.draw(st.sampled_from([None, 5.0])))
    return ops.reshape(out, shape=(x.shape[0], -1))


def _rotary(b: GraphDraft):
    x = b.value(lambda v: v.type.rank >= 2 and isinstance(v.shape[-1], int)
                and v.shape[-1] >= 2 and v.shape[-1] % 2 == 0)
    if x is None:
        return None
    rotated = b.draw(st.sampled_from([d for d in range(2, x.shape[-1] + 1, 2)]))
    rows = x.shape[-2] if isinstance(x.shape[-2], int) else 1
    angles = b.constant((rows, rotated), -3.0, 3.0)
    return ops.rotary(x, ops.cos(angles), ops.sin(angles), interleaved=b.draw(st.booleans()))


def _lookup(b: GraphDraft):
    x = b.value(lambda v: v.type.rank >= 1 and bool(b.static_axes(v)))
    if x is None:
        return None
    axis = b.draw(st.sampled_from(b.static_axes(x)))
    size = x.shape[axis]
    if size == 0:
        return None
    count = b.draw(st.integers(1, 4))
    index = torch.tensor(b.draw(st.lists(st.integers(0, size - 1), min_size=count, max_size=count)))
    idx = b.graph.add_constant(index, name="idx")
    if x.type.rank == 2 and axis == 0:
        return ops.embedding(idx, x)
    return ops.index_select(x, idx, dim=axis)


def _paged_batch(b: GraphDraft, tokens: int) -> tuple[int, int, list[Value]]:
    """A batch of a few sequences over a paged cache, laid out as literals: the number of
    blocks, the block size, and slot_mapping, query_start, context_lens, block_tables."""
    cuts = sorted(b.draw(st.lists(st.integers(0, tokens), max_size=2)))
    bounds = [0, *cuts, tokens]
    cached = [b.draw(st.integers(0, 3)) for _ in bounds[1:]]
    block_size, blocks_per_seq = 2, 4
    slots, lengths, tables = [], [], []
    for s, (start, end) in enumerate(zip(bounds, bounds[1:])):
        table = [s * blocks_per_seq + i for i in range(blocks_per_seq)]
        positions = range(cached[s], cached[s] + end - start)
        slots += [table[p // block_size] * block_size + p % block_size for p in positions]
        lengths.append(cached[s] + end - start)
        tables.append(table)
    literal = b.graph.add_constant
    return blocks_per_seq * len(lengths), block_size, [
        literal(torch.tensor(slots, dtype=torch.int64), name="slots"),
        literal(torch.tensor(bounds, dtype=torch.int32), name="starts"),
        literal(torch.tensor(lengths, dtype=torch.int32), name="lengths"),
        literal(torch.tensor(tables, dtype=torch.int32), name="tables")]


def _level(x: Value) -> Value:
    """A scalar that depends on ``x``, to tie a generated block to the graph."""
    return ops.mean(x, dims=tuple(range(x.type.rank))) if x.type.rank else x


def _paged(b: GraphDraft):
    """Attention of a few sequences over a paged cache, the batch laid out as literals."""
    x = b.value()
    tokens, dim = b.draw(st.integers(1, 5)), b.draw(st.sampled_from([2, 4]))
    q = b.constant((tokens, 1, dim)) * _level(x)
    blocks, block_size, batch = _paged_batch(b, tokens)
    out, _, _ = ops.paged_attention(
        q, ops.neg(q), q, b.constant((blocks, block_size, 1, dim)), b.constant((blocks, block_size, 1, dim)),
        *batch, softcap=b.draw(st.sampled_from([None, 5.0])), sliding_window=b.draw(st.sampled_from([None, 2])))
    return ops.mean(out, dims=(0, 1, 2)) + x


def _mla(b: GraphDraft):
    """Multi-head latent attention: whole over [1, heads, seq, dim] queries, or over a paged
    cache of latents with the batch laid out as literals."""
    x = b.value()
    heads, nope, rope, rank, v_dim = b.draw(st.sampled_from([1, 2])), 2, 2, b.draw(st.sampled_from([2, 4])), 2
    kv_b, level = b.constant((heads * (nope + v_dim), rank)), _level(x)
    tokens = b.draw(st.integers(1, 5))
    if b.draw(st.booleans()):
        q = b.constant((1, heads, tokens, nope + rope)) * level
        out = ops.mla_attention(q, b.constant((1, 1, tokens, rank)) * level, b.constant((1, 1, tokens, rope)), kv_b,
                                scale=b.draw(st.sampled_from([None, 0.5])))
        return ops.mean(out, dims=(0, 1, 2, 3)) + x
    blocks, block_size, batch = _paged_batch(b, tokens)
    out, _ = ops.paged_mla_attention(b.constant((tokens, heads, nope + rope)) * level,
                                     b.constant((tokens, 1, rank)) * level, b.constant((tokens, 1, rope)), kv_b,
                                     b.constant((blocks, block_size, 1, rank + rope)), *batch)
    return ops.mean(out, dims=(0, 1, 2)) + x


def _fused(b: GraphDraft):
    x = b.value(lambda v: v.type.rank >= 1 and isinstance(v.shape[-1], int) and v.shape[-1] >= 1)
    if x is None:
        return None
    d = x.shape[-1]
    if b.draw(st.booleans()):
        weight = b.constant((d,)) if b.draw(st.booleans()) else None
        normed, total = ops.add_rms_norm(x, ops.neg(x), weight, eps=1e-5) if b.draw(st.booleans()) \
            else ops.add_rms_norm(x, x, weight, eps=1e-5)
        return normed + total
    if b.draw(st.booleans()):
        normed, total = ops.add_layer_norm(x, ops.neg(x), b.constant((d,)), b.constant((d,)), eps=1e-5)
        return normed * total
    if b.draw(st.booleans()):
        heads, head_dim = b.draw(st.sampled_from([(2, 1), (1, 1), (3, 1)])), 2
        qkv = ops.linear(x, b.constant(((heads[0] + 2 * heads[1]) * head_dim, d)))
        cos, sin = b.constant((1, head_dim)), b.constant((1, head_dim))
        q, k, v = ops.qkv_rotary(qkv, cos, sin, q_heads=heads[0], kv_heads=heads[1], head_dim=head_dim,
                                 interleaved=b.draw(st.booleans()))
        return ops.sum(q, dims=(1, 2)) + ops.sum(k * v, dims=(1, 2))
    activation = b.draw(st.sampled_from(["silu", "gelu", "gelu_tanh"]))
    return ops.gated_activation(ops.concat([x, ops.neg(x)], dim=-1), activation=activation)


def _from_a_norm(b: GraphDraft, x: Value, qweight: Value, weight_scale: Value, bias: Value | None, qdtype) -> Value:
    """A norm (with or without a residual) that emits its output rounded per token into
    ``qdtype``, and ``scaled_linear`` over the codes."""
    weight = b.constant((x.shape[-1],), dtype=x.type.dtype) if b.draw(st.booleans()) else None
    if b.draw(st.booleans()):
        codes, scales = ops.rms_norm_quant(x, weight, eps=1e-5, qdtype=qdtype)
    else:
        codes, scales, _ = ops.add_rms_norm_quant(x, x, weight, eps=1e-5, qdtype=qdtype)
    return ops.scaled_linear(codes, scales, qweight, weight_scale, bias, dtype=x.type.dtype)


def _quantized(b: GraphDraft):
    """A quantized linear layer (INT8, INT4 in groups, FP8 dynamic or static, INT8 W8A8,
    or a W8A8 layer over the codes a norm emits) over a random weight quantized by the
    ``quantize`` stage's own quantizers."""
    from ..passes.quantization.weights import quantize_fp8_weight, quantize_int4, quantize_int8

    x = b.value(lambda v: v.type.rank >= 1 and isinstance(v.shape[-1], int) and v.shape[-1] > 0
                and v.shape[-1] % 2 == 0)
    if x is None:
        return None
    d, out = x.shape[-1], b.draw(st.integers(1, 5))
    weight = b.constant((out, d)).tensor()
    bias = b.constant((out,)) if b.draw(st.booleans()) else None
    scheme = b.draw(st.sampled_from(["int8", "int4", "fp8", "w8a8", "fp8 from a norm", "w8a8 from a norm"]))
    if scheme.endswith("from a norm"):
        fp8 = scheme.startswith("fp8")
        parts = [b.graph.add_constant(t, name="k") for t in (quantize_fp8_weight if fp8 else quantize_int8)(weight)]
        bias = b.constant((out,), dtype=x.type.dtype) if bias is not None else None
        return _from_a_norm(b, x, *parts, bias, dtypes.float8_e4m3fn if fp8 else dtypes.int8)
    if scheme in ("int8", "w8a8"):
        parts = quantize_int8(weight)
    elif scheme == "int4":
        parts = quantize_int4(weight, b.draw(st.sampled_from([g for g in (2, d) if d % g == 0])), b.draw(st.booleans()))
    else:
        static = b.graph.scalar(b.draw(st.sampled_from([0.01, 0.5])), dtypes.float32) if b.draw(st.booleans()) else None
        return ops.linear_fp8(x, *[b.graph.add_constant(t, name="k") for t in quantize_fp8_weight(weight)], static,
                              bias)
    return ops.call(f"linear_{scheme}", x, *[b.graph.add_constant(t, name="k") for t in parts], bias)


def _creation(b: GraphDraft):
    x = b.value(lambda v: v.type.rank >= 1)
    if x is None:
        return None
    if b.draw(st.booleans()):
        return x + ops.full(graph=b.graph, shape=x.shape, value=b.draw(st.sampled_from([0.0, 0.25])),
                            dtype=dtypes.float32)
    steps = ops.cast(ops.arange(graph=b.graph, end=x.shape[-1]), dtype=dtypes.float32)
    return x * (steps * 0.1)


def _collective(b: GraphDraft):
    """Collectives over a group of one rank (the only group a single interpreter runs)."""
    x = b.value(lambda v: v.type.rank >= 1)
    if x is None:
        return None
    if b.draw(st.booleans()):
        return ops.all_reduce(x, ranks=1)
    return ops.all_gather(x, dim=b.draw(st.integers(-x.type.rank, x.type.rank - 1)), ranks=1)


def _math(b: GraphDraft):
    x = b.value()
    positive = ops.abs(x) + 0.5
    name = b.draw(st.sampled_from(["exp", "log", "sqrt", "rsqrt", "reciprocal", "pow", "clamp",
                                   "argmax", "gather", "logical_and", "expm1", "softplus", "log1p", "floor"]))
    if name in ("exp", "expm1"):
        return ops.call(name, -positive)
    if name == "softplus":
        return ops.softplus(x, beta=b.draw(st.sampled_from([1.0, 2.0])), threshold=b.draw(st.sampled_from([20.0, 0.5])))
    if name == "pow":
        return ops.pow(positive, b.draw(st.sampled_from([0.5, 2.0])))
    if name == "clamp":
        low = b.draw(st.sampled_from([None, -0.5]))
        return ops.clamp(x, min=low, max=b.draw(st.sampled_from([0.5] if low is None else [None, 0.5])))
    if name == "argmax" and x.type.rank:
        return ops.cast(ops.argmax(x, dim=-1, keepdim=True), dtype=dtypes.float32) * x
    if name == "gather" and x.type.rank:
        index = ops.argmax(x, dim=-1, keepdim=True)
        return ops.gather(x, index, dim=-1) - x
    if name == "logical_and":
        return ops.where(ops.logical_and(ops.gt(x, 0.0), ops.lt(x, 1.0)), x, -x)
    if name == "floor" and x.type.rank:  # of exact values: floor would magnify a pass's rounding
        steps = ops.cast(ops.arange(graph=b.graph, end=x.shape[-1]), dtype=x.dtype)
        return x * ops.floor(steps * 0.25)
    return ops.call(name, positive) if name in ("log", "sqrt", "rsqrt", "reciprocal", "log1p") else None


def _redundant(b: GraphDraft):
    """Shapes that canonicalization removes and that other generators rarely make."""
    x = b.value()
    kind = b.draw(st.sampled_from(["neg_neg", "unsqueeze_squeeze", "full_slice", "same_reshape"]))
    if kind == "neg_neg":
        return ops.neg(ops.neg(x))
    if kind == "unsqueeze_squeeze":
        ones = [i for i, d in enumerate(x.shape) if d == 1]
        return ops.unsqueeze(ops.squeeze(x, dim=ones[0]), dim=ones[0]) if ones else None
    if kind == "full_slice" and x.type.rank:
        end = x.shape[0] if b.draw(st.booleans()) else 2**63 - 1
        return ops.slice(x, dim=0, start=0, end=end)
    return ops.reshape(x, shape=x.shape)


def _moe(b: GraphDraft, routed_apart: bool = False, exchanged: bool = False):
    """A routed mixture of experts over [tokens, hidden], whole or as topk + moe_experts, its
    routing weights on the experts' outputs or inputs; ``routed_apart``: as moe_route +
    moe_experts, the form an expert-parallel graph has; ``exchanged``: as the all-to-all
    forms (moe_all_to_all, moe_experts_all_to_all) over a group of one rank."""
    x = b.value(lambda v: v.type.rank == 2 and isinstance(v.shape[-1], int) and v.shape[-1] >= 1)
    if x is None:
        return None
    hidden, experts, inter = x.shape[-1], b.draw(st.integers(2, 4)), b.draw(st.integers(1, 3))
    top_k = b.draw(st.integers(1, experts))
    logits = ops.linear(x, b.constant((experts, hidden)))
    gate_up, down = b.constant((experts, 2 * inter, hidden)), b.constant((experts, hidden, inter))
    experts_attrs = dict(activation=b.draw(st.sampled_from(["silu", "gelu", "gelu_tanh"])),
                         weigh_inputs=b.draw(st.booleans()))
    if not routed_apart and b.draw(st.booleans()):
        weights, indices = ops.topk(ops.softmax(logits, dim=-1), k=top_k)
        if exchanged:
            return ops.moe_experts_all_to_all(x, weights, indices, gate_up, down, ranks=1, **experts_attrs)
        return ops.moe_experts(x, weights, indices, gate_up, down, **experts_attrs)
    scoring = b.draw(st.sampled_from(["softmax", "sigmoid", "sparsemixer"]))
    groups = b.draw(st.sampled_from([g for g in (1, 2) if experts % g == 0 and (g == 1 or experts // g >= 2)]))
    bias = b.constant((experts,)) if scoring == "sigmoid" and b.draw(st.booleans()) else None
    routing = dict(top_k=top_k, scoring=scoring, normalize=b.draw(st.booleans()),
                   scale=b.draw(st.sampled_from([1.0, 2.5])), num_groups=groups, topk_groups=1 if groups == 1 else 2,
                   jitter_eps=b.draw(st.sampled_from([0.01, 0.3])) if scoring == "sparsemixer" else 0.0)
    if routed_apart:
        weights, indices = ops.moe_route(logits, bias, **routing)
        return ops.moe_experts(x, weights, indices, gate_up, down, **experts_attrs)
    if exchanged:
        return ops.moe_all_to_all(x, logits, gate_up, down, bias, ranks=1, **routing, **experts_attrs)
    return ops.moe(x, logits, gate_up, down, bias, **routing, **experts_attrs)


GENERATORS: dict[str, Callable[[GraphDraft], Value | None]] = {
    "math": _math, "redundant": _redundant,
    "unary": _unary, "binary": _binary, "select": _select, "linear": _linear, "conv": _conv, "reduce": _reduce,
    "norm": _norm, "movement": _movement, "cast": _cast, "duplicate": _duplicate,
    "attention": _attention, "rotary": _rotary, "lookup": _lookup, "creation": _creation, "paged": _paged,
    "fused": _fused, "collective": _collective, "moe": _moe, "quantized": _quantized, "mla": _mla,
    "moe_route": lambda b: _moe(b, routed_apart=True), "moe_all_to_all": lambda b: _moe(b, exchanged=True),
}

# The generators of ops that every backend lowers: no collectives, mixtures of experts,
# quantized linears or latent attention (the TensorRT and ONNX backends refuse those by name).
PORTABLE_GENERATORS = tuple(name for name in GENERATORS if name not in ("collective", "moe", "quantized", "mla",
                                                                        "moe_route", "moe_all_to_all"))


Generator = Callable[[GraphDraft], "Value | None"]


@st.composite
def graphs(draw: Draw, max_steps: int = 10, generators: tuple[str, ...] = tuple(GENERATORS),
           extra_generators: Mapping[str, Generator] | None = None) -> Graph:
    """Random verified float32 graphs over 1 or 2 inputs with symbolic and static dims.

    ``generators`` names the built-in generators to use; ``extra_generators`` adds the
    caller's own, for example one that plants the pattern a new pass rewrites.
    """
    table = {**{name: GENERATORS[name] for name in generators}, **(extra_generators or {})}
    graph = Graph("random")
    symbols = draw(st.lists(st.sampled_from(SYMBOLS), min_size=1, max_size=2, unique=True))
    dims = [*symbols, 1, 2, 3, 4]
    for i in range(draw(st.integers(1, 2))):
        shape = draw(st.lists(st.sampled_from(dims), min_size=1, max_size=3))
        if i == 0:
            shape[0] = symbols[0]
        graph.add_input(f"x{i}", TensorType(dtypes.float32, shape))
    used = free_symbols([d for v in graph.inputs for d in v.shape])
    bound = [d for d in dims if isinstance(d, int) or d in used]
    builder = GraphDraft(graph, draw, bound, list(graph.inputs))
    for _ in range(draw(st.integers(1, max_steps))):
        generator = table[draw(st.sampled_from(sorted(table)))]
        try:
            value = generator(builder)
        except (ShapeError, GraphError):
            continue
        if value is not None and value.type.dtype == dtypes.float32:
            builder.pool.append(value)
    candidates = builder.pool[len(graph.inputs):] or builder.pool
    outputs = draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=3))
    graph.set_outputs([candidates[-1], *outputs])
    return graph


@st.composite
def inputs(draw: Draw, graph: Graph) -> list[torch.Tensor]:
    """Random tensors for ``graph``'s inputs, with each symbol bound to a size in 1..4."""
    env = {s: draw(st.integers(1, 4)) for s in sorted(free_symbols(
        [d for v in graph.inputs for d in v.shape]), key=str)}
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    out = []
    for value in graph.inputs:
        shape = evaluate_shape(value.shape, env)
        out.append(torch.randn(shape, generator=gen).to(value.type.dtype.torch_dtype))
    return out


@st.composite
def graphs_with_inputs(draw: Draw, **kwargs) -> tuple[Graph, list[torch.Tensor]]:
    """A random graph and random inputs for it."""
    graph = draw(graphs(**kwargs))
    return graph, draw(inputs(graph))
