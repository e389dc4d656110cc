"""GPTQ (Frantar et al., 2022): INT4 weights that minimize a layer's output error on
calibration inputs, one column at a time, the error of each quantized column spread over
the columns not yet quantized through the inverse Hessian ``H = 2 X^T X / n``.

As the reference implementation does: columns that no input reached are zeroed; ``H``
is dampened by ``damp`` times its mean diagonal; the upper Cholesky factor of ``H^-1``
drives the updates; the updates are applied lazily, a block of columns at a time. With
``act_order`` the columns are taken in order of decreasing ``diag(H)``; the groups'
scales and zero points are then fixed from the original weight before any update
("static groups", as GPTQModel does), so the result keeps ``linear_int4``'s contiguous
groups along the original column order. Without it, each group's scale and zero point
come from its columns as updated when the group's first column is reached.
"""

from __future__ import annotations

import torch

from .weights import int4_codes, int4_group_params, pack_int4_codes

BLOCK = 128  # columns per lazy batch update


def gptq_quantize_int4(weight: torch.Tensor, hessian: torch.Tensor, group: int, symmetric: bool,
                       act_order: bool = False, damp: float = 0.01) -> tuple[torch.Tensor, ...]:
    """``linear_int4``'s operands (packed codes, scales in the weight's dtype, zero points)
    for ``weight`` ``[out, in]``, given its inputs' Hessian ``[in, in]``."""
    out_features, in_features = weight.shape
    if in_features % group or group % 2:
        raise ValueError(f"INT4 groups of {group} do not divide {in_features} input features evenly")
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"the Hessian {tuple(hessian.shape)} does not match the weight {tuple(weight.shape)}")
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    scales = torch.empty(out_features, in_features // group, dtype=weight.dtype)
    zeros = torch.empty(out_features, in_features // group)
    if act_order:
        scales[:], zeros[:] = int4_group_params(w.view(out_features, -1, group), symmetric, weight.dtype)
        order = torch.argsort(torch.diag(h), descending=True)
    else:
        order = torch.arange(in_features)
    w, h = w[:, order], h[order][:, order]
    h_inv = _inverse_cholesky(h, damp)
    codes = torch.empty(out_features, in_features, dtype=torch.uint8)
    # a block holds whole groups, so a group's parameters come from columns already updated
    block = group * max(1, BLOCK // group)
    for start in range(0, in_features, block):
        end = min(start + block, in_features)
        w_block, errors, h_block = w[:, start:end].clone(), torch.zeros(out_features, end - start), \
            h_inv[start:end, start:end]
        for i in range(end - start):
            column = int(order[start + i])
            g = column // group
            if not act_order and (start + i) % group == 0:
                scales[:, g], zeros[:, g] = int4_group_params(w_block[:, i:i + group], symmetric, weight.dtype)
            q = int4_codes(w_block[:, i], scales[:, g], zeros[:, g])
            codes[:, start + i] = q
            error = (w_block[:, i] - (q.float() - zeros[:, g]) * scales[:, g].float()) / h_block[i, i]
            w_block[:, i:] -= error[:, None] * h_block[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    codes = codes[:, torch.argsort(order)]
    return pack_int4_codes(codes), scales, zeros.to(torch.uint8)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of the dampened ``h``'s inverse."""
    h = h + damp * torch.diag(h).mean() * torch.eye(h.shape[0])
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
