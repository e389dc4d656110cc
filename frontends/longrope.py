"""PhiMoE's long-rope rotary embedding, made static for export.

transformers' ``PhimoeRotaryEmbedding`` with ``rope_type="longrope"`` computes its
frequencies from the ``short_factor`` (it never passes a sequence length to the rope
function), and scales cos and sin by ``short_mscale`` or ``long_mscale`` according as the
largest position in the batch is within ``original_max_position_embeddings`` or not: a
Python branch on a tensor, which torch.export cannot trace, and a choice that depends on
what else is in a batch, which a paged engine cannot follow.

For an engine whose ``max_seq_len`` is within ``original_max_position_embeddings`` no
position ever passes it, so the branch always takes ``short_mscale``; where the two scales
are equal the branch does not matter at any length. In both cases, while exporting, each
such module computes exactly what transformers does, without the branch. A longer
``max_seq_len`` with two different scales is refused by name.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .errors import FrontendError


def _short_forward(rotary: nn.Module):
    """transformers' forward for positions within the original context: the short factors'
    frequencies (``original_inv_freq``, which transformers' dynamic update never overwrites,
    unlike ``inv_freq``), ``short_mscale``."""
    mscale = rotary.config.rope_parameters["short_mscale"]

    def forward(x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * rotary.original_inv_freq.to(device=x.device, dtype=torch.float)
        angles = torch.cat((freqs, freqs), dim=-1)
        return (angles.cos() * mscale).to(x.dtype), (angles.sin() * mscale).to(x.dtype)

    return forward


@contextmanager
def static_longrope(model: nn.Module, max_seq_len: int) -> Iterator[None]:
    """While exporting ``model``, its PhiMoE long-rope modules compute the rotary of an
    engine of ``max_seq_len`` without a data-dependent branch."""
    from transformers.models.phimoe.modeling_phimoe import PhimoeRotaryEmbedding

    patched = [m for m in model.modules() if isinstance(m, PhimoeRotaryEmbedding) and m.rope_type == "longrope"]
    for module in patched:
        rope = module.config.rope_parameters
        original: Any = rope["original_max_position_embeddings"]
        if max_seq_len > original and rope["long_mscale"] != rope["short_mscale"]:
            raise FrontendError(f"max_seq_len {max_seq_len} exceeds this PhiMoE's original_max_position_embeddings "
                                f"{original}: beyond it, transformers' longrope scales by long_mscale whenever the "
                                f"longest position in a batch passes {original}, which depends on the rest of the "
                                f"batch; compile with max_seq_len <= {original} (or equal short and long mscale)")
    for module in patched:
        module.forward = _short_forward(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
