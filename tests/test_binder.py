"""The Binder files must install what pyproject.toml declares, with CPU-only torch."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
BINDER = ROOT / "binder"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
LANDING = "notebooks/00_tour.ipynb"


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement_lines() -> list[str]:
    lines = (BINDER / "requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def binder_requirements() -> dict[str, Requirement]:
    reqs = [Requirement(line) for line in requirement_lines() if not line.startswith("-")]
    return {canonicalize_name(r.name): r for r in reqs}


def pip_installs() -> list[list[str]]:
    """The argument lists of every ``pip install`` in postBuild."""
    commands = []
    for line in (BINDER / "postBuild").read_text().splitlines():
        words = shlex.split(line, comments=True)
        if "pip" in words and "install" in words:
            commands.append(words[words.index("install") + 1:])
    return commands


def by_name(specs: list[str]) -> dict[str, Requirement]:
    return {canonicalize_name(Requirement(s).name): Requirement(s) for s in specs}


def test_torch_comes_from_the_cpu_index(project):
    lines = requirement_lines()
    assert f"--extra-index-url {CPU_INDEX}" in lines
    reqs = binder_requirements()
    assert {"torch", "torchvision"} <= set(reqs)
    # nothing later may replace the CPU build with PyPI's CUDA one
    for args in pip_installs():
        assert not {"-U", "--upgrade", "--force-reinstall", "--ignore-installed"} & set(args)


def test_binder_pins_agree_with_pyproject(project):
    declared = by_name(project["dependencies"])
    for name, req in binder_requirements().items():
        assert name in declared, f"binder installs {name}, which pyproject does not declare"
        assert str(req.specifier) == str(declared[name].specifier), (
            f"{name}: binder asks {req.specifier}, pyproject {declared[name].specifier}")


def test_every_runtime_dependency_is_installed(project):
    installs = pip_installs()
    targets = [arg for args in installs for arg in args if not arg.startswith("-")]
    local = [t for t in targets if re.fullmatch(r"\.(\[[\w,-]+\])?", t)]
    assert local, "postBuild must pip install the repository itself ('.[notebooks]')"
    extras = {e for t in local for e in re.findall(r"[\w-]+", t.partition("[")[2])}
    optional = project.get("optional-dependencies", {})
    assert extras <= set(optional), f"unknown extras {extras - set(optional)}"
    installed = set(binder_requirements()) | set(by_name(project["dependencies"]))
    for extra in extras:
        installed |= set(by_name(optional[extra]))
    needed = set(by_name(project["dependencies"])) | {"jupyterlab", "ipywidgets", "anywidget"}
    assert needed <= installed, f"binder misses {needed - installed}"


def test_postbuild_is_executable():
    assert os.access(BINDER / "postBuild", os.X_OK)
    assert (BINDER / "postBuild").read_text().startswith("#!/bin/bash")


def test_python_version_is_supported(project):
    version = (BINDER / "runtime.txt").read_text().strip().removeprefix("python-")
    assert Version(version) in SpecifierSet(project["requires-python"])


def test_launch_url_opens_the_tour():
    readme = (BINDER / "README.md").read_text()
    assert f"urlpath=lab/tree/{LANDING}" in readme
    assert (ROOT / LANDING).is_file(), f"the Binder landing page {LANDING} is missing"
