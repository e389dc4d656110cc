"""Symbolic dims as values a backend's graph computes: one fold over a sympy expression
shared by the TensorRT and ONNX backends, which differ only in the ops they emit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sympy


def build_dim(expr: Any, integer: Callable[[int], Any], symbol: Callable[[sympy.Symbol], Any],
              add: Callable[[Any, Any], Any], mul: Callable[[Any, Any], Any]) -> Any:
    """Fold the dim ``expr`` (an int, a symbol, or sums, products and positive integer
    powers of them) into a backend value with these constructors."""
    expr = sympy.sympify(expr)
    if expr.is_Integer:
        return integer(int(expr))
    if expr.is_Symbol:
        return symbol(expr)
    if expr.is_Pow and expr.exp.is_Integer and expr.exp > 0:
        terms, combine = [expr.base] * int(expr.exp), mul
    elif expr.is_Add or expr.is_Mul:
        terms, combine = list(expr.args), add if expr.is_Add else mul
    else:
        raise ValueError(f"dim {expr} is not built of symbols and integers by sums, products and powers")
    values = [build_dim(t, integer, symbol, add, mul) for t in terms]
    total = values[0]
    for value in values[1:]:
        total = combine(total, value)
    return total
