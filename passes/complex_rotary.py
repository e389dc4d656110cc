"""Raising rotary embedding written as a complex product: ``view_as_real(view_as_complex(x)
* freqs)`` (Llama 4, DeepSeek-V2) becomes an interleaved ``rotary``.

The frontend holds complex tensors as real pairs (``frontends/complex.py``): ``x`` cut into
``[..., n, 2]`` pairs, each pair multiplied by the pair ``(c, s)`` of a rotation factor
``c + is`` along the same last dim, the parts concatenated and flattened back:

    (a, b) * (c, s) = (a c - b s, a s + b c)

which is ``rotary(x, cos, sin, interleaved=True)`` with each factor's real part repeated over
its pair as ``cos`` and its imaginary part as ``sin``: interleaved rotary turns each
``(x[2i], x[2i+1])`` into ``(x[2i] cos - x[2i+1] sin, x[2i+1] cos + x[2i] sin)``, the same
products and sums. Any factors whose parts broadcast onto ``x``'s pairs match (``torch.polar``
of the angles, scaled or not); common-subexpression elimination shares the repeated parts
between q and k.
"""

from __future__ import annotations

from ..ir import ops
from ..ir.shapes import dims_equal
from .pattern import AttrVar, Match
from .rewriter import Rule


def _product_of_pairs(x, cos, sin, pairs: tuple, flat: tuple):
    """The complex product as the frontend writes it, back to ``x``'s layout; ``cos`` and
    ``sin`` are the factors' parts (slices of their pairs, shared by the products of q and k)."""
    a = ops.reshape(x, shape=pairs)
    last = AttrVar("last")
    ar, ai = ops.slice(a, dim=last, start=0, end=1), ops.slice(a, dim=last, start=1, end=2)
    real = ops.sub(ops.mul(ar, cos), ops.mul(ai, sin))
    imag = ops.add(ops.mul(ar, sin), ops.mul(ai, cos))
    return ops.reshape(ops.concat([real, imag], dim=last), shape=flat)


def _repeated_over_pairs(part):
    """One part of each factor, repeated over its pair: ``[..., n, 1] -> [..., 2 n]``."""
    both = ops.expand(part, shape=(*part.shape[:-1], 2))
    return ops.reshape(both, shape=(*part.shape[:-2], 2 * part.shape[-2]))


def _interleaved_rotary(x, cos, sin, pairs: tuple, flat: tuple):
    return ops.rotary(ops.reshape(x, shape=flat), _repeated_over_pairs(cos), _repeated_over_pairs(sin),
                      interleaved=True)


def _rotates_pairs(m: Match) -> bool:
    """The pairs are the last dim (of size 2) of ``x``'s reshape; the factors' parts have its
    rank, one static factor per pair and broadcast onto the pairs (the product has their
    shape); the result flattens each pair back into the last dim."""
    pairs = next(n.results[0].type for n in m.nodes.values() if n.op == "reshape" and n.inputs[0] is m["x"])
    product, cos, sin, out = m.outputs[0].producer.inputs[0].type, m["cos"].type, m["sin"].type, m.outputs[0].type
    rank = pairs.rank
    if m["last"] not in (-1, rank - 1) or pairs.shape[-1] != 2 or not cos.equivalent(sin) or cos.rank != rank:
        return False
    if cos.shape[-1] != 1 or not isinstance(cos.shape[-2], int) or not product.equivalent(pairs):
        return False
    return out.rank == rank - 1 and all(dims_equal(p, q) for p, q in zip(out.shape, pairs.shape[:-2]))


COMPLEX_ROTARY_RULES = [Rule(_product_of_pairs, _interleaved_rotary, when=_rotates_pairs,
                             name="raise_complex_rotary")]
