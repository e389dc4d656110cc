"""kiln's IR: dtypes, symbolic shapes, typed SSA graphs, the op registry, the verifier,
the text form (printer and parser), the interpreter and a networkx view.

``ir`` imports no other kiln package.
"""

from . import dtypes, ops
from .constants import ConstantData, FoldedData, LazyData, MissingData, ShardData, TensorData, for_rank
from .dtypes import DType, dtype
from .graph import AttrPlaceholder, Graph, GraphError, Node, Use, Value
from .interpreter import InterpreterError, interpret
from .nxview import to_dot, to_networkx, topological_order
from .opdefs import CORE_OPS, REGISTRY
from .parser import ParseError, parse
from .printer import print_graph
from .registry import Attr, AttrError, DeclarationError, OpDef, Registry, UnknownOpError
from .shapes import Dim, ShapeError, dims_equal, sym
from .types import TensorType
from .verifier import VerificationError, verify

__all__ = [
    "Attr", "AttrError", "AttrPlaceholder", "CORE_OPS", "ConstantData", "DType", "DeclarationError",
    "Dim", "FoldedData", "Graph", "GraphError", "InterpreterError", "LazyData", "MissingData",
    "Node", "OpDef", "ParseError", "REGISTRY", "Registry", "ShapeError", "ShardData", "TensorData",
    "TensorType", "UnknownOpError", "Use", "Value", "VerificationError", "dims_equal", "dtype",
    "dtypes", "for_rank", "interpret", "ops", "parse", "print_graph", "sym", "to_dot", "to_networkx",
    "topological_order", "verify",
]
