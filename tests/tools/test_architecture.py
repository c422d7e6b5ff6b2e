"""The shape of the code: no import cycles, imports that point down the layers, small modules that
say what they are for. Read from the source by ``scripts/import_graph.py``; nothing is imported."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 600

#: files (or folders, ending in /) not checked yet, and why. Empty: every module is checked.
NOT_YET_CHECKED: dict[str, str] = {}

#: rooms that only the test suite, the tools and the command line may import from (the core never does)
TOP_ROOMS = ("kit", "tools", "cli")


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


graph_script = _load_script()
FILES: dict[str, Path] = graph_script.source_files()
GRAPH: dict[str, set[str]] = graph_script.import_graph()
CYCLES: list[list[str]] = graph_script.cycles(GRAPH)


def _path(module: str) -> str:
    return FILES[module].relative_to(ROOT).as_posix()


def _not_yet_checked(module: str) -> str | None:
    path = _path(module)
    return next((why for prefix, why in NOT_YET_CHECKED.items() if path == prefix or path.startswith(prefix)), None)


def _skip_if_not_yet_checked(module: str) -> None:
    why = _not_yet_checked(module)
    if why is not None:
        pytest.skip(f"{_path(module)} is not checked yet: {why}")


def test_every_module_of_the_three_packages_is_read() -> None:
    assert {"moai_ckpt.checkpointer", "moai_ckpt.storage.base", "replay.log", "parallel.planner"} <= FILES.keys()


@pytest.mark.parametrize("cycle", CYCLES or [[]], ids=lambda cycle: " <-> ".join(cycle) or "none")
def test_no_import_cycle(cycle: list[str]) -> None:
    if not cycle:
        return
    reasons = {_not_yet_checked(m) for m in cycle}
    if None not in reasons:
        pytest.skip(f"the cycle {' <-> '.join(cycle)} is not checked yet: {', '.join(sorted(map(str, reasons)))}")
    pytest.fail(f"import cycle: {' <-> '.join(cycle)}")


def test_every_module_has_a_room_in_the_picture_of_the_layers() -> None:
    lost = []
    for module in FILES:
        try:
            graph_script.room_of(module)
        except KeyError:
            lost.append(module)
    assert not lost, f"modules in no room of scripts/import_graph.py: {lost}"


def _in_top_room(module: str) -> bool:
    try:
        return graph_script.room_of(module) in TOP_ROOMS
    except KeyError:  # reported by test_every_module_has_a_room_in_the_picture_of_the_layers
        return False


@pytest.mark.parametrize("module", sorted(m for m in FILES if not _in_top_room(m)))
def test_the_core_imports_neither_the_test_kit_nor_the_tools_nor_the_cli(module: str) -> None:
    _skip_if_not_yet_checked(module)
    upward = sorted(t for t in GRAPH[module] if _in_top_room(t))
    assert not upward, f"{module} imports {upward}: the test kit, the tools and the CLI sit on top of the core"


@pytest.mark.parametrize("module", sorted(FILES))
def test_no_source_file_is_over_600_lines(module: str) -> None:
    _skip_if_not_yet_checked(module)
    lines = len(FILES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{_path(module)} has {lines} lines: two concepts share it (split it in collaborators)"


@pytest.mark.parametrize("module", sorted(FILES))
def test_every_module_opens_with_a_docstring_stating_its_job(module: str) -> None:
    _skip_if_not_yet_checked(module)
    docstring = ast.get_docstring(ast.parse(FILES[module].read_text()))
    assert docstring, f"{_path(module)} has no module docstring"
    first = docstring.strip().splitlines()[0]
    assert re.search(r"[A-Za-z]", first) and len(first.split()) >= 3, f"{_path(module)}: {first!r} says no job"


def test_the_architecture_page_shows_the_layers_the_imports_make() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text()
    drawn = re.search(r"```mermaid\n(flowchart BT\n.*?)\n```", page, re.S)
    assert drawn is not None, "docs/architecture.md has no layer diagram"
    assert drawn.group(1) == graph_script.mermaid(GRAPH), (
        "the layers changed: run `python scripts/import_graph.py` and paste its output into docs/architecture.md"
    )
