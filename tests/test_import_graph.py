"""kiln's modules import each other without circles: every relative import, deferred
ones inside functions included (only ``if TYPE_CHECKING:`` blocks are left out), makes
an edge of a directed graph that must stay acyclic, so the packages keep the one
direction that ``kiln/__init__.py`` states."""

import ast
from pathlib import Path

import networkx as nx

import kiln

ROOT = Path(kiln.__file__).parent
SKIP = {"tests", "bench", "tools", "examples", "docs", "models"}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if parts[0] in SKIP or any(p.startswith(".") for p in parts):
            continue
        name = ".".join(("kiln", *parts))[: -len(".py")]
        modules[name.removesuffix(".__init__")] = path
    return modules


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    return {id(inner) for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for inner in ast.walk(node)}


def import_graph() -> nx.DiGraph:
    """Module -> module it imports (a name imported from a package counts as its
    submodule where one of that name exists)."""
    modules = _modules()
    graph = nx.DiGraph()
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or not node.level or id(node) in skip:
                continue
            base = package[:len(package) - (node.level - 1)] + ([node.module] if node.module else [])
            source = ".".join(base)
            for alias in node.names:
                target = f"{source}.{alias.name}"
                graph.add_edge(name, target if target in modules else source)
    return graph


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert graph.number_of_edges() > 100  # the walk found kiln's imports
    cycles = sorted(nx.simple_cycles(graph), key=len)
    assert not cycles, f"import circles: {cycles[:5]}"
