"""The CUDA backend's kernel table: Triton kernels for the fused ops, paged attention,
multi-head latent attention and mixtures of experts,
cuBLAS GEMMs (``torch.nn.functional.linear``; a Triton GEMV for the one-row shapes where
tuning measured it faster), the quantized linear layers (``quantized.py``) and torch's own CUDA kernels
for the remaining ops (views, casts, gathers), each called as the executor calls a
registry op. Launch parameters tuned at build time come in as plain dicts."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch

from ..reference import Kernel, reference_kernels
from . import activations, attention, gemv, int8_mm, mla_attention, moe, norms, quantized, rotary
from .configs import config_from_dict

# op -> (launcher, what its stored configuration becomes: a dataclass, a function of the
# stored dict, or None where the stored dict is passed as it is)
LAUNCHERS: dict[str, tuple[Callable[..., Any], type | Callable[[Mapping], Any] | None]] = {
    "rms_norm": (norms.rms_norm, norms.NormConfig),
    "add_rms_norm": (norms.add_rms_norm, norms.NormConfig),
    "add_layer_norm": (norms.add_layer_norm, norms.NormConfig),
    "gated_activation": (activations.gated_activation, activations.GatedConfig),
    "qkv_rotary": (rotary.qkv_rotary, rotary.RotaryConfig),
    "paged_attention": (attention.paged_attention, attention.AttentionConfig),
    "paged_mla_attention": (mla_attention.paged_mla_attention, mla_attention.MlaConfig),
    "linear": (gemv.linear, None),  # weight shape -> GEMV parameters, where the GEMV beat cuBLAS
    "moe": (moe.moe, moe.MoeConfig),
    "moe_experts": (moe.moe_experts, moe.MoeConfig),
    "linear_int8": (quantized.linear_int8, quantized.per_shape),  # weight shape -> QuantLinearConfig
    "linear_int4": (quantized.linear_int4, quantized.per_shape),
    "linear_fp8": (quantized.linear_fp8, quantized.per_shape),
    "linear_w8a8": (int8_mm.linear_w8a8, None),  # torch._int_mm, nothing to tune
}


def cuda_kernels(device: torch.device | str, configs: Mapping[str, dict] | None = None) -> dict[str, Kernel]:
    """Every op's kernel on ``device``, with the launch parameters in ``configs`` (op ->
    the fields of its configuration) where given."""
    kernels = reference_kernels(device)
    for op, (launcher, parse) in LAUNCHERS.items():
        fields = (configs or {}).get(op)
        if not fields:
            kernels[op] = launcher
        elif parse is None:
            kernels[op] = partial(launcher, config=fields)
        elif isinstance(parse, type):
            kernels[op] = partial(launcher, config=config_from_dict(parse, fields))
        else:
            kernels[op] = partial(launcher, config=parse(fields))
    return kernels
