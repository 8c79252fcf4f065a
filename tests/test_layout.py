"""Import rules of the layout, checked over the AST of every module (no import is executed).

* a stage package (``core/cam``, ``core/ccam``, ``core/rw``, ``core/segmentation``) never imports another stage
  package: stages meet only through files;
* a shared module (the rest of ``core``) never imports a stage package;
* ``scripts/<stage>/`` imports ``core`` (its own stage package and shared modules), ``scripts/evaluate.py`` only
  shared modules;
* nothing in ``core``, ``scripts`` or ``tools`` imports ``scripts`` or ``tools``;
* ``poolnet/`` (the saliency refiner) imports ``core``'s shared modules and itself; nothing in ``core`` or
  ``scripts`` imports it (``tools``, e.g. the benchmark, may).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("cam", "ccam", "rw", "segmentation")
STAGE_PACKAGES = {f"core.{stage}" for stage in STAGES}


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a file imports (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def stage_of(module: str) -> str | None:
    """``core.cam.methods`` -> ``core.cam``; None for shared modules and other packages."""
    return next((p for p in STAGE_PACKAGES if module == p or module.startswith(p + ".")), None)


def python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def violations(path: Path, allowed_stage: str | None, allow_poolnet: bool = False) -> list[str]:
    """The forbidden imports of one file: of ``scripts``/``tools``, of ``poolnet`` (unless allowed), and of stage
    packages other than its own."""
    label = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    found = []
    for name in sorted(imported_modules(path)):
        top = name.split(".")[0]
        if top in ("scripts", "tools") or (top == "poolnet" and not allow_poolnet):
            found.append(f"{label} imports {name}")
        stage = stage_of(name)
        if stage is not None and stage != allowed_stage:
            found.append(f"{label} imports stage package {name}")
    return found


def test_every_stage_package_exists():
    for stage in STAGES:
        assert (ROOT / "core" / stage / "__init__.py").is_file()


def test_core_modules_import_only_their_own_stage_package():
    problems = []
    for path in python_files("core"):
        problems += violations(path, stage_of(module_name(path)))
    assert not problems, "\n".join(problems)


def test_scripts_import_core_and_only_their_own_stage_package():
    problems = []
    for path in python_files("scripts"):
        parts = path.relative_to(ROOT / "scripts").parts
        allowed = f"core.{parts[0]}" if len(parts) > 1 else None  # scripts/evaluate.py: shared modules only
        problems += violations(path, allowed)
    assert not problems, "\n".join(problems)


def test_tools_never_import_scripts_or_tools():
    problems = []
    for path in python_files("tools"):
        problems += [p for p in violations(path, None, allow_poolnet=True) if "stage package" not in p]
    assert not problems, "\n".join(problems)


def test_poolnet_imports_only_shared_core_modules_and_nothing_imports_it():
    problems = []
    for path in python_files("poolnet"):
        problems += violations(path, allowed_stage=None, allow_poolnet=True)
    assert python_files("poolnet") and not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "source, allowed, expected",
    [
        ("from core.cam import methods\n", None, "imports stage package core.cam"),
        ("import core.rw.walk\n", "core.cam", "imports stage package core.rw.walk"),
        ("from core import labels\n", "core.cam", None),
        ("from scripts.cam import inference\n", None, "imports scripts.cam"),
        ("from poolnet.model import PoolNet\n", None, "imports poolnet.model"),
    ],
)
def test_the_rules_catch_what_they_forbid(tmp_path, source, allowed, expected):
    # The checker itself: a forbidden import is reported, a permitted one is not.
    path = tmp_path / "probe.py"
    path.write_text(source)
    found = violations(path, allowed)
    assert (not found) if expected is None else any(expected in line for line in found), found
