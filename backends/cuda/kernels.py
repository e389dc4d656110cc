"""The CUDA backend's kernel table: Triton kernels for the fused ops, paged attention and
mixtures of experts,
cuBLAS GEMMs (``torch.nn.functional.linear``; a Triton GEMV for the one-row shapes where
tuning measured it faster), the quantized linear layers (``quantized.py``) and torch's own CUDA kernels
for the remaining ops (views, casts, gathers), each called as the executor calls a
registry op. Launch parameters tuned at build time come in as plain dicts."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch

from ..reference import Kernel, reference_kernels
from . import activations, attention, gemv, int8_mm, moe, norms, quantized, rotary

# op -> (launcher, its configuration: a dataclass, or None where the stored dict is it)
LAUNCHERS: dict[str, tuple[Callable[..., Any], type | None]] = {
    "rms_norm": (norms.rms_norm, norms.NormConfig),
    "add_rms_norm": (norms.add_rms_norm, norms.NormConfig),
    "add_layer_norm": (norms.add_layer_norm, norms.NormConfig),
    "gated_activation": (activations.gated_activation, activations.GatedConfig),
    "qkv_rotary": (rotary.qkv_rotary, rotary.RotaryConfig),
    "paged_attention": (attention.paged_attention, attention.AttentionConfig),
    "linear": (gemv.linear, None),  # weight shape -> GEMV parameters, where the GEMV beat cuBLAS
    "moe": (moe.moe, moe.MoeConfig),
    "moe_experts": (moe.moe_experts, moe.MoeConfig),
    "linear_int8": (quantized.linear_int8, quantized.QuantLinearConfig),
    "linear_int4": (quantized.linear_int4, quantized.QuantLinearConfig),
    "linear_fp8": (quantized.linear_fp8, None),  # torch._scaled_mm, nothing to tune
    "linear_w8a8": (int8_mm.linear_w8a8, None),  # torch._int_mm, nothing to tune
}


def cuda_kernels(device: torch.device | str, configs: Mapping[str, dict] | None = None) -> dict[str, Kernel]:
    """Every op's kernel on ``device``, with the launch parameters in ``configs`` (op ->
    the fields of its configuration) where given."""
    kernels = reference_kernels(device)
    for op, (launcher, config_type) in LAUNCHERS.items():
        fields = (configs or {}).get(op)
        if not fields:
            kernels[op] = launcher
        else:
            kernels[op] = partial(launcher, config=fields if config_type is None else
                                  config_from_dict(config_type, fields))
    return kernels


def config_from_dict(config_type: type, fields: Mapping[str, Any]):
    """A configuration dataclass from its fields as stored (nested dataclasses too)."""
    hints = typing.get_type_hints(config_type)
    values = {}
    for f in dataclasses.fields(config_type):
        if f.name in fields:
            value = fields[f.name]
            values[f.name] = config_from_dict(hints[f.name], value) if dataclasses.is_dataclass(hints[f.name]) \
                else value
    return config_type(**values)
