"""Per-hop timestamps of one request through the sidecar, for bench/bench_hops.py.

Off unless the sidecar's environment has LLMFDW_HOPS=1 (read once, at import): then each Embed
and Generate call collects time.perf_counter_ns() marks as it passes each hop (received,
validated, admitted, queued, batch formed, forward pass, delivered, serialized, finished) and
sends them back in its trailing metadata (`llmfdw-hops`, JSON).  perf_counter_ns is
CLOCK_MONOTONIC on Linux, one clock for every process of the machine, so the benchmark lines
the sidecar's marks up with its own.  Off, a hop costs one call that finds the marks dict
(`Marks`) None and records nothing.

The marks travel with the request's asyncio context (a ContextVar, set by the handler), so the
batcher, which runs the handler's async generator in the handler's own task, picks them up
without an argument; its batch loop writes into the same dict from another task.
"""
from __future__ import annotations

import contextvars
import json
import os
import time

ENABLED = os.environ.get("LLMFDW_HOPS") == "1"
TRAILER = "llmfdw-hops"

Marks = dict[str, int]
_current: contextvars.ContextVar[Marks | None] = contextvars.ContextVar("llmfdw_hops", default=None)


def begin() -> Marks | None:
    """A new request's marks (its `received` mark set), current in this task; None when off."""
    if not ENABLED:
        return None
    marks = {"received": time.perf_counter_ns()}
    _current.set(marks)
    return marks


def current() -> Marks | None:
    """The marks of the request this task serves (None when off or outside a request)."""
    return _current.get() if ENABLED else None


def mark(marks: Marks | None, name: str) -> None:
    """Record hop `name` now (its first passage only: a streamed call passes some hops per batch)."""
    if marks is not None and name not in marks:
        marks[name] = time.perf_counter_ns()


def trailer(marks: Marks) -> tuple[tuple[str, str], ...]:
    """The marks as trailing metadata."""
    return ((TRAILER, json.dumps(marks)),)
