"""Sphinx directives that render tables from xaiwidgets' own registries.

The parameter tables of the user guide are read from the method registry at build
time (``Method.params``: name, default, range, doc), so the docs cannot drift from
the code::

    ```{xw-params} integrated_gradients
    ```

    ```{xw-methods}
    ```

    ```{xw-metrics}
    ```
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective


def _table(header: list[str], rows: list[list[str]], widths: list[int]) -> nodes.table:
    """A docutils table whose cells are literal-free paragraphs of plain text."""
    table = nodes.table(classes=["xw-table"])
    group = nodes.tgroup(cols=len(header))
    table += group
    for width in widths:
        group += nodes.colspec(colwidth=width)

    def row(cells: list[str]) -> nodes.row:
        out = nodes.row()
        for cell in cells:
            entry = nodes.entry()
            entry += nodes.paragraph(text=cell)
            out += entry
        return out

    head = nodes.thead()
    head += row(header)
    body = nodes.tbody()
    for cells in rows:
        body += row(cells)
    group += head
    group += body
    return table


def _fmt(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def param_range(p: Any) -> str:
    """A parameter's valid values in words: choices, an interval, or "any"."""
    if p.kind == "choice":
        return ", ".join(_fmt(c) for c in p.choices)
    if p.kind in ("float", "int"):
        low = "−∞" if p.low is None else _fmt(p.low)
        high = "∞" if p.high is None else _fmt(p.high)
        scale = ", log scale" if p.log else ""
        return f"{p.kind} in [{low}, {high}]{scale}"
    return "see description"


class ParamsDirective(SphinxDirective):
    """``{xw-params} NAME``: the parameter table of one registered method."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        import xaiwidgets as xw

        method = xw.get_method(self.arguments[0])
        rows = [[p.name, _fmt(p.default), param_range(p), p.doc] for p in method.params]
        if not rows:
            return [nodes.paragraph(text="No parameters besides target (and layer, "
                                         "where the method uses one).")]
        return [_table(["parameter", "default", "valid values", "meaning"], rows,
                       [14, 12, 22, 52])]


class MethodsDirective(SphinxDirective):
    """``{xw-methods}``: every registered method with its family and properties."""

    def run(self) -> list[nodes.Node]:
        import xaiwidgets as xw

        rows = []
        for name in xw.methods():
            m = xw.get_method(name)
            rows.append([
                name, m.family, "yes" if m.uses_layer else "no",
                "signed" if m.signed else "non-negative",
                "no (class-agnostic)" if m.class_agnostic else "yes",
                str(m.default_reduce),
                ", ".join(p.name for p in m.params) or "—",
            ])
        return [_table(["method", "family", "layer", "map sign", "uses target",
                        "default reduce", "parameters"], rows, [18, 12, 7, 12, 14, 12, 25])]


class MetricsDirective(SphinxDirective):
    """``{xw-metrics}``: every saliency metric, its direction and its reference."""

    def run(self) -> list[nodes.Node]:
        from xaiwidgets import metrics

        rows = []
        for name in metrics.available():
            m = metrics.get(name)
            rows.append([name, "higher" if m.higher_is_better else "lower",
                         "density map (GFDM)" if m.needs == "map" else "fixations",
                         m.doc])
        return [_table(["metric", "better", "compared with", "definition"], rows,
                       [12, 8, 18, 62])]


_ORIGINAL_LINES: dict[str, list[str]] = {}
_PROSE_KINDS = ("attribute", "data", "property")


def save_attribute_doc(app: Sphinx, what: str, name: str, obj: Any, options: Any,
                       lines: list[str]) -> None:
    """napoleon reads an attribute or property docstring "words: more words" as
    "type: description"; ours are prose, so their text is saved before napoleon runs..."""
    if what in _PROSE_KINDS:
        _ORIGINAL_LINES[name] = list(lines)


def restore_attribute_doc(app: Sphinx, what: str, name: str, obj: Any, options: Any,
                          lines: list[str]) -> None:
    """...and put back after it (the type comes from the annotation anyway)."""
    if what in _PROSE_KINDS and name in _ORIGINAL_LINES:
        lines[:] = _ORIGINAL_LINES.pop(name)


def keep_block_indentation(app: Sphinx, what: str, name: str, obj: Any, options: Any,
                           lines: list[str]) -> None:
    """A docstring that is a summary line plus an indented ``::`` block loses the block's
    indentation in ``inspect.cleandoc`` (it dedents by the smallest indentation after the
    first line); the closing quotes' indentation tells the real one, so restore it."""
    raw = getattr(obj, "__doc__", None) if what != "property" else getattr(
        getattr(obj, "fget", None), "__doc__", None)
    if not isinstance(raw, str) or what in ("attribute", "data"):
        return
    raw_lines = raw.expandtabs().split("\n")
    if len(raw_lines) < 3 or raw_lines[-1].strip() or not raw_lines[0].rstrip().endswith("::"):
        return
    base = len(raw_lines[-1])
    body = [line for line in raw_lines[1:] if line.strip()]
    smallest = min(len(line) - len(line.lstrip()) for line in body)
    if smallest <= base:
        return
    extra = " " * (smallest - base)
    for i in range(1, len(lines)):
        if lines[i].strip():
            lines[i] = extra + lines[i]


_SECTIONS = ("parameters", "other parameters", "returns", "yields", "raises", "attributes")
_FIELD_LINE = re.compile(r"^\*{0,2}[A-Za-z_][\w.\[\], |*]*(\s:\s.*|:)?$")


def close_sections(app: Sphinx, what: str, name: str, obj: Any, options: Any,
                   lines: list[str]) -> None:
    """In NumPy style a section runs to the next header, so napoleon would read a paragraph
    written after ``Parameters`` as one more parameter. Give such a paragraph its own
    ``Notes`` (or ``Examples``, for doctests) header."""
    section = None
    i = 0
    while i < len(lines):
        line = lines[i]
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and following.strip() and set(following.strip()) == {"-"}:
            section = line.strip().lower()
            i += 2
            continue
        new_paragraph = i > 0 and not lines[i - 1].strip() and line.strip() \
            and not line.startswith(" ")
        if section in _SECTIONS and new_paragraph and not _FIELD_LINE.match(line.strip()):
            header = "Examples" if line.lstrip().startswith(">>>") else "Notes"
            lines[i:i] = [header, "-" * len(header), ""]
            section = header.lower()
            i += 3
            continue
        i += 1


_LITERAL = re.compile(r"(``.*?``|`[^`]*`)")
_BARS = re.compile(r"(?<![\\|])\|(?=[^\s|])([^|`]*?[^\s|\\])\|")


def escape_bars(app: Sphinx, what: str, name: str, obj: Any, options: Any,
                lines: list[str]) -> None:
    """Docstrings write absolute values and norms as ``|x|`` (readable in ``help()``);
    reST would take them for substitutions, so escape the bars outside literals."""
    for i, line in enumerate(lines):
        if "|" not in line or line.lstrip().startswith("|"):
            continue
        parts = _LITERAL.split(line)
        lines[i] = "".join(part if k % 2 else _BARS.sub(r"\\|\1\\|", part)
                           for k, part in enumerate(parts))


def _documented(env: Any) -> dict[str, str]:
    """id(object) -> the name under which the API reference documents it."""
    cache = getattr(env, "_xw_documented", None)
    if cache is None:
        cache = {}
        for full in env.get_domain("py").objects:
            obj = _import(full)
            if obj is not None and not isinstance(obj, (int, float, str, tuple, dict)):
                cache.setdefault(id(obj), full)
        env._xw_documented = cache
    return cache


def _import(dotted: str) -> Any:
    """The object a dotted name points to, or None."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except Exception:  # noqa: BLE001 - any import failure means "not this split"
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def resolve_aliases(app: Sphinx, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve a Python cross-reference written with another path to a documented object
    (``xw.fuse``, ``xaiwidgets.explainer.Explainer``, ``Explainer`` inside the widgets)
    to the page that documents it. A reference to something of the package that the
    reference does not document is shown as plain code; anything else stays an error."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    if target.startswith("xw."):
        target = "xaiwidgets." + target[3:]
    module, klass = node.get("py:module"), node.get("py:class")
    candidates = [target]
    if module:
        candidates += [f"{module}.{klass}.{target}" if klass else "", f"{module}.{target}"]
        # the module a documented object really lives in (autosummary stubs use public paths)
        owner = _import(module)
        real = getattr(owner, "__name__", None)
        if real and real != module:
            candidates.append(f"{real}.{target}")
    # the module that defines the object of this stub page (generated/<public name>)
    page = _import(node["refdoc"].rsplit("/", 1)[-1])
    home = getattr(page, "__module__", None) or getattr(page, "__name__", None)
    if isinstance(home, str):
        candidates.append(f"{home}.{target}")
    candidates += [f"xaiwidgets.{target}"]
    documented = _documented(env)
    for candidate in filter(None, candidates):
        obj = _import(candidate)
        if obj is None or not candidate.startswith("xaiwidgets"):
            continue
        name = documented.get(id(obj))
        if name is not None:
            domain = env.get_domain("py")
            return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"],
                                       name, node, contnode) or domain.resolve_xref(
                env, node["refdoc"], app.builder, "obj", name, node, contnode)
        return contnode  # exists in the package, not in the reference: plain code
    # a bare name documented exactly once (``ImageSource`` in a summary table)
    same = {name for name in documented.values() if name.rsplit(".", 1)[-1] == target}
    if "." not in target and len(same) == 1:
        return env.get_domain("py").resolve_xref(env, node["refdoc"], app.builder, "obj",
                                                 same.pop(), node, contnode)
    return None


def setup(app: Sphinx) -> dict[str, Any]:
    # before (priority < 500) and after napoleon's own handler
    app.connect("autodoc-process-docstring", keep_block_indentation, priority=300)
    app.connect("autodoc-process-docstring", close_sections, priority=400)
    app.connect("autodoc-process-docstring", escape_bars, priority=400)
    app.connect("autodoc-process-docstring", save_attribute_doc, priority=400)
    app.connect("autodoc-process-docstring", restore_attribute_doc, priority=600)
    app.connect("missing-reference", resolve_aliases)
    app.add_directive("xw-params", ParamsDirective)
    app.add_directive("xw-methods", MethodsDirective)
    app.add_directive("xw-metrics", MetricsDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
