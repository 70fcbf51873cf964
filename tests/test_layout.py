"""The layering of the code: lower layers never import higher ones (networks/ knows nothing of utils/, inside
networks/ the blocks nothing of the methods, utils/data nothing of utils/runs), no import circles between utils
modules, one logging setup."""

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


NETWORKS_MODULES = sorted((ROOT / "networks").rglob("*.py"), key=str)


@pytest.mark.parametrize("path", NETWORKS_MODULES, ids=lambda p: str(p.relative_to(ROOT / "networks")))
def test_networks_never_import_utils_or_the_entry_points(path: Path):
    upward = {m for m in imported_modules(path) if m.split(".")[0] in ("utils", "train", "inference", "scripts")}
    assert not upward, f"{path.relative_to(ROOT)} imports {sorted(upward)}: move what it needs down into networks/"


def networks_floor(module: str) -> str:
    """networks.methods.cmdr -> "methods"; networks.features -> "features"."""
    return module.split(".")[1]


# networks/ floors and the ones each may import besides itself: the shared errors and normalisation constants at
# the bottom, extractors and blocks beside each other, the features' front door above the extractors, the methods
# above all of those, the export graph on top (docs/layout.md).
BASE = {"errors", "normalization"}
NETWORKS_ALLOWED = {
    "errors": set(), "normalization": set(),
    "extractors": BASE, "blocks": set(), "features": {"extractors"} | BASE,
    "methods": {"blocks", "extractors", "features"} | BASE,
    "graph": {"methods", "blocks", "extractors", "features"} | BASE,
}


def test_networks_is_divided_into_the_documented_floors():
    floors = {networks_floor(".".join(p.relative_to(ROOT).with_suffix("").parts)) for p in NETWORKS_MODULES
              if p.name != "__init__.py" or p.parent != ROOT / "networks"}
    assert floors == set(NETWORKS_ALLOWED), f"networks/ holds {sorted(floors ^ set(NETWORKS_ALLOWED))} unexpectedly"


@pytest.mark.parametrize("path", [p for p in NETWORKS_MODULES if p != ROOT / "networks" / "__init__.py"],
                         ids=lambda p: str(p.relative_to(ROOT / "networks")))
def test_networks_floors_import_only_the_floors_below(path: Path):
    floor = networks_floor(".".join(path.relative_to(ROOT).with_suffix("").parts))
    used = {networks_floor(m) for m in imported_modules(path) if m.startswith("networks.")} - {floor}
    assert used <= NETWORKS_ALLOWED[floor], f"networks/{floor} imports networks.{sorted(used - NETWORKS_ALLOWED[floor])}"


def utils_module(path: Path) -> str:
    """utils/runs/pipeline.py -> "runs.pipeline"."""
    return ".".join(path.relative_to(ROOT / "utils").with_suffix("").parts)


UTILS_MODULES = sorted((ROOT / "utils").rglob("*.py"), key=str)

# utils/ sub-packages and the ones each may import (besides itself and utils/logs.py): data at the bottom, the
# station (scoring parts on the line) at the top.
ALLOWED = {"data": set(), "evaluation": {"data"}, "runs": {"data"}, "station": {"data", "runs", "evaluation"}}


def test_utils_is_divided_into_the_documented_sub_packages():
    loose = [utils_module(p) for p in UTILS_MODULES if p.parent == ROOT / "utils" and p.stem not in ("__init__", "logs")]
    assert not loose, f"utils modules outside a sub-package: {loose}"
    assert {p.parent.name for p in UTILS_MODULES if p.parent != ROOT / "utils"} == set(ALLOWED)


@pytest.mark.parametrize("path", UTILS_MODULES, ids=utils_module)
def test_utils_sub_packages_import_only_the_floors_below(path: Path):
    package = utils_module(path).split(".")[0]
    if package not in ALLOWED:
        return  # utils/__init__.py and utils/logs.py
    used = {m.split(".")[1] for m in imported_modules(path) if m.startswith("utils.")} - {package, "logs"}
    assert used <= ALLOWED[package], f"utils/{package} imports utils.{sorted(used - ALLOWED[package])}"


def test_no_import_circle_between_utils_modules():
    graph = {utils_module(p): {m.removeprefix("utils.") for m in imported_modules(p) if m.startswith("utils.")}
             for p in UTILS_MODULES}

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
