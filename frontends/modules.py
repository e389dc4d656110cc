"""Plain ``torch.nn.Module``s into kiln graphs, through torch.export."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree

from ..ir import Graph
from .errors import FrontendError
from .torch_export import import_program


@dataclass
class ImportedModule:
    """A module's graph, and how to put its flat outputs back into the module's structure."""

    graph: Graph
    out_spec: Any

    def unflatten(self, outputs: Sequence[torch.Tensor]) -> Any:
        return _pytree.tree_unflatten(list(outputs), self.out_spec)


def _dim_names(module: nn.Module, dynamic_shapes: Any, count: int) -> list[dict[int, str]]:
    """Names of the dynamic dims of each positional input, from torch ``Dim``s."""
    if dynamic_shapes is None:
        return [{} for _ in range(count)]
    if isinstance(dynamic_shapes, Mapping):
        params = list(inspect.signature(module.forward).parameters)
        dynamic_shapes = [dynamic_shapes.get(p) for p in params[:count]]
    names = []
    for spec in dynamic_shapes:
        names.append({axis: getattr(dim, "__name__", f"d{axis}") for axis, dim in (spec or {}).items()})
    return names


def import_module(module: nn.Module, example_inputs: Sequence[torch.Tensor], dynamic_shapes: Any = None,
                  name: str | None = None) -> ImportedModule:
    """Export ``module`` (in eval mode) on ``example_inputs`` and import it.

    ``dynamic_shapes`` is torch.export's: per input, a dict from axis to ``torch.export.Dim``;
    the ``Dim``'s name becomes the kiln symbol.
    """
    example_inputs = tuple(example_inputs)
    if not all(isinstance(x, torch.Tensor) for x in example_inputs):
        raise FrontendError("example_inputs must be a sequence of tensors")
    try:
        with torch.no_grad():
            program = torch.export.export(module.eval(), example_inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # noqa: BLE001 - export fails in many ways; say which module
        raise FrontendError(f"torch.export could not trace {type(module).__name__}: {exc}") from exc
    graph = import_program(program, name=name or type(module).__name__,
                           input_dims=_dim_names(module, dynamic_shapes, len(example_inputs)))
    return ImportedModule(graph, program.call_spec.out_spec)
