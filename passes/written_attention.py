"""Raising attention that a model writes out itself into one ``attention`` op.

BLOOM, MPT and Falcon do not call transformers' attention interface: their graphs hold
the scores ``q @ k^T``, a scaling, an ALiBi bias and a causal mask made of comparisons
of positions, a softmax and the weighted sum of the values. Anchored at each softmax
over the last dim, this pass walks up the logits to the ``matmul`` of queries and keys.
Along the way only scalings by a constant, reshapes, casts, additions of a *positional*
term and masked fills by a positional condition may occur; a positional term is computed
from constants and shape symbols alone, never from an input. Below the softmax, reshapes
and casts must lead to the ``matmul`` with the values. An ``attention`` op given a
positional mask operand (SDPA called with the mask the model built, as Falcon does under
transformers' ``sdpa`` implementation) is checked the same way, from its mask.

What the positional terms amount to is then found by evaluating the logits with the
scores taken as zero, at concrete sizes: two sequence lengths, and one past every
integer constant among the terms (so that a sliding window cannot hide). The result must
mask exactly the keys after each query and leave ``slope[h] * key`` plus a per-row
constant on the others (softmax ignores the constant). Zero slopes give causal attention;
slopes that follow ``alibi_slopes(heads, m)`` give ``alibi_bias_max=m``. Anything else is
left as it is, and the graph then fails where attention must be one op (paging), by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import sympy
import torch

from ..ir import Graph, ShapeError, Value, ops
from ..ir.opdefs.nn import alibi_slopes
from ..ir.shapes import dims_equal, evaluate_dim, evaluate_shape
from .cleanup import eliminate_dead_code

MASKED = -1e30  # a logit at or below this is a masked-out key
LENGTHS = (5, 12)  # the sequence lengths the positional terms are evaluated at
LONGEST = 8192  # no evaluation past this length (a window beyond it is not recognized)


@dataclass
class _Attention:
    """A written-out attention found in the graph."""

    q: Value  # [batch, heads, seq, head_dim], and k, v likewise
    k: Value
    v: Value
    scores: Value | None  # the matmul of queries and keys (taken as zero), if written out
    logits: Value  # what the scores get added or are masked by: the softmax's input, or a mask operand
    out: Value  # the matmul of the probabilities and the values, or the masked attention
    scale: float | None
    terms: list[Value]  # the positional values the logits depend on
    softcap: float | None = None

    @property
    def frame(self) -> tuple:
        """The scores' shape, [batch, heads, queries, keys]."""
        return (self.q.shape[0], self.q.shape[1], self.q.shape[2], self.k.shape[2])


def raise_written_attention(graph: Graph) -> int:
    """Replace each written-out causal attention (with or without ALiBi) by one
    ``attention`` op; return how many were replaced."""
    replaced = 0
    for node in list(graph.nodes):
        if node.graph is not graph:
            continue
        if node.op == "softmax" and node.results[0].type.rank == 4 and node.attrs["dim"] in (-1, 3):
            found = _find(node.inputs[0], node.results[0])
        elif node.op == "attention":
            found = _masked(node)
        else:
            continue
        attrs = _mask_attributes(found) if found is not None else None
        if attrs is not None and _replace(graph, found, attrs):
            replaced += 1
    if replaced:
        eliminate_dead_code(graph)
    return replaced


# -- recognizing the ops --------------------------------------------------------------
def _single_use(value: Value) -> bool:
    return len(value.uses) == 1 and not any(o is value for o in value.graph.outputs)


def _scalar(value: Value) -> float | None:
    if value.is_literal and value.type.static_numel == 1:
        return float(value.tensor().reshape(()))
    return None


def _positional(value: Value, seen: dict[int, bool]) -> bool:
    """Whether ``value`` is computed from constants and shape symbols alone."""
    if id(value) not in seen:
        node = value.producer
        seen[id(value)] = value.is_constant or (
            node is not None and all(v is None or _positional(v, seen) for v in node.inputs))
    return seen[id(value)]


def _up_to_scores(logits: Value) -> tuple[Value, float, list[Value]] | None:
    """Walk from the logits up to the scores' matmul; return it, the scores' scale and
    the positional terms met."""
    seen: dict[int, bool] = {}
    scale, terms, x = 1.0, [], logits
    while _single_use(x) and x.producer is not None:
        node = x.producer
        inputs = node.inputs
        if node.op == "matmul":
            return x, scale, terms
        if node.op in ("reshape", "cast"):
            x = inputs[0]
        elif node.op in ("mul", "div") and _scalar(inputs[1]) not in (None, 0.0):
            factor = _scalar(inputs[1])
            scale, x = scale * (factor if node.op == "mul" else 1 / factor), inputs[0]
        elif node.op == "mul" and _scalar(inputs[0]) is not None:
            scale, x = scale * _scalar(inputs[0]), inputs[1]
        elif node.op in ("add", "sub") and _positional(inputs[1], seen):
            terms, x = terms + [inputs[1]], inputs[0]
        elif node.op == "add" and _positional(inputs[0], seen):
            terms, x = terms + [inputs[0]], inputs[1]
        elif node.op == "where" and _positional(inputs[0], seen) and _positional(inputs[1], seen):
            terms, x = terms + list(inputs[:2]), inputs[2]
        elif node.op == "where" and _positional(inputs[0], seen) and _positional(inputs[2], seen):
            terms, x = terms + [inputs[0], inputs[2]], inputs[1]
        else:
            return None
    return None


def _down_to_values(probs: Value) -> Value | None:
    """Walk from the probabilities down to their matmul with the values."""
    x = probs
    while _single_use(x):
        user = x.users[0]
        if user.op == "matmul" and user.inputs[0] is x:
            return user.results[0]
        if user.op not in ("reshape", "cast"):
            return None
        x = user.results[0]
    return None


def _heads(x: Value) -> Value | None:
    """``x`` as [batch, heads, seq, dim]: itself, or what a reshape to [batch * heads, seq, dim] merged."""
    if x.type.rank == 4:
        return x
    node = x.producer
    if x.type.rank == 3 and node is not None and node.op == "reshape" and node.inputs[0].type.rank == 4:
        b, h, s, d = node.inputs[0].shape
        if dims_equal(x.shape[0], b * h) and dims_equal(x.shape[1], s) and dims_equal(x.shape[2], d):
            return node.inputs[0]
    return None


def _find(logits: Value, probs: Value) -> _Attention | None:
    up = _up_to_scores(logits)
    out = _down_to_values(probs)
    if up is None or out is None:
        return None
    scores, scale, terms = up
    queries, keys_t = scores.producer.inputs
    transpose = keys_t.producer
    if transpose is None or transpose.op != "transpose" or not _single_use(keys_t):
        return None
    if {d % keys_t.type.rank for d in (transpose.attrs["dim0"], transpose.attrs["dim1"])} != \
            {keys_t.type.rank - 1, keys_t.type.rank - 2}:
        return None
    q, k, v = _heads(queries), _heads(transpose.inputs[0]), _heads(out.producer.inputs[1])
    if q is None or k is None or v is None or out.dtype != q.dtype:
        return None
    return _Attention(q, k, v, scores, logits, out, scale, terms)


def _masked(node) -> _Attention | None:
    """An ``attention`` op with a positional mask operand (an SDPA call with the mask a model
    built): the mask may be an attribute instead."""
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    if mask is None or any(node.attrs[a] is not None for a in ("sliding_window", "alibi_bias_max", "chunk_size")):
        return None
    if not _positional(mask, {}):
        return None
    q, k, v = node.inputs[:3]
    return _Attention(q, k, v, None, mask, node.results[0], node.attrs["scale"], [mask], node.attrs["softcap"])


# -- what the positional terms mean -------------------------------------------------------
def _evaluate(value: Value, env: dict, zero: Value | None, memo: dict[int, torch.Tensor]) -> torch.Tensor:
    """``value`` at the symbol sizes ``env``, with ``zero`` (if any) taken as zeros."""
    if id(value) in memo:
        return memo[id(value)]
    if value is zero:
        tensor = torch.zeros(evaluate_shape(value.shape, env), dtype=value.dtype.torch_dtype)
    elif value.is_constant:
        tensor = value.tensor()
    else:
        node = value.producer
        operands = node.opdef.structure([None if v is None else _evaluate(v, env, zero, memo) for v in node.inputs])
        kinds = {name: attr.kind for name, attr in node.opdef.attrs.items()}
        attrs = {name: evaluate_dim(a, env) if kinds[name] == "dim" and a is not None
                 else evaluate_shape(a, env) if kinds[name] == "dims" and a is not None else a
                 for name, a in node.attrs.items()}
        out = node.opdef.reference(*operands, **attrs)
        tensor = out[value.result_index] if isinstance(out, tuple) else out
    memo[id(value)] = tensor
    return tensor


def _lengths(terms: list[Value]) -> list[int]:
    """The sequence lengths to check at: ``LENGTHS`` and one past every integer constant
    among the terms' inputs (at most ``LONGEST``)."""
    lengths, stack, seen = set(LENGTHS), list(terms), set()
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if value.is_constant:
            if value.is_literal and not value.dtype.is_float and value.type.static_numel == 1:
                lengths.add(min(abs(int(value.tensor())) + 2, LONGEST))
        elif value.producer is not None:
            stack += [v for v in value.producer.inputs if v is not None]
    return sorted(lengths)


def _slopes(bias: torch.Tensor) -> torch.Tensor | None:
    """Per-head slopes if ``bias`` [batch, heads, n, n] is causal with linear biases."""
    n = bias.shape[-1]
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    if not bool((bias[..., future] <= MASKED).all()):
        return None
    past = bias[..., ~future]
    if not bool(torch.isfinite(past).all()) or bool((past <= MASKED).any()):
        return None
    relative = (bias - bias.diagonal(dim1=-2, dim2=-1)[..., None]).double()
    slopes = relative[..., -1, 0] / -(n - 1)  # [batch, heads]
    distance = (torch.arange(n)[None, :] - torch.arange(n)[:, None]).double()
    expected = slopes[..., None, None] * distance
    tolerance = 1e-5 * max(1.0, float(past.abs().max()))
    if not torch.allclose(relative[..., ~future], expected[..., ~future], rtol=1e-4, atol=tolerance):
        return None
    if not torch.allclose(slopes, slopes[:1].expand_as(slopes), rtol=1e-5, atol=1e-7):
        return None
    return slopes[0]


def _alibi_bias_max(slopes: torch.Tensor) -> float | None:
    """The maximum bias m for which ``alibi_slopes(heads, m)`` gives ``slopes``, if any."""
    heads = slopes.shape[0]
    if not 0 < float(slopes[0]) < 1:
        return None
    p = 2 ** math.floor(math.log2(heads))
    bias_max = -p * math.log2(float(slopes[0]))
    matches = torch.allclose(alibi_slopes(heads, bias_max).double(), slopes, rtol=1e-4, atol=0)
    return round(bias_max, 6) if matches else None


def _mask_attributes(found: _Attention) -> dict | None:
    """The ``attention`` attributes that the positional terms amount to, or None."""
    shape = found.frame
    seq = shape[-1]
    if not isinstance(seq, sympy.Symbol) or not dims_equal(shape[-2], seq):
        return None
    symbols = set().union(*(d.free_symbols for d in shape if isinstance(d, sympy.Expr)))
    heads = found.q.shape[1]
    slopes = None
    for n in _lengths(found.terms):
        env = {s: (n if s == seq else 2) for s in symbols}
        try:
            logits = _evaluate(found.logits, env, found.scores, {})
            if logits.dtype == torch.bool:
                logits = torch.zeros(logits.shape).masked_fill(~logits, float("-inf"))
            bias = logits.float().broadcast_to(evaluate_shape(shape, env)).reshape(-1, heads, n, n)
        except (RuntimeError, ShapeError, ValueError, KeyError, TypeError):
            return None
        found_slopes = _slopes(bias)
        if found_slopes is None or (slopes is not None and not torch.allclose(found_slopes, slopes)):
            return None
        slopes = found_slopes
    if bool((slopes == 0).all()):
        return {"alibi_bias_max": None}
    bias_max = _alibi_bias_max(slopes)
    return None if bias_max is None else {"alibi_bias_max": bias_max}


def _replace(graph: Graph, found: _Attention, attrs: dict) -> bool:
    try:
        with graph.inserting_before(found.out.producer):
            attention = ops.attention(found.q, found.k, found.v, scale=found.scale, causal=True,
                                      softcap=found.softcap, **attrs)
            out = attention if attention.type.equivalent(found.out.type) else \
                ops.reshape(attention, shape=found.out.shape)
    except ShapeError:
        return False
    for value in {id(v): v for v in (attention, out)}.values():
        value.producer.location = found.out.producer.location
    found.out.replace_all_uses_with(out)
    return True
