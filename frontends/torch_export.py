"""Import a ``torch.export`` ``ExportedProgram`` into a kiln graph.

Parameters and buffers become constants (named by their module path, their data supplied
by the caller, so that weights can stay lazy); user inputs become graph inputs whose
dynamic dims become kiln symbols; every live call becomes kiln ops through
``aten.CONVERTERS``. Ops without a mapping are collected and reported together, each
with the module paths it came from. Each result is checked against the type torch
computed for it while tracing, so a converter that disagrees with torch fails here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sympy
import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.utils._sympy.functions import Max as TorchMax
from torch.utils._sympy.functions import Min as TorchMin
from torch.utils._sympy.value_ranges import bound_sympy

from ..ir import ConstantData, Graph, LazyData, TensorType, Value, sym
from ..ir.shapes import Dim, dims_equal, normalize_dim
from .aten import CONVERTERS, IGNORED, Conversion
from .complex import COMPLEX_CONVERTERS, Complex, is_complex, pair_shape, real_dtype
from .errors import FrontendError, UnsupportedOpsError
from .fills import COPY_OP, EMPTY_OPS, SLICE_OP, Fill, FillSlice, slice_of, view_base

ConstantSource = Callable[[str, torch.Tensor], ConstantData]


class _Importer:
    def __init__(self, program: ExportedProgram, name: str, input_dims: Sequence[Mapping[int, str]],
                 constant_source: ConstantSource | None, prefix: str):
        self.program = program
        self.graph = Graph(name)
        self.input_dims = list(input_dims)
        self.constant_source = constant_source or self._from_program
        self.prefix = prefix
        self.symbols: dict[sympy.Symbol, sympy.Expr] = {}
        self.env: dict[str, Any] = {}
        self.unsupported: dict[str, list[str]] = {}

    # -- types and values ------------------------------------------------------------
    def dim(self, size: Any) -> Dim:
        if isinstance(size, torch.SymInt):
            expr = _settle_extrema(size.node.expr, self.program.range_constraints)
            for s in expr.free_symbols:
                self.symbols.setdefault(s, sym(str(s)))
            return normalize_dim(expr.xreplace(self.symbols))
        return int(size)

    def tensor_type(self, fake: torch.Tensor) -> TensorType:
        """kiln's type of a traced tensor (a complex one as its real pairs, see ``complex``)."""
        return TensorType(real_dtype(fake.dtype), [self.dim(d) for d in pair_shape(fake)])

    def _from_program(self, target: str, fake: torch.Tensor) -> ConstantData:
        target = self.prefix + target
        source = self.program.state_dict.get(target)
        if source is None:
            source = self.program.constants[target]
        if source.device.type == "meta":
            raise FrontendError(f"constant {target} was made by the model's code during an export on the meta "
                                "device, so its values are unknown (as Falcon's multi-query head indices, "
                                "x[..., [-2], :]); kiln cannot import this model yet")
        return LazyData(lambda: source, f"program tensor {target}")

    def location(self, node: torch.fx.Node) -> str | None:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            return None
        path = list(stack.values())[-1][0]
        path = path.replace("L['self'].", "").replace("L['self']", "")
        return path[len(self.prefix):] if path.startswith(self.prefix) else path or None

    # -- the walk ----------------------------------------------------------------------
    def run(self) -> Graph:
        specs = {spec.arg.name: spec for spec in self.program.graph_signature.input_specs}
        user_index = 0
        for node in self.program.graph.nodes:
            if node.op != "placeholder":
                continue
            spec, fake = specs[node.name], node.meta["val"]
            if spec.kind == InputKind.USER_INPUT:
                self._user_input(node, fake, user_index)
                user_index += 1
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                target = spec.target[len(self.prefix):] if spec.target.startswith(self.prefix) else spec.target
                # tensors the model's code makes (Falcon's head indices) live in the program, not the checkpoint
                lifted = spec.kind == InputKind.CONSTANT_TENSOR
                data = (self._from_program if lifted else self.constant_source)(target, fake)
                self.env[node.name] = self.graph.add_constant(data, self.tensor_type(fake), target)
            else:
                raise FrontendError(f"input {node.name} of kind {spec.kind.name} is not supported")
        live = self._live_nodes()
        for node in self.program.graph.nodes:
            if node.op == "call_function" and node.name in live:
                self._call(node)
        if self.unsupported:
            raise UnsupportedOpsError(self.unsupported)
        output = next(n for n in self.program.graph.nodes if n.op == "output")
        outputs = [self.env[a.name] for a in output.args[0]]
        if not all(isinstance(v, Value) for v in outputs):
            raise FrontendError("every output of the program must be a tensor")
        self.graph.set_outputs(outputs)
        return self.graph

    def _user_input(self, node: torch.fx.Node, fake: torch.Tensor, index: int) -> None:
        names = self.input_dims[index] if index < len(self.input_dims) else {}
        for axis, size in enumerate(fake.shape):
            if isinstance(size, torch.SymInt) and axis in names:
                expr = size.node.expr
                if not isinstance(expr, sympy.Symbol):
                    raise FrontendError(f"input {node.name} dim {axis} is {expr}, not a free dimension")
                self.symbols[expr] = sym(names[axis])
        self.env[node.name] = self.graph.add_input(node.name, self.tensor_type(fake))

    def _live_nodes(self) -> set[str]:
        output = next(n for n in self.program.graph.nodes if n.op == "output")
        writes: dict[str, list[torch.fx.Node]] = {}  # a tensor's name -> the copy_ nodes that write into it
        for node in self.program.graph.nodes:
            if str(node.target) == COPY_OP and isinstance(node.args[0], torch.fx.Node):
                writes.setdefault(view_base(node.args[0]).name, []).append(node)
        live: set[str] = set()
        stack = list(output.all_input_nodes)
        while stack:
            node = stack.pop()
            if node.name not in live:
                live.add(node.name)
                stack.extend(node.all_input_nodes)
                stack.extend(writes.get(node.name, ()))
        return live

    def _arg(self, arg: Any) -> Any:
        if isinstance(arg, torch.fx.Node):
            value = self.env.get(arg.name, _MISSING)
            if isinstance(value, FillSlice):
                value = value.fill
            if isinstance(value, Fill):
                try:
                    return value.read()
                except NotImplementedError as exc:
                    self.unsupported.setdefault(f"{EMPTY_OPS[0]} ({exc})", []).append("")
                    return _MISSING
            return Complex(value) if is_complex(arg.meta.get("val")) and value is not _MISSING else value
        if isinstance(arg, (list, tuple)):
            return type(arg)(self._arg(a) for a in arg)
        if isinstance(arg, torch.SymInt):
            return self.dim(arg)
        return arg

    def _call(self, node: torch.fx.Node) -> None:
        name = str(node.target)
        fake = node.meta.get("val")
        if name in IGNORED:
            return
        if isinstance(fake, (torch.SymInt, int)) and not isinstance(fake, bool):
            self.env[node.name] = self.dim(fake)
            return
        if self._fill(node, name, fake):
            return
        table = COMPLEX_CONVERTERS if _touches_complex(node) else CONVERTERS
        converter, mutated = table.get(name), None
        in_place = node.args and isinstance(node.args[0], torch.fx.Node)
        if converter is None and _functional(name) in table and in_place:
            converter, mutated = table[_functional(name)], node.args[0]
        args, kwargs = self._arg(node.args), {k: self._arg(v) for k, v in node.kwargs.items()}
        if converter is None:
            label = f"{name} (on complex tensors)" if table is COMPLEX_CONVERTERS else name
            self.unsupported.setdefault(label, []).append(self.location(node) or "")
            return
        if _contains_missing((args, kwargs)):
            return  # downstream of an unsupported op: already reported
        first = fake[0] if isinstance(fake, (tuple, list)) else fake
        cx = Conversion(self.graph, real_dtype(first.dtype) if isinstance(first, torch.Tensor) else None,
                        self.location(node))
        before = len(self.graph.nodes)
        try:
            result = converter(cx, *args, **kwargs)
        except NotImplementedError as exc:
            self.unsupported.setdefault(f"{name} ({exc})", []).append(cx.location or "")
            return
        for created in self.graph.nodes[before:]:
            created.location = created.location or cx.location
        self.env[node.name] = self._check(node, name, result, fake, cx)
        if mutated is not None:
            self.env[mutated.name] = self.env[node.name]

    def _fill(self, node: torch.fx.Node, name: str, fake: Any) -> bool:
        """Track a tensor allocated empty and filled through slices (see ``fills``); True
        when ``node`` was such an allocation, a view of one, or a write into one."""
        target = self.env.get(node.args[0].name) if node.args and isinstance(node.args[0], torch.fx.Node) else None
        try:
            if name in EMPTY_OPS:
                self.env[node.name] = Fill(self.tensor_type(fake))
            elif name == SLICE_OP and isinstance(target, Fill):
                self.env[node.name] = slice_of(target, *self._arg(node.args[1:]))
            elif name == COPY_OP and isinstance(target, FillSlice):
                source = self._arg(node.args[1])
                if source is not _MISSING:
                    target.fill.write(target, source)
            else:
                return False
        except NotImplementedError as exc:
            self.unsupported.setdefault(f"{name} ({exc})", []).append(self.location(node) or "")
        return True

    def _check(self, node: torch.fx.Node, name: str, result: Any, fake: Any, cx: Conversion) -> Any:
        if isinstance(result, (tuple, list)):
            return tuple(self._check(node, name, r, f, cx) for r, f in zip(result, fake))
        want = self.tensor_type(fake)
        if result.dtype != want.dtype:
            result = cx.value(result, want.dtype)
        if not (len(result.shape) == len(want.shape)
                and all(dims_equal(a, b) for a, b in zip(result.shape, want.shape))):
            raise FrontendError(f"{name} at {cx.location or node.name}: kiln computes {result.type}, "
                                f"torch computes {want}")
        return result


_MISSING = object()


def _touches_complex(node: torch.fx.Node) -> bool:
    """Whether ``node`` takes or makes a complex tensor (converted by ``COMPLEX_CONVERTERS``)."""
    results = node.meta.get("val")
    results = results if isinstance(results, (tuple, list)) else [results]
    return any(is_complex(r) for r in results) or any(is_complex(a.meta.get("val")) for a in node.all_input_nodes)


def _functional(name: str) -> str:
    """The out-of-place form of an in-place op's name: ``aten.div_.Tensor`` -> ``aten.div.Tensor``.
    An in-place op is imported as its functional form, whose result then stands for the
    mutated tensor in every later use (views taken before the mutation are not updated)."""
    parts = name.split(".")
    if len(parts) == 3 and parts[1].endswith("_") and not parts[1].startswith("_"):
        return ".".join((parts[0], parts[1][:-1], parts[2]))
    return name


def _settle_extrema(expr: sympy.Expr, ranges: Mapping[sympy.Symbol, Any]) -> sympy.Expr:
    """``expr`` with each ``Max``/``Min`` that the dims' ranges decide replaced by its
    winner: MPT slices its ALiBi table from ``max(0, 128 - seq)``, which is ``128 - seq``
    when ``seq`` is at most 128."""
    extrema = (sympy.Max, sympy.Min, TorchMax, TorchMin)
    if not isinstance(expr, sympy.Expr) or not expr.has(*extrema):
        return expr
    args = [_settle_extrema(a, ranges) for a in expr.args]
    if isinstance(expr, extrema):
        is_max = isinstance(expr, (sympy.Max, TorchMax))
        for a in args:
            gaps = [bound_sympy(a - b, ranges) for b in args if b is not a]
            if all(g.lower >= 0 if is_max else g.upper <= 0 for g in gaps):
                return a
    return expr.func(*args)


def _contains_missing(obj: Any) -> bool:
    if obj is _MISSING:
        return True
    if isinstance(obj, (list, tuple)):
        return any(_contains_missing(x) for x in obj)
    if isinstance(obj, dict):
        return any(_contains_missing(x) for x in obj.values())
    return False


def import_program(program: ExportedProgram, *, name: str = "main",
                   input_dims: Sequence[Mapping[int, str]] = (),
                   constant_source: ConstantSource | None = None, prefix: str = "") -> Graph:
    """Import ``program`` as a kiln graph.

    ``input_dims[i]`` names the dynamic dims of user input ``i`` (``{0: "batch"}``);
    ``constant_source(name, fake_tensor)`` supplies each parameter's and buffer's data
    (by default the program's own tensors); ``prefix`` is stripped from constant names
    and module paths (the attribute under which a wrapper holds the model).
    """
    return _Importer(program, name, input_dims, constant_source, prefix).run()
