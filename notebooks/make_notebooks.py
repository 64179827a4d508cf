"""Build the teaching notebooks from their sources in ``notebooks/src/``.

Each source is a Python file in the "percent" format (the one jupytext and VS Code
understand): ``# %%`` starts a code cell, ``# %% [markdown]`` a markdown cell whose
lines start with ``#``. The sources are what we edit and review; the ``.ipynb`` files
are generated from them, without outputs (CI executes them with nbmake)::

    python notebooks/make_notebooks.py          # write notebooks/*.ipynb
    python notebooks/make_notebooks.py --check  # exit 1 if one is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "src"
CELL_MARK = re.compile(r"^# %%(?P<kind> \[markdown\])?\s*$")
KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}


def parse_cells(text: str) -> list[tuple[str, str]]:
    """Split a percent-format source into ``(kind, source)`` pairs.

    >>> parse_cells("# %% [markdown]\\n# # Title\\n# %%\\nx = 1\\n")
    [('markdown', '# Title'), ('code', 'x = 1')]
    """
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        mark = CELL_MARK.match(line)
        if mark:
            cells.append(("markdown" if mark["kind"] else "code", []))
        elif cells:
            cells[-1][1].append(line)
    out = []
    for kind, lines in cells:
        if kind == "markdown":
            # "# text" -> "text"; a bare "#" is an empty line
            lines = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines]
        source = "\n".join(lines).strip("\n")
        if source:
            out.append((kind, source))
    return out


def build(source: Path) -> nbformat.NotebookNode:
    """The notebook of one source file, with stable cell ids and no outputs."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": KERNEL, "language_info": {"name": "python"}}
    stem = source.stem.split("_")[0]
    for i, (kind, text) in enumerate(parse_cells(source.read_text())):
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        cell = make(text)
        cell.id = f"nb{stem}-{i:03d}"  # stable ids keep the generated files' diffs small
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check they are up to date")
    args = parser.parse_args(argv)
    stale = []
    for source in sorted(SOURCES.glob("*.py")):  # the numbered notebooks and app.py
        target = HERE / f"{source.stem}.ipynb"
        text = nbformat.writes(build(source)) + "\n"
        if target.exists() and target.read_text() == text:
            continue
        stale.append(target.name)
        if not args.check:
            target.write_text(text)
    if args.check and stale:
        print("out of date (run python notebooks/make_notebooks.py):", ", ".join(stale))
        return 1
    if not args.check:
        print("wrote", ", ".join(stale) if stale else "nothing (all up to date)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
