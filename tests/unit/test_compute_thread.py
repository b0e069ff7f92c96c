"""engines/compute_thread.ComputeThread: one thread at a time, ended when idle, restarted on demand."""
from __future__ import annotations

import threading
import time

import pytest

from llm_sidecar.engines.compute_thread import ComputeThread


def named(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def wait_for(condition, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_calls_run_in_order_on_one_thread_that_ends_when_idle_and_starts_again():
    started: list[int] = []
    pool = ComputeThread("ct-idle", initializer=lambda: started.append(threading.get_ident()), idle=0.1)
    futures = [pool.submit(lambda i=i: (i, threading.get_ident())) for i in range(20)]
    results = [f.result(timeout=5) for f in futures]
    assert [i for i, _ in results] == list(range(20))
    assert len({ident for _, ident in results}) == 1 and started == [results[0][1]]
    assert wait_for(lambda: not named("ct-idle")), "the idle thread did not end"
    assert pool.submit(threading.get_ident).result(timeout=5) == started[1]   # a fresh one, initialized
    assert len(started) == 2


def test_an_exception_reaches_the_caller_and_the_thread_goes_on():
    pool = ComputeThread("ct-error", idle=0.1)
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(timeout=5)
    assert pool.submit(lambda: 42).result(timeout=5) == 42


def test_work_submitted_as_the_thread_times_out_is_not_lost():
    pool = ComputeThread("ct-race", idle=0.001)
    for _ in range(300):   # submits land just before, at and after the idle timeout
        assert pool.submit(lambda: 1).result(timeout=5) == 1
        time.sleep(0.001)


def test_shutdown_refuses_new_work_and_cancels_queued_work():
    gate = threading.Event()
    pool = ComputeThread("ct-shutdown", idle=0.1)
    running = pool.submit(gate.wait, 5)
    assert wait_for(running.running)
    queued = pool.submit(lambda: "never")
    pool.shutdown(cancel_futures=True)
    gate.set()
    assert running.result(timeout=5) is True and queued.cancelled()
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(lambda: 1)
