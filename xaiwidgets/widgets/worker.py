"""A one-thread background worker whose newest job supersedes the running one.

Widgets hand their slow work (explanations, evaluations) to a :class:`Worker` so a
control change returns at once. Each :meth:`Worker.submit` bumps a *generation*;
the running job, holding an older :class:`Token`, is stale from then on:

* it stops at its next chunk, because the engine's progress callback calls
  :meth:`Worker.check` (or ``token.check()``), which raises :class:`Superseded`;
* it can never show a result, because drawing happens inside
  :meth:`Worker.publishing`, which raises :class:`Superseded` for a stale token
  and holds the lock that :meth:`submit` takes (no new job can start mid-draw).

With ``background=False`` a job runs in the caller's thread before ``submit``
returns (scripts, tests: synchronous, as without a worker).

>>> shown = []
>>> worker = Worker(background=False)
>>> def job(token):
...     for step in range(3):
...         token.check()              # the cancellation point of each chunk
...     with worker.publishing(token):  # only the newest job gets here
...         shown.append("result")
>>> worker.submit(job)
1
>>> shown
['result']
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

__all__ = ["Cancelled", "Superseded", "Token", "Worker", "in_kernel"]

log = logging.getLogger(__name__)


class Superseded(Exception):
    """Raised at a cancellation point of a job that a newer request replaced."""


class Cancelled(Superseded):
    """Raised at a cancellation point of a job that :meth:`Worker.cancel` stopped."""


class Token:
    """What a job receives: its generation, and a way to ask whether it is stale."""

    def __init__(self, worker: Worker, generation: int) -> None:
        self.worker = worker
        self.generation = generation

    @property
    def stale(self) -> bool:
        """True once a newer job was submitted (or the job was cancelled)."""
        return self.generation != self.worker.generation

    def check(self) -> None:
        """Raise :class:`Superseded` (or :class:`Cancelled`) when the job is stale."""
        if self.stale:
            raise (Cancelled if self.worker.cancelled else Superseded)(
                f"job {self.generation} replaced by {self.worker.generation}")


Job = Callable[[Token], None]


class Worker:
    """One daemon thread running the newest submitted job; older ones are dropped.

    Parameters
    ----------
    background
        ``True``: :meth:`submit` returns at once and the job runs in the worker thread.
        ``False``: :meth:`submit` runs the job before returning.
    name
        The thread's name (shown in debuggers).

    A job is ``job(token)``. It should call ``token.check()`` (or :meth:`check`, which
    finds the running job's token) between chunks, and draw inside
    ``with worker.publishing(token):``. :class:`Superseded` ends a job quietly;
    any other exception is the job's to handle (it is logged, and the thread lives on).
    """

    def __init__(self, background: bool = True, name: str = "xaiwidgets-worker") -> None:
        self.background = background
        self.name = name
        #: bumped by every submit and cancel; a job whose token differs is stale
        self.generation = 0
        #: True when the last bump was a cancel (stale jobs then raise Cancelled)
        self.cancelled = False
        self.lock = threading.RLock()
        self._changed = threading.Condition(self.lock)
        self._pending: tuple[Job, Token] | None = None
        self._running: Token | None = None
        self._thread: threading.Thread | None = None
        self._local = threading.local()
        self._closed = False

    # ----------------------------------------------------------------- requests
    def submit(self, job: Job) -> int:
        """Run ``job`` (newest wins: the running job is superseded); its generation."""
        with self.lock:
            if self._closed:
                raise RuntimeError("this worker is closed")
            self.generation += 1
            self.cancelled = False
            token = Token(self, self.generation)
            if not self.background:
                self._pending = None
            else:
                self._pending = (job, token)
                self._ensure_thread()
                self._changed.notify_all()
                return token.generation
        self._run(job, token)  # synchronous: in the caller's thread, outside the lock
        return token.generation

    def cancel(self) -> bool:
        """Stop the running job at its next chunk and drop a pending one.

        Returns True when there was something to cancel.
        """
        with self.lock:
            active = self._running is not None or self._pending is not None
            self.generation += 1
            self.cancelled = True
            self._pending = None
            self._changed.notify_all()
            return active

    # ------------------------------------------------------------------- state
    @property
    def busy(self) -> bool:
        """True while a job runs or waits to run."""
        with self.lock:
            return self._running is not None or self._pending is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no job runs or waits (the newest one has finished); False on timeout."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("wait() called from the worker's own job would never return")
        with self._changed:
            return self._changed.wait_for(lambda: not self.busy, timeout=timeout)

    @property
    def token(self) -> Token | None:
        """The token of the job running in the calling thread (``None`` outside jobs)."""
        return getattr(self._local, "token", None)

    def check(self) -> None:
        """Inside a job: raise :class:`Superseded` when it is stale. Elsewhere: nothing."""
        if self.token is not None:
            self.token.check()

    @contextlib.contextmanager
    def publishing(self, token: Token) -> Iterator[None]:
        """Hold the lock while a job shows its result; raise :class:`Superseded` if stale.

        :meth:`submit` waits for the block to end, so what is drawn here is never
        replaced by an older job's drawing.
        """
        with self.lock:
            token.check()
            yield

    def close(self) -> None:
        """Cancel the work and end the thread (a closed worker takes no jobs)."""
        with self.lock:
            self._closed = True
        self.cancel()

    # ------------------------------------------------------------------ thread
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:  # closed
                    return
                job, token = self._pending
                self._pending = None
            self._run(job, token)

    def _run(self, job: Job, token: Token) -> None:
        with self.lock:
            self._running = token
        self._local.token = token
        try:
            if not token.stale:
                job(token)
        except Superseded:
            pass
        except Exception:  # a job handles its own errors; never let the thread die
            log.exception("background job %s failed", token.generation)
        finally:
            self._local.token = None
            with self._changed:
                self._running = None
                self._changed.notify_all()


def in_kernel() -> bool:
    """True inside a running Jupyter kernel (``get_ipython()`` has a ``kernel``).

    >>> in_kernel()
    False
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None
