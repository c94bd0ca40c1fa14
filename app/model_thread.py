"""Run the model's work on the thread that serves the studio, not on Gradio's workers.

PyTorch on CPU parallelises each operation with an OpenMP team per calling thread. When
a second Python thread computes (Gradio runs handlers on worker threads) while the main
thread's team already exists, libgomp sees more threads than cores and stops spinning
between operations; a small model's thousands of tiny operations then wait on thread
wake-ups. Measured on the 2-core machine, the demo world's composite of four LoRAs took
5 s on the main thread and 14 s on a worker thread. So, while the studio is served with
:meth:`ModelThread.serve`, every call made through :meth:`ModelThread.run` executes on
the serving thread, one at a time; before that (tests, notebooks: ``block=False``) it
runs on the caller's thread, as any function call does.

A call runs in a copy of its caller's context variables: Gradio finds the event a
``gr.Progress`` reports to through them, so without the copy a run's "step k of n"
never reached the page.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")
POLL_SECONDS = 0.2


class ModelThread:
    """A queue of model calls that one serving thread drains."""

    def __init__(self) -> None:
        self.jobs: queue.Queue[tuple[Future, Callable, tuple, dict]] = queue.Queue()
        self.serving: int | None = None

    def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """``fn(*args, **kwargs)`` on the serving thread (its result, or its exception)."""
        if self.serving is None or self.serving == threading.get_ident():
            return fn(*args, **kwargs)
        future: Future = Future()
        self.jobs.put((future, contextvars.copy_context().run, (fn, *args), kwargs))
        return future.result()

    def serve(self, stop: threading.Event | None = None) -> None:
        """Run queued calls on this thread until ``stop`` is set (or Ctrl+C)."""
        self.serving = threading.get_ident()
        try:
            while stop is None or not stop.is_set():
                try:
                    future, fn, args, kwargs = self.jobs.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    continue
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    result = fn(*args, **kwargs)
                except Exception as error:  # handed to the caller, who reports it
                    future.set_exception(error)
                except BaseException as error:  # Ctrl+C: the caller hears of it, and serving ends
                    future.set_exception(error)
                    raise
                else:
                    future.set_result(result)
        finally:
            self.serving = None
            while not self.jobs.empty():  # nothing is left waiting forever
                self.jobs.get_nowait()[0].set_exception(RuntimeError("the studio is shutting down"))
