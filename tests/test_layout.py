"""The layering of the code: lower layers never import higher ones (networks/ knows nothing of utils/), no import
circles between utils modules, one logging setup."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth of its code (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "networks").glob("*.py")), ids=lambda p: p.name)
def test_networks_never_import_utils_or_the_entry_points(path: Path):
    upward = {m for m in imported_modules(path) if m.split(".")[0] in ("utils", "train", "inference", "scripts")}
    assert not upward, f"networks/{path.name} imports {sorted(upward)}: move what it needs down into networks/"


def test_no_import_circle_between_utils_modules():
    graph = {p.stem: {m.split(".")[1] for m in imported_modules(p) if m.startswith("utils.")}
             for p in (ROOT / "utils").glob("*.py")}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ()))

    circles = sorted(name for name in graph if reaches(name, name, {name}))
    assert not circles, f"utils modules in an import circle: {circles}"


def test_every_entry_point_logs_through_one_setup():
    calls = [p.relative_to(ROOT) for p in ROOT.rglob("*.py") if "logging.basicConfig" in p.read_text()
             and ".git" not in p.parts and p.name != "test_layout.py"]
    # utils/logs.py is the setup; the two standalone scripts import nothing of the repository on purpose
    assert sorted(map(str, calls)) == ["scripts/dispatch_spread.py", "scripts/prepare_2d_class.py", "utils/logs.py"]


def test_no_script_edits_sys_path():
    """The repository is an installable package (pip install -e .): nothing outside the tests edits sys.path."""
    editing = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if "sys.path.insert" in p.read_text()
               and not {".git", "tests"} & set(p.relative_to(ROOT).parts)]
    assert not editing, f"sys.path edited in {editing}"
