"""Raising rotary embedding written as complex multiplication (DeepSeek-V2's
``view_as_complex(x) * freqs_cis``) into kiln's interleaved ``rotary``.

The frontend holds a complex tensor as real ``[..., 2]`` pairs and writes a complex product
out on the parts (``frontends/complex.py``): for ``x`` viewed as pairs ``(re, im)`` and a
table of ``cos`` and ``sin`` (the parts of ``freqs_cis``, angles ``[..., rope / 2]``),

    (re cos - im sin, re sin + im cos)

stacked back into pairs. That is rotary over interleaved feature pairs ``(x0, x1), (x2,
x3), ...``, so the rule makes one ``rotary {interleaved}`` of ``x`` flattened to ``[...,
rope]``, its tables repeated for both features of each pair (kiln's interleaved ``rotary``
takes one cos and one sin per feature). The scale transformers folds into ``freqs_cis``
(``attention_scaling``) stays in the tables.
"""

from __future__ import annotations

from ..ir import ops
from ..ir.shapes import dims_equal
from .pattern import Match
from .rewriter import Rule


def _part(pairs, index: int, dim: int):
    return ops.squeeze(ops.slice(pairs, dim=dim, start=index, end=index + 1), dim=dim)


def _complex_product(x, cos, sin, part_dim: int, pair_dim: int):
    re, im = _part(x, 0, part_dim), _part(x, 1, part_dim)
    turned_re = ops.sub(ops.mul(re, cos), ops.mul(im, sin))
    turned_im = ops.add(ops.mul(re, sin), ops.mul(im, cos))
    return ops.concat([ops.unsqueeze(turned_re, dim=pair_dim), ops.unsqueeze(turned_im, dim=pair_dim)],
                      dim=pair_dim)


def _per_feature(table):
    """An angle table ``[..., n]`` as ``[..., 2 n]``, each angle's value for both features of its pair."""
    shape = table.shape
    doubled = ops.expand(ops.unsqueeze(table, dim=len(shape)), shape=(*shape, 2))
    return ops.reshape(doubled, shape=(*shape[:-1], shape[-1] * 2))


def _interleaved_rotary(x, cos, sin):
    *outer, half, _ = x.shape
    flat = ops.reshape(x, shape=(*outer, half * 2))
    turned = ops.rotary(flat, _per_feature(cos), _per_feature(sin), interleaved=True)
    return ops.reshape(turned, shape=tuple(x.shape))


def _pairs_over_the_last_dim(m: Match) -> bool:
    """``x`` is ``[..., n, 2]`` pairs cut along their last dim and joined back along it, and
    the tables are ``[..., n]`` (one angle per pair, static)."""
    x, cos, sin = m["x"].type, m["cos"].type, m["sin"].type
    last = x.rank - 1
    if x.rank < 2 or x.shape[-1] != 2 or m["part_dim"] not in (-1, last) or m["pair_dim"] not in (-1, last):
        return False
    half = x.shape[-2]
    return isinstance(half, int) and cos.rank >= 1 and dims_equal(cos.shape[-1], half) \
        and cos.shape == sin.shape and cos.dtype == x.dtype == sin.dtype


COMPLEX_ROTARY_RULES = [Rule(_complex_product, _interleaved_rotary, when=_pairs_over_the_last_dim,
                             name="raise_complex_rotary")]
