"""The verifier: a graph is well formed when it is SSA, in topological order, every use
list agrees with the operands, every op is registered with valid attributes, and every
result type is what the op's shape rule infers. Errors name the node and the reason."""

from __future__ import annotations

from .graph import Graph, Node, Value, infer_result_types
from .printer import Namer, format_node
from .registry import AttrError, UnknownOpError, attr_equal
from .shapes import ShapeError, free_symbols


class VerificationError(ValueError):
    """The graph is malformed; ``problems`` lists each finding."""

    def __init__(self, graph: Graph, problems: list[str]):
        self.problems = problems
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"graph @{graph.name} is invalid ({len(problems)} problems):\n{listing}")


def verify(graph: Graph) -> None:
    """Raise ``VerificationError`` listing every problem of ``graph``; return if none."""
    problems = _Checker(graph).run()
    if problems:
        raise VerificationError(graph, problems)


class _Checker:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.name = Namer(graph)
        self.problems: list[str] = []
        self.defined: set[int] = set()

    def run(self) -> list[str]:
        g = self.graph
        for value in g.inputs:
            self._define(value, "input")
            if value.type is None:
                self.problems.append(f"input {self.name(value)} has no type")
        bound = set().union(*(free_symbols(v.type.shape) for v in g.inputs if v.type is not None))
        for key, value in g.constants.items():
            self._define(value, "constant")
            if value.name != key or value.data is None or value.type is None:
                self.problems.append(f"constant {self.name(value)} must be named {key!r}, typed and hold data")
        self.in_graph = {id(n) for n in g.nodes}
        for node in g.nodes:
            self._node(node, bound)
        for value in g.outputs:
            if id(value) not in self.defined:
                self.problems.append(f"output {self.name(value)} is not defined in the graph")
        for value in g.values():
            for use in value.uses:
                if id(use.node) not in self.in_graph:
                    self.problems.append(f"{self.name(value)} has a dangling use by a {use.node.op} node "
                                         "that is not in the graph")
                elif use.index >= len(use.node.inputs) or use.node.inputs[use.index] is not value:
                    self.problems.append(f"{self.name(value)} lists a use that its user does not have")
        return self.problems

    def _define(self, value: Value, what: str) -> None:
        if id(value) in self.defined:
            self.problems.append(f"{what} {self.name(value)} is defined twice")
        if value.graph is not self.graph:
            self.problems.append(f"{what} {self.name(value)} belongs to another graph")
        self.defined.add(id(value))

    def _node(self, node: Node, bound: set) -> None:
        where = f"node `{format_node(node, self.name)}`"

        def fail(reason: str) -> None:
            self.problems.append(f"{where}: {reason}")

        for index, value in enumerate(node.inputs):
            if value is None:
                continue
            if value.graph is not self.graph:
                fail(f"operand {index} belongs to another graph")
            elif value.producer is not None and id(value.producer) not in self.in_graph:
                fail(f"operand {index} is a result of a {value.producer.op} node that is not in the graph")
            elif id(value) not in self.defined:
                fail(f"operand {index} {self.name(value)} is used before it is defined")
            if not any(u.node is node and u.index == index for u in value.uses):
                fail(f"operand {index} {self.name(value)} does not list this use")
        for index, result in enumerate(node.results):
            if result.producer is not node or result.result_index != index:
                fail(f"result {index} does not point back to its node")
            self._define(result, "result")
            if result.type is not None:
                unbound = free_symbols(result.type.shape) - bound
                if unbound:
                    fail(f"result type uses symbols bound by no graph input: "
                         f"{', '.join(sorted(map(str, unbound)))}")
        try:
            opdef = self.graph.registry[node.op]
        except UnknownOpError as exc:
            return fail(str(exc))
        if not opdef.arity_ok(len(node.inputs)):
            return fail(f"takes operands ({', '.join(opdef.operands)}), has {len(node.inputs)}")
        for spec, operand in zip(opdef.operand_specs, node.inputs):
            if operand is None and not spec.optional:
                return fail(f"required operand {spec.name} is missing")
        try:
            attrs = opdef.complete_attrs(node.attrs)
        except AttrError as exc:
            return fail(str(exc))
        if set(attrs) != set(node.attrs) or not all(attr_equal(attrs[k], node.attrs[k]) for k in attrs):
            return fail("attributes are not in canonical form")
        if any(v is not None and v.type is None for v in node.inputs):
            return fail("an operand has no type")
        try:
            expected = infer_result_types(opdef, node.inputs, attrs)
        except ShapeError as exc:
            return fail(str(exc))
        if len(expected) != len(node.results) or len(expected) != opdef.result_count(attrs):
            return fail(f"has {len(node.results)} results, the op gives {len(expected)}")
        for index, (want, result) in enumerate(zip(expected, node.results)):
            if result.type is None or not want.equivalent(result.type):
                fail(f"result {index} is typed {result.type}, the op gives {want}")
