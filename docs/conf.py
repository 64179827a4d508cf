"""Sphinx configuration of the xaiwidgets documentation.

Build (warnings are errors, no network needed)::

    .venv/bin/pip install -e ".[docs]"
    .venv/bin/sphinx-build -W --keep-going docs docs/_build/html

The notebooks in ``notebooks/`` are copied to ``docs/notebooks/`` (not tracked) and
executed by myst-nb; the results are cached in ``docs/_build/.jupyter_cache``, so a
rebuild re-runs only the notebooks that changed. ``XAIWIDGETS_DOCS_EXECUTE=off``
builds without executing them (pages without outputs: a quick check of the prose).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))

import xaiwidgets  # noqa: E402  (the installed package: pip install -e ".[docs]")

project = "xaiwidgets"
author = "the xaiwidgets authors"
copyright = "the xaiwidgets authors, MIT licence"  # noqa: A001
release = version = xaiwidgets.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    # MathJax 3 shipped with the site (copied to _static/mathjax, mathjax_path local):
    # formulas render offline, no CDN
    "sphinx-mathjax-offline",
    "sphinx.ext.viewcode",
    "myst_nb",  # brings myst_parser: Markdown pages and notebooks
    "sphinx_copybutton",
    "xw_docs",  # docs/_ext/xw_docs.py: parameter tables from the method registry
]

# --------------------------------------------------------------- sources
# .rst first: autosummary writes its stubs with the first suffix, in reST
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "_handouts", "notebooks/.ipynb_checkpoints",
                    "**/.ipynb_checkpoints"]
templates_path = ["_templates"]
root_doc = "index"

# ------------------------------------------------------ cross-references
# every internal link, :func: role and autodoc type must resolve (warnings are errors);
# intersphinx is off (the build has no network), so names of other libraries are
# accepted without a target instead
nitpicky = True
_EXTERNAL = (
    "torch", "nn", "xr", "xarray", "np", "numpy", "dask", "distributed", "ipywidgets", "W",
    "plotly", "go", "matplotlib", "PIL", "pd", "pathlib", "Path", "collections", "typing",
    "traitlets", "zennit", "skimage", "scipy", "tqdm", "enum", "concurrent", "threading",
    "anywidget", "os", "io", "t", "cloudpickle",
)
nitpick_ignore_regex = [
    (r"py:.*", rf"({'|'.join(_EXTERNAL)})(\..*)?"),
    # builtins and typing names as they appear in signatures
    (r"py:.*", r"(Any|Callable|Sequence|Mapping|Iterator|Iterable|NamedTuple|ClassVar|"
               r"Literal|Optional|Union|TypeVar|Self|None|NoneType|ellipsis|EllipsisType)"),
    (r"py:class", r"(int|float|str|bool|bytes|dict|list|tuple|set|frozenset|object|type|"
                  r"callable|optional|array-like|array_like|tensor|DataArray|Dataset|"
                  r"Tensor|Module|ndarray)"),
]

# -------------------------------------------------------------- autodoc
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

# ----------------------------------------------------------------- MyST
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist", "attrs_inline"]
myst_heading_anchors = 3
myst_all_links_external = False  # [text](page.md) links are checked like cross-references

# ---------------------------------------------------------- notebooks
NOTEBOOKS_SRC = ROOT / "notebooks"
NOTEBOOKS_DOCS = DOCS / "notebooks"


def copy_notebooks() -> None:
    """Copy the tracked notebooks next to the pages (Sphinx reads only its source dir);
    unchanged files keep their time stamp so jupyter-cache and Sphinx reuse their work."""
    NOTEBOOKS_DOCS.mkdir(exist_ok=True)
    for source in sorted(NOTEBOOKS_SRC.glob("[0-9][0-9]_*.ipynb")):
        target = NOTEBOOKS_DOCS / source.name
        if not target.exists() or target.read_bytes() != source.read_bytes():
            shutil.copy2(source, target)


copy_notebooks()

# ------------------------------------------------------------ handout
HANDOUTS = DOCS / "_handouts"  # not tracked; copied to the site's root (html_extra_path)


def make_handout() -> None:
    """The handout embedded in guide/teaching.md: an ExplainerWidget of two shapes images
    with FEM's K slider, exported with ``w.export_html`` (no kernel in the page). Made
    again only when the exporter changed (a few seconds on 2 cores)."""
    import xaiwidgets.widgets.export as export

    target = HANDOUTS / "handout-fem.html"
    if target.exists() and target.stat().st_mtime > Path(export.__file__).stat().st_mtime:
        return
    HANDOUTS.mkdir(exist_ok=True)
    model, preprocess, classes = xaiwidgets.models.load("shapes-vgg")
    images = xaiwidgets.datasets.shapes(n=2, seed=1).image.values
    w = xaiwidgets.ExplainerWidget(model, images, preprocess=preprocess, classes=classes,
                                   method="fem", background=False)
    w.export_html(target, sweep={"image": [0, 1], "K": [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]},
                  progress=False,
                  title="FEM on two shapes images: move K (a handout, no kernel)")
    w.close()


make_handout()

nb_execution_mode = os.environ.get("XAIWIDGETS_DOCS_EXECUTE", "cache")
nb_execution_cache_path = str(DOCS / "_build" / ".jupyter_cache")
nb_execution_timeout = 600  # seconds per notebook (each takes about a minute on 2 cores)
nb_execution_raise_on_error = True  # a failing cell fails the build
nb_execution_show_tb = True
nb_merge_streams = True
# the shipped models and data load offline; never reach out for anything
os.environ.setdefault("MPLBACKEND", "agg")

# ----------------------------------------------------------------- HTML
html_theme = "furo"
html_title = f"xaiwidgets {release}"
html_static_path = ["_static"]
html_extra_path = ["_handouts"]  # the teaching guide's handout (make_handout above)
html_theme_options = {"navigation_with_keys": True}
