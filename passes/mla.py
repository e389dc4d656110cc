"""Raising multi-head latent attention (DeepSeek-V2/V3): the decompression of keys and
values that export leaves in front of ``attention`` becomes one ``mla_attention``.

transformers computes ``kv = kv_b_proj(latent)`` over the one-head latent ``[batch, 1, seq,
rank]``, cuts it into heads, splits each head into its unrotated key part and its value, and
concatenates the key part with the shared rotated key expanded over the heads. The rule
matches exactly that, with a constant ``kv_b``, and keeps the latent and the rotated key
as ``mla_attention``'s operands, so that the paged cache can hold them instead of the
decompressed keys and values (``passes/paged.py``).
"""

from __future__ import annotations

from ..ir import ops
from ..ir.shapes import shapes_equal
from .pattern import Match
from .rewriter import Rule


def _decompressed_attention(q, latent, k_rope, kv_b, heads_shape: tuple, nope: int, v_dim: int,
                            expanded: tuple, scale: float, split_dim: int, concat_dim: int):
    kv = ops.transpose(ops.reshape(ops.linear(latent, kv_b), shape=heads_shape), dim0=1, dim1=2)
    k_nope, values = ops.split(kv, dim=split_dim, sizes=(nope, v_dim))
    keys = ops.concat([k_nope, ops.expand(k_rope, shape=expanded)], dim=concat_dim)
    return ops.attention(q, keys, values, scale=scale, causal=True)


def _latent_attention(q, latent, k_rope, kv_b, scale):
    return ops.mla_attention(q, latent, k_rope, kv_b, scale=scale)


def _one_latent_head(m: Match) -> bool:
    """The latent and the rotated key are one head each, ``kv_b`` is a weight, the
    decompressed features are cut into the query's heads (``[batch, seq, heads, nope +
    v_dim]``), and the keys are split and joined along their features."""
    latent, k_rope, q = m["latent"].type, m["k_rope"].type, m["q"].type
    if not (m["kv_b"].is_constant and latent.rank == 4 and k_rope.rank == 4 and q.rank == 4
            and latent.shape[1] == 1 and k_rope.shape[1] == 1 and m["split_dim"] in (-1, 3)
            and m["concat_dim"] in (-1, 3)):
        return False
    cut = next(n for n in m.nodes.values() if n.op == "reshape").results[0].type
    batch, heads, seq, _ = q.shape
    return cut.rank == 4 and shapes_equal(cut.shape, (batch, seq, heads, m["nope"] + m["v_dim"]))


MLA_RULES = [Rule(_decompressed_attention, _latent_attention, when=_one_latent_head, name="raise_mla")]
