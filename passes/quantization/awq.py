"""AWQ (Lin et al., 2023): INT4 weights whose salient input channels, those with large
activations, are scaled up before round-to-nearest and their inputs scaled down by the
same factors, so that the channels that matter lose less to rounding.

``search_scales`` tries ``s = act_mean^alpha / w_mean^(1 - alpha)`` (AutoAWQ's form, with
``w_mean`` the mean of each input channel's weights relative to their group's largest)
over a grid of ``alpha`` in [0, 1], and keeps the one whose quantized layers' outputs on
the sampled calibration inputs are closest (mean squared error) to the float layers';
``s = 1``, plain round-to-nearest, is a candidate too, so the search never does worse on
its sample. ``search_clipping`` then shrinks each group's range where that lowers the
layer's output error (AutoAWQ's clipping search). Folding ``1 / s`` into the op that
makes the input is ``smoothing.py``'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .weights import int4_codes, int4_group_params

GRID = 20  # values of alpha tried, 0, 1/20, ..., 19/20
CLIP_STEPS = 20  # shrink factors of a group's range tried, 1, 0.975, ..., 0.525
_TINY = 1e-4


def fake_int4(weight: torch.Tensor, group: int, symmetric: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``weight`` rounded to INT4 in groups (scales stored in ``dtype``) and back, float32:
    what ``linear_int4`` computes with, without packing the codes."""
    w = weight.float().view(weight.shape[0], -1, group)
    scale, zero = int4_group_params(w, symmetric, dtype)
    scale, zero = scale.float()[..., None], zero[..., None]
    return ((int4_codes(w, scale, zero).float() - zero) * scale).view(weight.shape)


def search_scales(weights: Sequence[torch.Tensor], absmean: torch.Tensor, sample: torch.Tensor, group: int,
                  symmetric: bool) -> torch.Tensor:
    """The per-input-channel scales (float32 ``[in]``) for the layers of ``weights`` that
    read one input, whose mean absolute value per channel is ``absmean``."""
    w = torch.cat([weight.float() for weight in weights])
    grouped = w.abs().view(w.shape[0], -1, group)
    w_mean = (grouped / (grouped.amax(dim=-1, keepdim=True) + 1e-6)).view_as(w).mean(dim=0)
    reference = sample @ w.T
    best, best_error = torch.ones_like(absmean), _error(sample, w, group, symmetric, reference)
    for alpha in torch.arange(GRID) / GRID:
        scale = (absmean.pow(alpha) / (w_mean.pow(1 - alpha) + _TINY)).clamp(min=_TINY)
        scale = scale / (scale.max() * scale.min()).sqrt()
        error = _error(sample, w, group, symmetric, reference, scale)
        if error < best_error:
            best, best_error = scale, error
    return best


def _error(sample: torch.Tensor, w: torch.Tensor, group: int, symmetric: bool, reference: torch.Tensor,
           scale: torch.Tensor | None = None) -> float:
    quantized = fake_int4(w, group, symmetric) if scale is None else \
        fake_int4(w * scale, group, symmetric) / scale
    return (sample @ quantized.T - reference).pow(2).mean().item()


def search_clipping(weight: torch.Tensor, sample: torch.Tensor, group: int, symmetric: bool) -> torch.Tensor:
    """``weight`` with each (row, group)'s values clipped to the fraction of their largest
    magnitude that quantizes with the least output error on ``sample``."""
    w = weight.float()
    out_features, in_features = w.shape
    x = sample.view(sample.shape[0], in_features // group, group)
    grouped = w.view(out_features, -1, group)
    limit = grouped.abs().amax(dim=-1, keepdim=True)
    best, best_error = grouped, torch.full(limit.shape[:2], torch.inf)
    for step in range(CLIP_STEPS):
        bound = limit * (1 - step / (2 * CLIP_STEPS))
        clipped = torch.maximum(torch.minimum(grouped, bound), -bound)
        diff = fake_int4(clipped.view_as(w), group, symmetric).view_as(grouped) - grouped
        error = torch.einsum("ngk,ogk->ogn", x, diff).pow(2).mean(dim=-1)  # per (row, group)
        better = error < best_error
        best = torch.where(better[..., None], clipped, best)
        best_error = torch.where(better, error, best_error)
    return best.reshape_as(w).to(weight.dtype)
