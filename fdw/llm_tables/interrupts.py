"""Whether Postgres wants the running query to stop, asked from the FDW's own Python.

A cancel (Ctrl-C, pg_cancel_backend, statement_timeout, a client gone away) only sets a flag in the
backend; Postgres acts on it at its next check, and while our Python runs, nothing of Postgres's own
checks.  So every stretch of Python that may take long asks: the client between gRPC messages
(client.py), and the loops over a query's values (keycolumns.py, tables.py), which for
`input = ANY(<200,000 texts>)` take hundreds of milliseconds; the host's own conversion of such an
array to a list asks too, every EVERY items (fdw/src/convert.c).  Only the llmfdw host can say:
Multicorn2's check_interrupts() longjmps out through the running Python frames (the gRPC call is
never cancelled and the backend's next statement crashed in tests/test_multicorn2.py), so under it
this answers False and a call ends only at its deadline (the server's timeout option).
"""
from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

from llm_tables.errors import QueryCanceled

try:  # inside the llmfdw host
    import _llmfdw_host as _host
except ImportError:  # under a real Multicorn2, or plain Python
    _host = None

T = TypeVar("T")
# Items between two checks in checked(): one check costs about a microsecond, and 4,096 items of
# the loops it guards take a few milliseconds.
EVERY = 4096


def pending() -> bool:
    """Whether Postgres asked the running query to stop."""
    return bool(_host.interrupt_pending()) if _host is not None else False


def can_wait() -> bool:
    """Whether wait_readable() sleeps in Postgres's own wait (inside the llmfdw host)."""
    return _host is not None and hasattr(_host, "wait_readable")


def wait_readable(fd: int, seconds: float) -> bool:
    """Sleep until fd is readable, a signal reaches the backend (a cancel, statement_timeout,
    termination: ask pending() next), or `seconds` pass, without the GIL; whether fd is readable.
    Only where can_wait()."""
    return bool(_host.wait_readable(fd, max(0, int(seconds * 1000))))


def check() -> None:
    """Raise QueryCanceled if Postgres asked the running query to stop (the host then reports
    Postgres's own error: "canceling statement due to user request", or the timeout)."""
    if pending():
        raise QueryCanceled("query canceled")


def checked(items: Iterable[T], every: int = EVERY) -> Iterator[T]:
    """`items`, asking Postgres every `every` items whether to stop (see check)."""
    for i, item in enumerate(items):
        if i % every == 0:
            check()
        yield item
