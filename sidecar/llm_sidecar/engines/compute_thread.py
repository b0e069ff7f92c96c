"""The thread a torch engine computes on, which ends when the engine is idle.

torch and llama.cpp share one libgomp in the sidecar (both link libgomp.so.1; the process loads
it once).  libgomp counts the threads of every OpenMP pool the process keeps, and while they
outnumber the CPUs it all but stops spinning at barriers (its "throttled" spin count, 100
rounds): a thread that waits goes to sleep in the kernel.  llama.cpp's ggml passes ~100 OpenMP
barriers per decoding step, so beside an embedding model that had merely run once (its compute
thread keeps a pool of `threads - 1` workers) each llama.cpp thread slept and woke 3,600 times a
second (against under 100 in a process without torch), and generation took 20-40% longer
(bench/bench_classify.py, 2 CPUs).

A thread's OpenMP pool is released when the thread ends.  So a torch engine's loading and
forward passes run on one thread that ends after IDLE_SECONDS without work, and the next call
starts a fresh one (a thread start and an OpenMP pool: well under a millisecond).  While
embeddings and generation both run, the CPUs are oversubscribed and libgomp's short spinning is
right; when only generation runs, llama.cpp gets its threads' full spin back.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Executor, Future
from typing import Any, Callable

# How long the compute thread waits for more work before it ends (and its OpenMP pool with it).
IDLE_SECONDS = 1.0


class ComputeThread(Executor):
    """An executor of one thread at a time, started on demand, that ends after `idle` seconds
    without work; `initializer` runs first on every new thread (torch's thread count is a
    setting of the calling thread)."""

    def __init__(self, name: str, initializer: Callable[[], Any] | None = None,
                 idle: float = IDLE_SECONDS) -> None:
        self._name = name
        self._initializer = initializer
        self._idle = idle
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = False      # a thread is alive and will look at the queue again
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name} is shut down")
            self._work.put((future, fn, args, kwargs))
            if not self._running:
                self._running = True
                threading.Thread(target=self._serve, name=self._name, daemon=True).start()
        return future

    def _serve(self) -> None:
        if self._initializer is not None:
            self._initializer()
        while True:
            try:
                future, fn, args, kwargs = self._work.get(timeout=self._idle)
            except queue.Empty:
                with self._lock:   # submit() puts under the lock: nothing can slip in between
                    if self._work.empty():
                        self._running = False
                        return
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as err:   # the caller gets it, as from ThreadPoolExecutor
                future.set_exception(err)
            del future, fn, args, kwargs   # nothing of the call outlives it on an idle thread

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new work; queued work still runs (unless cancel_futures), the thread then ends."""
        with self._lock:
            self._closed = True
        if cancel_futures:
            while True:
                try:
                    self._work.get_nowait()[0].cancel()
                except queue.Empty:
                    break
