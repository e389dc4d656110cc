"""The core op set, one module per family, and ``REGISTRY``, the registry built from it.

Each family module exports ``OPS``, a plain list of ``OpDef``s; nothing registers
itself on import. Users who add ops build their own registry with
``REGISTRY.extended([...])`` and pass it to ``Graph``.
"""

from ..registry import Registry
from . import (collective, conv, creation, elementwise, fused, linalg, mla, moe, moe_all_to_all, nn, paged,
               quantized, quantized_activations, reduce, shape)

CORE_OPS = [*elementwise.OPS, *shape.OPS, *linalg.OPS, *reduce.OPS, *nn.OPS, *fused.OPS, *paged.OPS, *creation.OPS,
            *collective.OPS, *moe.OPS, *moe_all_to_all.OPS, *quantized.OPS, *quantized_activations.OPS, *conv.OPS,
            *mla.OPS]
REGISTRY = Registry(CORE_OPS)

__all__ = ["CORE_OPS", "REGISTRY"]
