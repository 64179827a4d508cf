"""Closing a widget frees it; re-running a notebook cell closes the widgets its earlier run
made. Before: ``close()`` closed only the outer box, so ipywidgets' registry kept ~200
child widgets per ExplainerWidget, and their callbacks kept the widget, its Explainers and
19 MiB of tensors alive; 30 minutes of simulated class use grew by 849 MiB."""

from __future__ import annotations

import gc
import json
import textwrap
import weakref
from collections.abc import Callable

import ipywidgets as W
import numpy as np
import pytest
import torch

import xaiwidgets as xw
from xaiwidgets.widgets import lifecycle


def registered() -> int:
    """Widgets in ipywidgets' registry (every widget not yet closed)."""
    return len(W.widgets.widget._instances)


@pytest.fixture(scope="module")
def shapes():
    model, preprocess, classes = xw.models.load("shapes-vgg")
    return model, preprocess, classes, xw.datasets.shapes(n=12, size=64, seed=5)


def _explainer(model, preprocess, classes, ds):
    w = xw.ExplainerWidget(model, ds.isel(image=slice(0, 3)), preprocess=preprocess,
                           classes=classes, methods=("gradcam", "lrp", "fem"),
                           background=False)
    w.controls["method"].value = "lrp"  # a kept graph: the heaviest cache
    return w


def _explorer(model, preprocess, classes, ds):
    x = xw.DatasetExplorer(model, ds, preprocess=preprocess, methods=("gradcam",),
                           background=False, page_size=4)
    x.select(x.shown[0])
    x.select(x.shown[1])  # the first embedded ExplainerWidget is closed by the second
    return x


def _concepts(model, preprocess, classes, ds):
    c = xw.ConceptExplorer(model, ds, preprocess=preprocess, classes=classes,
                           background=False)
    c.select_channel(int(c.channels.channel.values[1]))  # rebuilds the patch gallery
    return c


MAKERS: dict[str, Callable] = {
    "ExplainerWidget": _explainer,
    "FEMStackWidget": lambda m, p, c, ds: xw.FEMStackWidget(
        m, ds.isel(image=slice(0, 2)), preprocess=p, classes=c, background=False),
    "CompareWidget": lambda m, p, c, ds: xw.CompareWidget(
        m, ds.isel(image=slice(0, 2)), methods=("gradcam", "gradient"), preprocess=p,
        classes=c, background=False),
    "DatasetExplorer": _explorer,
    "ConceptExplorer": _concepts,
    "LookWidget": lambda m, p, c, ds: xw.LookWidget(ds.image.values[:2]),
    "SanityQuiz": lambda m, p, c, ds: xw.SanityQuiz(
        m, torch.as_tensor(ds.image.values[:2]), method="gradient", preprocess=p, seed=1),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_close_frees_every_widget_it_made_and_the_object(shapes, name):
    before = registered()
    widget = MAKERS[name](*shapes)
    made = registered() - before
    assert made > 10  # controls, figures, layouts...
    ref = weakref.ref(widget)
    widget.close()
    widget.close()  # twice is harmless
    assert registered() == before, f"{registered() - before} of {made} widgets left open"
    del widget
    gc.collect()
    assert ref() is None, "the closed widget is still referenced (its caches with it)"


def test_a_rebuilt_gallery_closes_the_widgets_it_replaced(shapes):
    c = _concepts(*shapes)
    try:
        count = registered()
        for rank in (0, 2, 3, 0):
            c.select_channel(int(c.channels.channel.values[rank]))
        assert registered() == count
    finally:
        c.close()


def test_adopt_closes_the_earlier_runs_widgets_of_the_same_cell_only():
    made = []

    def make(run):
        box = W.VBox([W.Button()])
        closable = type("Panel", (lifecycle.Closable, W.VBox), {})([box])
        lifecycle.adopt(closable, run)
        made.append(closable)
        return closable

    a1, a2 = make(("cell-a", "run-1")), make(("cell-a", "run-1"))  # one run, two widgets
    b1 = make(("cell-b", "run-2"))
    assert all(w.comm is not None for w in (a1, a2, b1))
    a3 = make(("cell-a", "run-3"))  # cell a runs again
    assert a1.comm is None and a2.comm is None and a1.children[0].comm is None
    assert b1.comm is not None and a3.comm is not None
    a4 = make(("cell-a", "run-4"))
    assert a3.comm is None and a4.comm is not None
    previous = lifecycle.CLOSE_ON_RERUN
    lifecycle.CLOSE_ON_RERUN = False
    try:
        make(("cell-a", "run-5"))
        assert a4.comm is not None
    finally:
        lifecycle.CLOSE_ON_RERUN = previous
        for w in made:
            w.close()
    assert lifecycle.current_run() is None  # no kernel here


def test_a_real_kernel_closes_a_cells_widgets_when_the_cell_runs_again():
    """A real ipykernel, sent execute requests with a cell id as JupyterLab 4 and
    Notebook 7 send them: the second run of the same cell leaves as many widgets
    registered as the first did; another cell's widgets stay."""
    jupyter_client = pytest.importorskip("jupyter_client")
    manager, client = jupyter_client.manager.start_new_kernel(kernel_name="python3")
    try:
        def run(code: str, cell: str) -> str:
            msg = client.session.msg("execute_request", {
                "code": textwrap.dedent(code), "silent": False, "store_history": True,
                "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
                metadata={"cellId": cell})
            client.shell_channel.send(msg)
            reply = client.get_shell_msg(timeout=180)
            assert reply["content"]["status"] == "ok", reply["content"]
            out = []
            while True:
                m = client.get_iopub_msg(timeout=60)
                if m["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
                    continue
                if m["msg_type"] == "stream":
                    out.append(m["content"]["text"])
                if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                    return "".join(out)

        run("""
            import ipywidgets as W, numpy as np, xaiwidgets as xw
            images = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
            count = lambda: print(len(W.widgets.widget._instances))
        """, "setup")
        make = "g = xw.LookWidget(images); count()"
        first = int(run(make, "cell-1"))
        again = [int(run(make, "cell-1")) for _ in range(2)]
        assert again == [first, first]
        other = int(run("h = xw.LookWidget(images); count()", "cell-2"))
        assert other > first  # another cell's widget does not close cell 1's
        assert json.loads(run("print(str(g.comm is not None).lower())", "cell-3"))
        # a widget a background thread makes while cell 1 runs (an explorer's worker
        # opening an image) belongs to no cell: cell 1's next run leaves it open
        run("""
            import threading
            go, made = threading.Event(), []
            maker = threading.Thread(target=lambda: go.wait() and made.append(
                xw.LookWidget(images)))
            maker.start()
        """, "cell-4")
        run("go.set(); maker.join(); g = xw.LookWidget(images)", "cell-1")
        run("g = xw.LookWidget(images)", "cell-1")
        assert json.loads(run("print(str(made[0].comm is not None).lower())", "cell-5"))
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def test_replace_children_keeps_the_children_shown_again():
    keep, drop = W.Button(), W.Button()
    box = W.VBox([keep, drop])
    lifecycle.replace_children(box, [keep, W.Button()])
    assert keep.comm is not None and drop.comm is None
    box.close()
    np.testing.assert_equal(len(lifecycle.widgets_of(box)) >= 3, True)
