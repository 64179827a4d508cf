"""Wall-clock timing that is fair under background load.

Every implementation of a method runs once to warm up, then ``repeats`` rounds in
which each implementation runs once, in a rotated order; the reported number is the
median over rounds. Interleaving means a burst of load from another process hits
all implementations alike instead of one of them.

>>> import torch
>>> samples = interleaved({"a": lambda: None, "b": lambda: None},
...                       torch.device("cpu"), repeats=3)
>>> sorted(samples), len(samples["a"])
(['a', 'b'], 3)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: ``"wall"``: elapsed time (what a user waits); ``"cpu"``: CPU seconds of this process,
#: all threads, which a busy shared machine disturbs much less (CPU runs only)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def use_clock(name: str) -> None:
    """Select the clock of every later measurement (``"wall"`` or ``"cpu"``)."""
    global clock
    clock = CLOCKS[name]


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, GPU work included."""
    sync(device)
    start = clock()
    fn()
    sync(device)
    return clock() - start


def interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    repeats: int,
    warmup: int = 1,
    before: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every function in ``fns``: warm-up, then interleaved rounds.

    ``before(name)`` runs ahead of each call, outside the timer (e.g. to drop a cache).
    A function that raises is dropped from later rounds; its entry keeps the error
    message as a one-element list of ``str`` instead of times.
    """
    names = list(fns)
    samples: dict[str, list] = {name: [] for name in names}
    failed: dict[str, str] = {}

    def run(name: str, timed: bool) -> None:
        if name in failed:
            return
        if before is not None:
            before(name)
        try:
            seconds = time_once(fns[name], device)
        except Exception as err:  # a peer that cannot handle this model: report, go on
            failed[name] = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            return
        if timed:
            samples[name].append(seconds)

    for _ in range(warmup):
        for name in names:
            run(name, timed=False)
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            run(name, timed=True)
    for name, message in failed.items():
        samples[name] = [message]
    return samples


def median(samples: list) -> float | None:
    """Median of timing samples; ``None`` when the implementation failed or is absent."""
    if not samples or not all(isinstance(s, float) for s in samples):
        return None
    return statistics.median(samples)
