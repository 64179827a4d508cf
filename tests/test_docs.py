"""The documentation's promises, checked without building it.

* every public name — ``xaiwidgets.__all__``, the widgets, and the public functions and
  classes of ``xaiwidgets.metrics``, ``xaiwidgets.datasets`` and ``xaiwidgets.models`` —
  has a docstring with an example (a doctest ``>>>`` or a code block), and every public
  method of a public class has a docstring;
* every public name is listed in the API reference (``docs/api.md``), and every name the
  reference lists exists;
* the definitions page that docstrings cite exists, and no docstring cites a file outside
  the repository (the planning files);
* every page of the site is reachable from a table of contents, and relative links
  between pages point at existing files.

The Sphinx build itself (warnings as errors, cross-references checked) runs in
``.ci/run``.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import xaiwidgets as xw

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: a doctest or a literal/code block
EXAMPLE = re.compile(r"^\s*>>>|::\s*$|^\s*```", re.MULTILINE)
#: modules whose public functions and classes are public names
PUBLIC_MODULES = ("xaiwidgets.metrics", "xaiwidgets.datasets", "xaiwidgets.models")


def module_names(module) -> list[str]:
    """A module's public callables: its ``__all__``, else the functions and classes it
    defines (names imported from elsewhere in the package are someone else's)."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, o in vars(module).items()
                 if (inspect.isfunction(o) or inspect.isclass(o))
                 and o.__module__ == module.__name__]
    return [n for n in names if not n.startswith("_") and callable(getattr(module, n))]


def public_names() -> dict[str, object]:
    """Public name (as users write it) -> object."""
    import xaiwidgets.widgets as widgets

    out: dict[str, object] = {}
    for name in xw.__all__:
        obj = getattr(xw, name)
        if not inspect.ismodule(obj) and callable(obj):
            out[f"xaiwidgets.{name}"] = obj
    for name in widgets.__all__:
        out[f"xaiwidgets.{name}"] = getattr(xw, name)  # lazily imported, same object
    for module_name in PUBLIC_MODULES:
        module = getattr(xw, module_name.split(".")[1])
        for name in module_names(module):
            out[f"{module_name}.{name}"] = getattr(module, name)
    return out


PUBLIC = public_names()


def reference_entries(text: str | None = None) -> set[str]:
    """The full names listed by the autosummary tables of ``docs/api.md`` (or ``text``):
    each entry is relative to the module set last by ``currentmodule``/``automodule``."""
    entries, current = set(), "xaiwidgets"
    in_table = False
    text = (DOCS / "api.md").read_text() if text is None else text
    for line in text.splitlines():
        module = re.match(r"\.\. (?:current|auto)?module:: (\S+)", line.strip())
        if module:
            current = module.group(1)
        if line.strip().startswith(".. autosummary::"):
            in_table = True
            continue
        if in_table:
            entry = re.fullmatch(r" {3}([A-Za-z_][\w.]*)", line)
            if entry:
                entries.add(f"{current}.{entry.group(1)}")
            elif line.strip() and not line.strip().startswith(":"):
                in_table = False
    return entries


def own_methods(cls: type) -> list[tuple[str, object]]:
    """Public methods and properties a class defines itself (not those inherited from
    ipywidgets or other libraries)."""
    return [(name, member) for name, member in vars(cls).items()
            if not name.startswith("_")
            and (inspect.isfunction(member) or isinstance(member, (property, classmethod,
                                                                   staticmethod)))]


def test_the_public_names_are_found():
    # the discovery above must not silently shrink (a renamed __all__, a moved module)
    assert {"xaiwidgets.Explainer", "xaiwidgets.explain", "xaiwidgets.ExplainerWidget",
            "xaiwidgets.metrics.pcc", "xaiwidgets.datasets.shapes",
            "xaiwidgets.models.load"} <= set(PUBLIC)
    assert len(PUBLIC) >= 30


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_name_has_a_docstring_with_an_example(name):
    doc = inspect.getdoc(PUBLIC[name]) or ""
    assert doc.strip(), f"{name} has no docstring"
    assert EXAMPLE.search(doc), (
        f"{name}'s docstring has no example: add a short doctest (>>>) or a code block "
        "(a line ending in '::' followed by indented code)")


@pytest.mark.parametrize("name", sorted(n for n, o in PUBLIC.items() if inspect.isclass(o)))
def test_public_methods_have_docstrings(name):
    cls = PUBLIC[name]
    missing = []
    for method, member in own_methods(cls):
        target = member.fget if isinstance(member, property) else getattr(
            member, "__func__", member)
        if not (inspect.getdoc(target) or "").strip():
            missing.append(method)
    assert not missing, f"{name}: public methods without a docstring: {missing}"


def test_every_public_name_is_in_the_api_reference():
    listed = reference_entries()
    missing = sorted(set(PUBLIC) - listed)
    assert not missing, f"add these to an autosummary table of docs/api.md: {missing}"


def test_every_reference_entry_exists():
    import importlib

    def resolve(dotted: str):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
            return obj
        raise ImportError(dotted)

    entries = reference_entries()
    assert len(entries) >= len(PUBLIC)
    for entry in sorted(entries):
        assert resolve(entry) is not None, entry


def test_reference_parser_reads_the_tables():
    sample = """
.. currentmodule:: xaiwidgets

.. autosummary::
   :toctree: generated

   Explainer
   evaluation.gfdm.default_sigma

Some prose under the table.

.. automodule:: xaiwidgets.metrics
   :no-members:

.. autosummary::
   :nosignatures:

   pcc
"""
    assert reference_entries(sample) == {
        "xaiwidgets.Explainer", "xaiwidgets.evaluation.gfdm.default_sigma",
        "xaiwidgets.metrics.pcc"}


def test_nothing_cites_files_outside_the_repository():
    """Code, tests, notebooks and pages cite docs/methods.md, never the planning files."""
    assert (DOCS / "methods.md").exists()
    outside = ("SPEC" + ".md", "API" + ".md", "STYLE" + ".md", "../" + "shared")
    roots = [Path(xw.__file__).parent, ROOT / "tests", ROOT / "notebooks", ROOT / "benchmarks",
             DOCS, ROOT / "README.md", ROOT / "binder"]
    offenders = []
    for root in roots:
        files = [root] if root.is_file() else root.rglob("*")
        for path in files:
            copied = DOCS / "_build", DOCS / "notebooks"  # build outputs, untracked copies
            if (path.suffix not in {".py", ".md", ".ipynb", ".txt", ".yml", ".toml"}
                    or any(path.is_relative_to(c) for c in copied)):
                continue
            text = path.read_text(encoding="utf-8")
            offenders += [f"{path.relative_to(ROOT)}: {word}" for word in outside if word in text]
    assert not offenders, f"cite docs/methods.md instead: {offenders}"


def pages() -> set[str]:
    """Every page of the site, as Sphinx names it (path without suffix)."""
    out = set()
    for path in DOCS.rglob("*.md"):
        relative = path.relative_to(DOCS)
        if relative.parts[0] in ("_build", "generated", "notebooks"):
            continue
        out.add(str(relative.with_suffix("")))
    return out


def test_every_page_is_in_a_table_of_contents():
    listed = set()
    for page in pages():
        text = (DOCS / f"{page}.md").read_text()
        for block in re.findall(r"```\{toctree\}(.*?)```", text, flags=re.DOTALL):
            base = Path(page).parent
            for line in block.splitlines():
                line = line.strip()
                if line and not line.startswith(":"):
                    listed.add(str((base / line).as_posix()).removeprefix("./"))
    orphans = sorted(pages() - listed - {"index"})
    assert not orphans, f"pages missing from every toctree: {orphans}"


def test_relative_links_between_pages_exist():
    broken = []
    for page in pages():
        path = DOCS / f"{page}.md"
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in target:
                continue
            if not (path.parent / target).exists() and not (
                    target.startswith("notebooks/") and (ROOT / target).exists()):
                broken.append(f"{page}: {target}")
    assert not broken, f"links to missing files: {broken}"


def test_every_registered_method_is_in_the_guide_and_the_definitions():
    guide = (DOCS / "guide" / "methods.md").read_text()
    definitions = (DOCS / "methods.md").read_text().lower()
    for name in xw.methods():
        assert f"{{xw-params}} {name}" in guide, f"docs/guide/methods.md: no table for {name}"
    titles = {"gradient": "gradient", "guided_backprop": "guided backprop",
              "deconvnet": "deconvnet", "integrated_gradients": "integrated gradients",
              "smoothgrad": "smoothgrad", "gradcam": "grad-cam", "guided_gradcam":
              "guided grad-cam", "occlusion": "occlusion", "lime": "lime",
              "meaningful_perturbation": "meaningful perturbation", "lrp": "layer-wise",
              "deeplift": "deeplift", "fem": "fem", "mlfem": "mlfem"}
    for name in xw.methods():
        assert titles.get(name, name.replace("_", " ")) in definitions, (
            f"docs/methods.md does not define {name}")


def test_every_notebook_is_in_the_gallery():
    gallery = (DOCS / "notebooks.md").read_text()
    for notebook in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert f"(notebooks/{notebook.name})" in gallery, (
            f"docs/notebooks.md: add a row for {notebook.name}")


def test_formulas_render_offline_with_the_bundled_mathjax(tmp_path):
    # docs/conf.py loads the extension that ships MathJax with the site; a one-page build
    # with it references the local script, which is copied next to the pages
    sphinx = pytest.importorskip("sphinx.application")
    conf = (DOCS / "conf.py").read_text()
    assert re.search(r'^\s*"sphinx-mathjax-offline",', conf, re.MULTILINE)
    source = tmp_path / "src"
    source.mkdir()
    (source / "conf.py").write_text(
        'extensions = ["sphinx.ext.mathjax", "sphinx-mathjax-offline"]\n')
    (source / "index.rst").write_text("Title\n=====\n\n:math:`a^2 + b^2 = c^2`\n")
    out = tmp_path / "html"
    app = sphinx.Sphinx(str(source), str(source), str(out), str(tmp_path / "doctrees"),
                        "html", status=None, warning=None, freshenv=True)
    app.build()
    page = (out / "index.html").read_text()
    scripts = re.findall(r'<script[^>]*src="([^"]*mathjax[^"]*)"', page, re.IGNORECASE)
    assert scripts and all(not s.startswith(("http:", "https:", "//")) for s in scripts)
    assert (out / scripts[0].split("?")[0]).is_file()
    assert (out / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").is_dir()
