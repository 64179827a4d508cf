"""The package's layers import only downward, and never form a cycle.

core → explainer → families/net → fusion → evaluation → data/models → widgets. Read from
the source with ``ast`` (imports inside functions count too), so a lazy import cannot
hide a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "xaiwidgets"

#: layer of each module prefix (longest prefix wins); a module may import its own layer
#: and the layers with a smaller number
LAYERS = {
    "xaiwidgets.core": 0,
    "xaiwidgets._version": 0,
    "xaiwidgets.explainer": 1,
    "xaiwidgets.families": 2,
    "xaiwidgets.net": 2,  # the NET runtime: imports core only; families.mlfem runs it
    "xaiwidgets.fusion": 3,
    "xaiwidgets.rendering": 3,
    "xaiwidgets.evaluation": 4,
    "xaiwidgets.datasets": 5,
    "xaiwidgets.concepts": 5,
    "xaiwidgets.models": 5,
    "xaiwidgets.widgets": 6,
}
WIDGET_LIBRARIES = ("ipywidgets", "plotly", "anywidget")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            target = node.module if not node.level else (
                f"{base}.{node.module}" if node.module else base)
            found.update(f"{target}.{alias.name}" for alias in node.names)
            found.add(target)
    return found


def layer(name: str) -> int | None:
    matches = [prefix for prefix in LAYERS if name == prefix or name.startswith(prefix + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
# the package __init__ files only gather public names: the graph is between modules
GRAPH = {
    name: {target for target in imports(path) if target in MODULES and target != name
           and not MODULES[target].name == "__init__.py"}
    for name, path in MODULES.items() if path.name != "__init__.py"
}


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_only_go_downward(name):
    own = layer(name)
    assert own is not None, f"{name} belongs to no layer: add it to LAYERS"
    upward = sorted(t for t in GRAPH[name] if (layer(t) or 0) > own)
    assert not upward, f"{name} (layer {own}) imports higher layers: {upward}"


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_only_widgets_import_widget_libraries(name):
    if name.startswith("xaiwidgets.widgets"):
        return
    used = sorted(t for t in imports(MODULES[name]) if t.split(".")[0] in WIDGET_LIBRARIES)
    assert not used, f"{name} imports {used}: only xaiwidgets.widgets may"


def test_no_import_cycles():
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in GRAPH.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in GRAPH:
        if node not in state:
            visit(node, [])


def test_explainer_and_families_do_not_import_each_other_upward():
    assert not any(t.startswith("xaiwidgets.families") for t in GRAPH["xaiwidgets.explainer"])
    for name in GRAPH:
        if name.startswith("xaiwidgets.families"):
            assert "xaiwidgets.explainer" not in GRAPH[name], name


def test_importing_the_engine_loads_no_widget_library():
    code = ("import sys, xaiwidgets as xw; xw.methods(); "
            f"print([m for m in {WIDGET_LIBRARIES!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_no_source_cites_a_file_outside_the_repository():
    for name, path in MODULES.items():
        text = path.read_text()
        assert "SPEC" + ".md" not in text and "../" + "shared" not in text, name
