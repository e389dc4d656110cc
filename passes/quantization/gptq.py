"""GPTQ (Frantar et al., 2022): INT4 weights that minimize a layer's output error on
calibration inputs, one column at a time, the error of each quantized column spread over
the columns not yet quantized through the inverse Hessian ``H = 2 X^T X / n``.

As the reference implementation does: columns that no input reached are zeroed; ``H``
is dampened by ``damp`` times its mean diagonal (ten and a hundred times that where it
does not factor); the upper Cholesky factor of ``H^-1``
drives the updates; the updates are applied lazily, a block of columns at a time. With
``act_order`` the columns are taken in order of decreasing ``diag(H)``; the groups'
scales and zero points are then fixed from the original weight before any update
("static groups", as GPTQModel does), so the result keeps ``linear_int4``'s contiguous
groups along the original column order. Without it, each group's scale and zero point
come from its columns as updated when the group's first column is reached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .weights import int4_codes, int4_group_params, pack_int4_codes

BLOCK = 128  # columns per lazy batch update
DAMP_RETRIES = 3  # dampening tried: damp, 10 damp, 100 damp


@dataclass(frozen=True)
class HessianFactor:
    """What GPTQ needs of one input's Hessian, shared by the layers that read the input:
    the column order, the columns no input reached, and the upper Cholesky factor of the
    dampened, reordered Hessian's inverse."""

    order: torch.Tensor
    dead: torch.Tensor
    inverse: torch.Tensor

    @classmethod
    def of(cls, hessian: torch.Tensor, act_order: bool = False, damp: float = 0.01) -> HessianFactor:
        h = hessian.detach().float().clone()
        dead = torch.diag(h) == 0
        h[dead, dead] = 1
        order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(h.shape[0])
        h = h[order][:, order]
        for attempt in range(DAMP_RETRIES):  # a Hessian of few rows may need more dampening to factor
            dampened = h + damp * 10 ** attempt * torch.diag(h).mean() * torch.eye(h.shape[0])
            lower, info = torch.linalg.cholesky_ex(dampened)
            if not info:
                inverse = torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
                return cls(order, dead, inverse)
        raise ValueError(f"the calibration Hessian is not positive definite even dampened by "
                         f"{damp * 10 ** (DAMP_RETRIES - 1)} of its mean diagonal: calibrate on more text")

    @property
    def act_order(self) -> bool:
        return not torch.equal(self.order, torch.arange(len(self.order)))


def gptq_quantize_int4(weight: torch.Tensor, hessian: torch.Tensor | HessianFactor, group: int, symmetric: bool,
                       act_order: bool = False, damp: float = 0.01) -> tuple[torch.Tensor, ...]:
    """``linear_int4``'s operands (packed codes, scales in the weight's dtype, zero points)
    for ``weight`` ``[out, in]``, given its inputs' Hessian ``[in, in]`` (or its
    ``HessianFactor``, which then fixes the order and dampening)."""
    out_features, in_features = weight.shape
    if in_features % group or group % 2:
        raise ValueError(f"INT4 groups of {group} do not divide {in_features} input features evenly")
    factor = hessian if isinstance(hessian, HessianFactor) else HessianFactor.of(hessian, act_order, damp)
    if factor.inverse.shape != (in_features, in_features):
        raise ValueError(f"the Hessian {tuple(factor.inverse.shape)} does not match the weight {tuple(weight.shape)}")
    static_groups = factor.act_order
    w = weight.detach().float().clone()
    w[:, factor.dead] = 0
    scales = torch.empty(out_features, in_features // group, dtype=weight.dtype)
    zeros = torch.empty(out_features, in_features // group)
    if static_groups:
        scales[:], zeros[:] = int4_group_params(w.view(out_features, -1, group), symmetric, weight.dtype)
    order, h_inv = factor.order, factor.inverse
    w = w[:, order]
    codes = torch.empty(out_features, in_features, dtype=torch.uint8)
    # a block holds whole groups, so a group's parameters come from columns already updated
    block = group * max(1, BLOCK // group)
    for start in range(0, in_features, block):
        end = min(start + block, in_features)
        w_block, errors, h_block = w[:, start:end].clone(), torch.zeros(out_features, end - start), \
            h_inv[start:end, start:end]
        for i in range(end - start):
            g = int(order[start + i]) // group
            if not static_groups and (start + i) % group == 0:
                scales[:, g], zeros[:, g] = int4_group_params(w_block[:, i:i + group], symmetric, weight.dtype)
            q = int4_codes(w_block[:, i], scales[:, g], zeros[:, g])
            codes[:, start + i] = q
            error = (w_block[:, i] - (q.float() - zeros[:, g]) * scales[:, g].float()) / h_block[i, i]
            w_block[:, i:] -= error[:, None] * h_block[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    codes = codes[:, torch.argsort(order)]
    return pack_int4_codes(codes), scales, zeros.to(torch.uint8)
