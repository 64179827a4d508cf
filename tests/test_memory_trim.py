"""core/memory.py: freed heap handed back to the OS after explanations (glibc's
malloc_trim), rate-limited, harmless where there is no glibc. The resident-memory
figures themselves are measured by ``python -m benchmarks.memory rounds``."""

from __future__ import annotations

import sys

import pytest

import xaiwidgets as xw
from xaiwidgets.core import memory

from .conftest import make_tiny_cnn


def test_every_explanation_offers_its_freed_memory_back(monkeypatch, images):
    calls = []
    monkeypatch.setattr(memory, "release_memory", lambda force=False: calls.append(force))
    ex = xw.Explainer(make_tiny_cnn(), images, progress=False)
    ex.explain("gradient")
    ex.explain("lrp")
    assert calls == [False, False]  # not forced: the helper's own limits apply


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc is Linux's")
def test_trims_when_forced_then_only_after_growth_and_time(monkeypatch):
    trims = []
    real = memory._malloc_trim()
    if real is None:
        pytest.skip("this Linux has no glibc (musl)")
    monkeypatch.setattr(memory, "_TRIM", [lambda pad: trims.append(pad) or 1])
    assert memory.release_memory(force=True) and trims == [0]
    assert not memory.release_memory()  # within INTERVAL of the last trim
    monkeypatch.setattr(memory, "INTERVAL", 0.0)
    assert not memory.release_memory()  # no growth since the last trim
    monkeypatch.setitem(memory._STATE, "rss", memory.resident_bytes() - 2 * memory.GROWTH)
    assert memory.release_memory() and trims == [0, 0]
    assert real(0) in (0, 1)  # the real one runs too


def test_harmless_without_glibc_or_when_switched_off(monkeypatch, images):
    monkeypatch.setattr(memory, "_TRIM", [None])  # macOS, Windows, musl
    assert memory.release_memory(force=True) is False
    xw.Explainer(make_tiny_cnn(), images, progress=False).explain("gradient")  # no error
    monkeypatch.setattr(memory, "_TRIM", [lambda pad: pytest.fail("trimmed while off")])
    monkeypatch.setattr(memory, "ENABLED", False)
    assert memory.release_memory(force=True) is False
    assert memory.resident_bytes() >= 0
