"""Experts as one traced op: the ``kiln::experts`` torch custom op, and its registration as
an experts implementation of ``transformers`` (``ExpertsInterface``).

transformers' own experts implementations sort tokens by expert with data-dependent
shapes (``histc``, ``nonzero``, a loop over the experts hit) that export cannot keep.
Exported through this one, a mixture-of-experts layer's experts arrive as a single node
over the stacked weights, after the router's ops; the ``raise`` pass then folds the router
into a ``moe`` op. Its eager implementation is kiln's reference.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ir.opdefs.moe import moe_experts_reference
from .errors import FrontendError

IMPLEMENTATION = "kiln"


@torch.library.custom_op("kiln::experts", mutates_args=())
def experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, gate_up: torch.Tensor,
            down: torch.Tensor, activation: str) -> torch.Tensor:
    """Each token of x [tokens, hidden] through its experts, summed with its routing weights."""
    return moe_experts_reference(x, weights, indices, gate_up, down, activation)


@experts.register_fake
def _(x, weights, indices, gate_up, down, activation):
    return torch.empty_like(x)


def _activation(module: nn.Module) -> str:
    from transformers.activations import GELUActivation, GELUTanh, NewGELUActivation, SiLUActivation

    kinds = {SiLUActivation: "silu", nn.SiLU: "silu", GELUActivation: "gelu", GELUTanh: "gelu_tanh",
             NewGELUActivation: "gelu_tanh"}
    act = kinds.get(type(module.act_fn))
    if act is None:
        raise FrontendError(f"{type(module).__name__}: experts with activation {type(module.act_fn).__name__} "
                            "are not supported yet")
    return act


def _transformers_experts(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    from transformers.integrations.moe import _default_apply_gate

    unsupported = [what for what, present in (
        ("biases", module.has_bias), ("transposed weights", module.is_transposed),
        ("interleaved gate/up rows", not module.is_concatenated), ("no gate", not module.has_gate),
        ("a norm after each expert", getattr(module, "has_post_expert_norm", False)),  # newer transformers only
        ("a custom gate", type(module)._apply_gate is not _default_apply_gate)) if present]
    if unsupported:
        raise FrontendError(f"{type(module).__name__}: experts with {', '.join(unsupported)} are not supported yet")
    return torch.ops.kiln.experts(hidden_states, top_k_weights, top_k_index, module.gate_up_proj, module.down_proj,
                                  _activation(module))


def register_with_transformers() -> str:
    """Make ``experts_implementation="kiln"`` available to transformers (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _transformers_experts)
    return IMPLEMENTATION
