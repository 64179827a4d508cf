"""What happens to a widget when it is no longer shown: closing frees everything.

ipywidgets keeps every widget it ever made in its registry until the widget is
closed, and a widget's callbacks keep the Python object behind it alive, with its
Explainers, cached activations and kept graphs. Re-running a notebook cell replaces
the cell's output but closes nothing: each run of ``w = xw.ExplainerWidget(...)``
used to leave its predecessor (about 200 ipywidgets and 19 MiB of tensors on
``shapes-vgg``) in memory for the rest of the session.

Two things here end that:

* :func:`close_tree` closes a widget and every ipywidget it made (controls, figures,
  thumbnails, layouts, embedded widgets), so the registry lets go of all of them;
  every xaiwidgets widget's ``close()`` uses it and then drops its caches.
* :func:`adopt` remembers which notebook cell made a widget. When the same cell runs
  again (JupyterLab 4, Notebook 7 and VS Code send the cell's id with each run), the
  widgets made by its earlier run are closed: their output was just replaced, so no
  one can see them any more. ``CLOSE_ON_RERUN = False`` switches this off.

>>> import ipywidgets as W
>>> box = W.VBox([W.IntSlider(), W.HBox([W.Button()])])
>>> closed = close_tree(box)
>>> closed >= 4, box.comm is None
(True, True)
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import ipywidgets as W

#: close the widgets made by a cell's earlier run when the same cell runs again
CLOSE_ON_RERUN = True
#: the modules whose objects :func:`close_tree` looks into for widgets they hold
OWN_MODULES = ("xaiwidgets.widgets.",)

_LOCK = threading.Lock()
#: cell id -> (id of the run that made them, the widgets it made)
_BY_CELL: dict[str, tuple[str, list[weakref.ref]]] = {}
#: the run :func:`running_cell` simulates (``None``: ask the kernel)
_SIMULATED: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "xaiwidgets_cell_run", default=None)


def _held(obj: Any) -> Iterator[Any]:
    """The objects ``obj`` holds that may be or hold widgets: a widget's traits (its
    ``children``, ``layout``...), an own object's attributes, a container's items."""
    if isinstance(obj, W.Widget):
        yield from getattr(obj, "_trait_values", {}).values()
    if type(obj).__module__.startswith(OWN_MODULES) or isinstance(obj, W.Widget):
        yield from getattr(obj, "__dict__", {}).values()
    elif isinstance(obj, dict):
        yield from obj.values()
    elif isinstance(obj, (list, tuple, set, frozenset)):
        yield from obj


def widgets_of(root: Any) -> list[W.Widget]:
    """Every ipywidget reachable from ``root`` through widget traits, the attributes of
    xaiwidgets' own objects and the containers they hold (each once, ``root`` first).

    >>> import ipywidgets as W
    >>> s = W.IntSlider(); len(widgets_of(W.VBox([s, s])))  # box, slider and 2 layouts (+ style)
    5
    """
    found: list[W.Widget] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, W.Widget):
            found.append(obj)
        elif not (type(obj).__module__.startswith(OWN_MODULES)
                  or isinstance(obj, (dict, list, tuple, set, frozenset))):
            continue
        stack.extend(_held(obj))
    return found


def close_tree(root: Any) -> int:
    """Close ``root`` and every ipywidget it holds (:func:`widgets_of`); a held
    xaiwidgets widget is closed through its own ``close()`` (its worker stops, its
    caches go). Returns how many ipywidgets were open before. Safe to call twice."""
    closed = 0
    for widget in widgets_of(root):
        if isinstance(widget, Closable) and not getattr(widget, "_closed", True):
            widget.close()  # an xaiwidgets widget: its own close (worker, caches)
        if widget.comm is not None:
            closed += 1
        W.Widget.close(widget)
        detach_file_watch(widget)
    return closed


def detach_file_watch(widget: W.Widget) -> int:
    """Disconnect ``widget`` from its anywidget class's file-contents signal.

    anywidget (0.9–0.11) connects every instance of a widget class whose ``_esm`` or
    ``_css`` is a file (plotly's ``FigureWidget`` among them) to that file's
    ``changed`` signal with a lambda holding the instance: the class keeps every
    figure ever made alive, closed or not. Returns the slots removed.
    """
    try:
        from anywidget._file_contents import FileContents, VirtualFileContents
    except ImportError:  # no anywidget, or one that moved it: nothing to detach
        return 0
    removed = 0
    for cls in type(widget).__mro__:
        for key in ("_esm", "_css"):
            contents = cls.__dict__.get(key)
            if not isinstance(contents, (FileContents, VirtualFileContents)):
                continue
            signal = contents.changed
            for slot in list(getattr(signal, "_slots", ())):
                fn = slot.dereference() if hasattr(slot, "dereference") else None
                if any(_holds(cell, widget) for cell in getattr(fn, "__closure__", None) or ()):
                    signal.disconnect(fn)
                    removed += 1
    return removed


def replace_children(box: W.Box, children: list[Any]) -> None:
    """Show ``children`` in ``box`` and close the widgets it showed before that are not
    among them (a rebuilt gallery does not pile up in ipywidgets' registry).

    >>> import ipywidgets as W
    >>> old, box = W.Button(), W.VBox()
    >>> box.children = [old]; replace_children(box, [W.Button()]); old.comm is None
    True
    """
    previous = box.children
    box.children = children
    keep = {id(c) for c in children}
    for widget in previous:
        if id(widget) not in keep:
            close_tree(widget)


@contextlib.contextmanager
def running_cell(cell: str, run: str) -> Iterator[None]:
    """Widgets made inside count as made by run ``run`` of cell ``cell`` (for scripts
    and benchmarks that simulate a notebook; a kernel tells :func:`current_run` itself).

    >>> import ipywidgets as W
    >>> class Panel(Closable, W.VBox): pass
    >>> with running_cell("c", "1"): old = Panel()
    >>> with running_cell("c", "2"): new = Panel()
    >>> old.comm is None, new.comm is not None
    (True, True)
    """
    token = _SIMULATED.set((str(cell), str(run)))
    try:
        yield
    finally:
        _SIMULATED.reset(token)


def current_run() -> tuple[str, str] | None:
    """``(cell id, run id)`` of the notebook cell running now, or ``None`` outside a
    kernel, outside a cell's run (a click's callback), in a thread other than the one
    running cells (a widget's worker: the kernel reports whichever cell runs meanwhile)
    or where the front end sends no cell id."""
    if _SIMULATED.get() is not None:
        return _SIMULATED.get()
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        from IPython import get_ipython

        kernel = getattr(get_ipython(), "kernel", None)
        parent = kernel.get_parent() if kernel is not None else None
    except Exception:  # noqa: BLE001 - no kernel, or one too old: nothing to track
        return None
    if not isinstance(parent, dict) or parent.get("msg_type",
                                                  parent.get("header", {}).get("msg_type")) \
            != "execute_request":
        return None
    cell = (parent.get("metadata") or {}).get("cellId")
    run = (parent.get("header") or {}).get("msg_id")
    return (str(cell), str(run)) if cell and run else None


def adopt(widget: Any, run: tuple[str, str] | None = None) -> None:
    """Remember that the running cell (``run``, default :func:`current_run`) made
    ``widget``; the first widget made by a later run of that cell closes the widgets
    made by the earlier runs (their output was replaced)."""
    run = run if run is not None else current_run()
    if run is None or not CLOSE_ON_RERUN:
        return
    cell, run_id = run
    with _LOCK:
        previous_run, made = _BY_CELL.get(cell, (run_id, []))
        stale = [] if previous_run == run_id else made
        _BY_CELL[cell] = (run_id, [*([] if stale else made), weakref.ref(widget)])
    for ref in stale:
        old = ref()
        if old is not None and old is not widget:
            old.close()


class Closable:
    """Mixed in before ``W.VBox`` by every xaiwidgets widget: the widget is adopted by
    the cell that made it (:func:`adopt`), and ``close()`` drops its caches
    (:meth:`release`) and closes every ipywidget it made (:func:`close_tree`), once.

    >>> import ipywidgets as W
    >>> class Panel(Closable, W.VBox): pass
    >>> p = Panel([W.Button()]); p.close(); p.children[0].comm is None
    True
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._closed = False
        adopt(self)

    def release(self) -> None:
        """Drop what the widget caches (models' activations, maps); subclasses extend it."""

    def close(self) -> None:
        """Close the widget and every ipywidget it made, and free its caches."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self.release()
        close_tree(self)


def _holds(cell: Any, obj: Any) -> bool:
    try:
        return cell.cell_contents is obj
    except ValueError:  # an empty cell
        return False
