"""The import graph of moai_ckpt, replay and parallel, and the picture of its layers.

Read from the source alone (nothing is imported): every ``import`` and ``from ... import`` of
every module, function-local ones and those under ``if TYPE_CHECKING:`` included (a type named
is a dependency too). ``tests/tools/test_architecture.py`` checks the graph; this script prints it::

    python scripts/import_graph.py            # the layers, as a mermaid diagram (docs/architecture.md)
    python scripts/import_graph.py --modules  # every module and what it imports
    python scripts/import_graph.py --cycles   # import cycles, if any
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("moai_ckpt", "replay", "parallel")

#: the rooms of the house, bottom layer first: (name, what it holds, the module prefixes in it).
#: A module belongs to the room with the longest prefix that names it or a package above it;
#: ``moai_ckpt`` names the package's ``__init__`` alone (its modules each have a room).
ROOMS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "foundation",
        "errors, keys, dtypes, state trees",
        (
            "moai_ckpt._version",
            "moai_ckpt.errors",
            "moai_ckpt.keys",
            "moai_ckpt.dtypes",
            "moai_ckpt.tree",
            "moai_ckpt.wrappers",
            "moai_ckpt.rng",
            "moai_ckpt.digest",
            "moai_ckpt.digest_cuda",
            "moai_ckpt.digest_plan",
            "moai_ckpt.faults",
            "moai_ckpt.events",
            "moai_ckpt.shm",
        ),
    ),
    (
        "format",
        "layout.py, format.py, arrays.py: keys, records, chunks",
        (
            "moai_ckpt.layout",
            "moai_ckpt.format",
            "moai_ckpt.arrays",
        ),
    ),
    ("storage", "storage/: Storage, retry, back ends", ("moai_ckpt.storage",)),
    ("coordination", "distributed.py: messages and the vote", ("moai_ckpt.distributed",)),
    (
        "snapshot",
        "snapshot.py, snapshot_writer.py, iopool.py: writing and reading one snapshot",
        ("moai_ckpt.snapshot", "moai_ckpt.snapshot_writer", "moai_ckpt.iopool"),
    ),
    (
        "state",
        "capture, staging, sharding, rank-local",
        (
            "moai_ckpt.capture",
            "moai_ckpt.staging",
            "moai_ckpt.overlap",
            "moai_ckpt.plan",
            "moai_ckpt.sharding",
            "moai_ckpt.ranklocal",
            "moai_ckpt.sampler",
            "moai_ckpt.trackable",
        ),
    ),
    ("fencing", "liveness.py, lease.py, writer.py", ("moai_ckpt.liveness", "moai_ckpt.lease", "moai_ckpt.writer")),
    (
        "checkpointer",
        "Checkpointer and its collaborators",
        (
            "moai_ckpt.options",
            "moai_ckpt.results",
            "moai_ckpt.catalog",
            "moai_ckpt.commit",
            "moai_ckpt.persist",
            "moai_ckpt.persist_worker",
            "moai_ckpt.restore",
            "moai_ckpt.retention",
            "moai_ckpt.pruner",
            "moai_ckpt.verify",
            "moai_ckpt.eventlog",
            "moai_ckpt.checkpointer",
        ),
    ),
    ("replay", "replay/: the op-stream log and its replay", ("replay",)),
    ("parallel", "parallel/: devices, cost model, plans", ("parallel",)),
    (
        "run",
        "fault_tolerant, Run, integrations, interop",
        (
            "moai_ckpt.run",
            "moai_ckpt.placement",
            "moai_ckpt.opcapture",
            "moai_ckpt.entry",
            "moai_ckpt.pruning",
            "moai_ckpt.integrations",
            "moai_ckpt.interop",
        ),
    ),
    ("api", "moai_ckpt/__init__.py: the public names", ("moai_ckpt",)),
    ("kit", "testing/: fault injection, conformance suites", ("moai_ckpt.testing",)),
    ("tools", "tools/: chaos harness, demo", ("moai_ckpt.tools",)),
    (
        "cli",
        "cli/: the moai-ckpt command line",
        ("moai_ckpt.cli", "moai_ckpt.tools.cli"),
    ),
)


def source_files() -> dict[str, Path]:
    """Module name -> its file, for every module of the three packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _statements(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, at any depth."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the three packages it imports.

    ``from package import name`` counts as importing the module ``package.name`` where that is a
    module, else as importing ``package`` itself.
    """
    files = source_files()
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in _statements(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
                continue
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per dot after the first
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
        graph[module] = {t for t in targets if t in files and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def room_of(module: str) -> str:
    """The room a module lives in (see `ROOMS`); `KeyError` for a module no room holds."""
    best = max(
        (
            (p, name)
            for name, _, prefixes in ROOMS
            for p in prefixes
            if module == p or (module.startswith(p + ".") and p != "moai_ckpt")
        ),
        key=lambda found: len(found[0]),
        default=None,
    )
    if best is None:
        raise KeyError(f"{module} is in no room of scripts/import_graph.py: add it to ROOMS")
    return best[1]


def room_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Room -> the rooms it imports from, without the edges other paths already imply."""
    edges: dict[str, set[str]] = {name: set() for name, _, _ in ROOMS}
    for module, targets in graph.items():
        for target in targets:
            a, b = room_of(module), room_of(target)
            if a != b:
                edges[a].add(b)

    def reaches(start: str, goal: str, skip: tuple[str, str]) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            for nxt in edges[node]:
                if (node, nxt) == skip or nxt in seen:
                    continue
                if nxt == goal:
                    return True
                seen.add(nxt)
                todo.append(nxt)
        return False

    return {a: {b for b in sorted(targets) if not reaches(a, b, (a, b))} for a, targets in edges.items()}


def mermaid(graph: dict[str, set[str]]) -> str:
    """The layers as a mermaid flowchart: an arrow from a room to each room it imports from."""
    lines = ["flowchart BT"]
    for name, what, _ in ROOMS:
        lines.append(f'    {name}["<b>{name}</b><br/>{what}"]')
    for a, targets in room_graph(graph).items():
        lines.extend(f"    {a} --> {b}" for b in sorted(targets))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", action="store_true", help="every module and what it imports")
    parser.add_argument("--cycles", action="store_true", help="import cycles")
    args = parser.parse_args()
    graph = import_graph()
    if args.modules:
        for module in sorted(graph):
            print(f"{module} -> {', '.join(sorted(graph[module])) or '-'}")
    elif args.cycles:
        for cycle in cycles(graph):
            print("cycle:", " <-> ".join(cycle))
    else:
        print(mermaid(graph))


if __name__ == "__main__":
    main()
