"""What pyproject.toml promises a fresh machine: every third-party import declared, floors that the
installed (tested) versions meet, timm below its next major, an SPDX license expression."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="tomllib: Python 3.11 or later")

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# an import name -> the distribution that provides it, where they differ
DISTRIBUTIONS = {"PIL": "Pillow", "yaml": "pyyaml"}
# distributions that an optional extra brings: imported lazily, inside the function that needs them
OPTIONAL = {name for extra in PROJECT["optional-dependencies"].values() for name in
            (Requirement(item).name.lower() for item in extra)}


def _requirements() -> dict[str, Requirement]:
    return {Requirement(item).name.lower(): Requirement(item) for item in PROJECT["dependencies"]}


def _top_level_imports() -> set[str]:
    """The top-level package of every import in tieta's source, module level or lazy."""
    names = set()
    for path in (ROOT / "src" / "tieta").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_every_third_party_import_is_a_declared_dependency_or_an_extra():
    third_party = _top_level_imports() - set(sys.stdlib_module_names) - {"tieta", "__future__"}
    declared = set(_requirements()) | OPTIONAL
    # huggingface_hub comes with timm, which fetches published weights with it
    undeclared = {name for name in third_party if DISTRIBUTIONS.get(name, name).lower() not in declared} - {
        "huggingface_hub"}
    assert not undeclared, f"imported but not declared in pyproject.toml: {sorted(undeclared)}"


def test_the_installed_versions_meet_the_declared_floors():
    for name, requirement in _requirements().items():
        installed = Version(importlib.metadata.version(name))
        assert requirement.specifier.contains(installed, prereleases=True), (name, str(installed))


def test_timm_is_capped_below_its_next_major_and_pillow_has_a_floor():
    requirements = _requirements()
    assert not requirements["timm"].specifier.contains("2.0.0")
    assert not requirements["pillow"].specifier.contains("10.0.0")  # has_transparency_data: Pillow 10.1


def test_the_license_is_an_spdx_expression():
    assert PROJECT["license"] == "Apache-2.0"
