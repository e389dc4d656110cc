"""Call ops as Python functions to build graphs: ``ops.add(x, y)``, ``ops.rms_norm(h, w, eps=1e-5)``.

Any name resolves to the op of that name in the registry of the graph the operands
belong to, so user-registered ops work the same way. Python numbers among the operands
become 0-d constants of the operands' dtype. Ops without tensor operands (``full``,
``arange``) take the graph as ``graph=``. Pattern and replacement functions of the
rewriter are written with these functions.
"""

from __future__ import annotations

from typing import Any

from .graph import call

__all__ = ["call"]


def __getattr__(name: str) -> Any:
    if name.startswith("_"):
        raise AttributeError(name)

    def op_function(*operands: Any, **attrs: Any) -> Any:
        return call(name, *operands, **attrs)

    op_function.__name__ = op_function.__qualname__ = name
    from .opdefs import REGISTRY

    if name in REGISTRY:
        op = REGISTRY[name]
        params = ", ".join([*op.operands, *op.attrs])
        op_function.__doc__ = f"{name}({params}): {op.doc}"
    return op_function
