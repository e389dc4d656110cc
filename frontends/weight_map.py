"""Checkpoint tensors under the names of the model's parameters, by transformers' own
conversion rules, without reading any weight.

A key is renamed (legacy names such as GPT-NeoX's ``embed_out``) and, where one of the
model's weight converters applies, grouped with the others it merges into one parameter:
Mixtral's or Qwen-MoE's per-expert ``experts.3.w1.weight`` become a slice of the stacked
``experts.gate_up_proj``. A merged parameter is a ``MergedTensor``: its shape and dtype are
found by running the converter's operations on meta tensors, and its data is read and
merged only when asked for. Checkpoints that ship stacked experts already need no merge.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .checkpoint import Checkpoint, TensorRef
from .errors import FrontendError


@dataclass(frozen=True)
class MergedTensor:
    """A model tensor made from several checkpoint tensors by one of transformers' weight
    converters (experts stacked, gate and up projections concatenated)."""

    converter: Any  # transformers.core_model_loading.WeightConverter
    sources: tuple[tuple[str, tuple[TensorRef, ...]], ...]  # (source pattern, its tensors in key order)
    output: str  # the converter's target pattern this tensor is
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def where(self) -> str:
        files = sorted({ref.file.name for _, refs in self.sources for ref in refs})
        count = sum(len(refs) for _, refs in self.sources)
        return f"{count} merged tensors of {', '.join(files)}"

    @property
    def describe(self) -> str:
        first = self.sources[0][1][0]
        return f"{self.where} ({first.key}, ...)"

    def load(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read the source tensors (cast to ``dtype``) and merge them."""
        return _convert(self.converter, {p: [ref.load(dtype) for ref in refs] for p, refs in self.sources})[self.output]


def _convert(converter: Any, tensors: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    for operation in converter.operations:
        tensors = operation.convert(tensors, source_patterns=converter.source_patterns,
                                    target_patterns=converter.target_patterns, full_layer_name="")
    return tensors


def model_tensors(checkpoint: Checkpoint, model: nn.Module) -> dict[str, TensorRef | MergedTensor]:
    """The checkpoint's tensors by the names the model uses (original names kept too)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    tensors: dict[str, TensorRef | MergedTensor] = dict(checkpoint.tensors)
    groups: dict[str, dict[str, list[TensorRef]]] = defaultdict(lambda: defaultdict(list))
    for key in sorted(checkpoint.tensors, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters)
        if pattern is None:
            tensors.setdefault(renamed, checkpoint.tensors[key])
        else:
            groups[renamed][pattern].append(checkpoint.tensors[key])
    for renamed, sources in groups.items():
        converter = by_pattern[next(iter(sources))]
        ordered = tuple((p, tuple(sources[p])) for p in converter.source_patterns if p in sources)
        try:
            metas = _convert(converter, {p: [torch.empty(r.shape, dtype=r.dtype, device="meta") for r in refs]
                                         for p, refs in ordered})
        except (RuntimeError, ValueError) as exc:
            counts = " and ".join(f"{len(refs)} x {p.strip('.')}" for p, refs in ordered)
            raise FrontendError(f"cannot merge the checkpoint's {counts} into {renamed}: {exc}") from None
        first = converter.target_patterns[0]
        for output, meta in metas.items():
            name = renamed.replace(first, output, 1)
            tensors.setdefault(name, MergedTensor(converter, ordered, output, tuple(meta.shape), meta.dtype))
    return tensors
