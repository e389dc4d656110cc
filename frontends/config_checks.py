"""Config values that kiln refuses by name before building a model, where transformers
would fail in the middle of its forward, silently ignore the value, or compute something
that a paged engine cannot reproduce.

Each check is a function of the config that returns the problems it finds; ``CHECKS``
lists them by ``model_type``. ``check_config`` raises one ``FrontendError`` naming them all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import FrontendError

TOPK_METHODS = ("greedy", "group_limited_greedy")


def _deepseek_v2(config: Any) -> list[str]:
    problems = []
    method = getattr(config, "topk_method", "greedy")
    if method not in TOPK_METHODS:
        problems.append(f"topk_method={method!r} (transformers' DeepSeek-V2 router knows {', '.join(TOPK_METHODS)})")
    elif method == "group_limited_greedy":
        experts, groups, kept = config.n_routed_experts, config.n_group, config.topk_group
        if not (isinstance(groups, int) and isinstance(kept, int) and groups >= 1 and experts % groups == 0
                and 1 <= kept <= groups):
            problems.append(f"topk_method='group_limited_greedy' with n_group={groups!r} and topk_group={kept!r} "
                            f"(needs n_group dividing n_routed_experts={experts} and 1 <= topk_group <= n_group)")
    if getattr(config, "norm_topk_prob", False):
        problems.append("norm_topk_prob=True (transformers' DeepSeek-V2 router ignores it, while DeepSeek's own "
                        "code renormalizes: kiln would have to pick one)")
    return problems


def _phimoe(config: Any) -> list[str]:
    problems = []
    if config.num_experts_per_tok != 2:
        problems.append(f"num_experts_per_tok={config.num_experts_per_tok} (PhiMoE's sparsemixer always routes to "
                        "2 experts, whatever the config says)")
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in ("default", "longrope"):
        problems.append(f"rope_parameters rope_type={rope_type!r} (PhiMoE's rotary picks its scale by the "
                        "largest position in the batch, a data-dependent branch that torch.export cannot trace; "
                        "kiln takes default and longrope, see frontends/longrope.py)")
    return problems


CHECKS: dict[str, Callable[[Any], list[str]]] = {"deepseek_v2": _deepseek_v2, "phimoe": _phimoe}


def check_config(config: Any) -> None:
    """Raise a ``FrontendError`` naming every config value of ``config`` that kiln refuses."""
    check = CHECKS.get(getattr(config, "model_type", None))
    problems = check(config) if check else []
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise FrontendError(f"kiln does not support this {config.model_type} config yet:\n{listing}")
