"""The teaching notebooks: generated from notebooks/src, committed without outputs.

Executing them is nbmake's job (``pytest --nbmake notebooks/``); these tests check
that the committed ``.ipynb`` files match their sources and are clean.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks",
                                                  NOTEBOOKS / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_cells_splits_code_and_markdown():
    cells = _generator().parse_cells(
        "# header, not a cell\n# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\n# %%\n"
    )
    assert cells == [("markdown", "# Title\n\ntext"), ("code", "x = 1")]


def test_every_source_has_its_notebook():
    sources = {p.stem for p in (NOTEBOOKS / "src").glob("[0-9]*.py")}
    notebooks = {p.stem for p in NOTEBOOKS.glob("[0-9]*.ipynb")}
    assert sources == notebooks
    assert "00_tour" in notebooks  # the Binder landing page


def test_notebooks_are_up_to_date():
    assert _generator().main(["--check"]) == 0, "run python notebooks/make_notebooks.py"


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("[0-9]*.ipynb")), ids=lambda p: p.stem)
def test_notebook_is_clean(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, "a notebook without code"
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)
    assert all("pip install" not in "".join(c["source"]) for c in code), "notebooks run offline"
