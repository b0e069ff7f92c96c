"""This backend's statements and scans: what llm.progress and EXPLAIN ANALYZE need from the FDW.

Each request a scan sends carries, in its RequestContext, this backend's pid, an id of the
statement it belongs to and how many prompts or texts the statement's scans have planned so far
(stamp), so the sidecar can count per statement (the Progress RPC, llm.progress).  The host
tells Python nothing about statements, so their bounds are inferred from the scans:

- a statement begins when a scan starts (execute()) while no scan of this backend is open; a
  scan is open from its first execute() until its table's end_scan() (the executor's end), so
  the rescans of a nested loop (one execute() per outer row or batch) stay in one statement;
- an aborted statement never reaches end_scan(): its scans' generators are closed instead (the
  host drops them with the query's memory), and the next planning with no scan running
  (planning(): the planner asks every table for its size) forgets the open scans.  A statement
  run from a cached plan right after an aborted one (a prepared statement) continues the
  aborted one's id; its counts then start from what that one had done.

Each scan also counts what its rows say (rows, tokens, model time), which EXPLAIN ANALYZE shows
for its node: explain() runs after the scan and before end_scan(), which drops the counts, so a
plain EXPLAIN (no execute) shows none.  Two nodes of one foreign table in one statement share
their table's FDW instance, and so their counts.
"""
from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


@dataclass
class Statement:
    """A statement of this backend: its id and the items (prompts, texts) its scans planned."""
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    total: int = 0


@dataclass
class Counts:
    """What a node's rows said, for EXPLAIN ANALYZE."""
    rows: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    compute_ms: float = 0.0
    timed: bool = False   # some row carried compute_ms (completions do, embeddings do not)

    def add(self, row: Any) -> None:
        self.rows += 1
        if not isinstance(row, dict):
            return
        self.input_tokens += row.get("input_tokens") or 0
        self.output_tokens += row.get("output_tokens") or 0
        if row.get("compute_ms") is not None:
            self.compute_ms += row["compute_ms"]
            self.timed = True

    def lines(self) -> list[str]:
        time = f", model time: {self.compute_ms:,.1f} ms" if self.timed else ""
        return [f"sidecar answers: {self.rows:,} rows, tokens: {self.input_tokens:,} in, "
                f"{self.output_tokens:,} out{time}"]


@dataclass
class Scan:
    """One execute() of a table: its statement, what it planned, and whether it may use the
    sidecar's result cache."""
    statement: Statement
    counts: Counts
    kwargs: dict[str, Any]
    planned: int | None = None
    cache: bool = True

    def plan(self, items: int) -> None:
        """The scan will send `items` prompts or texts (counted once per scan)."""
        if self.planned is None:
            self.planned = items
            self.statement.total += items


class _Backend:
    """The state of this backend (one process, one Python interpreter)."""

    def __init__(self) -> None:
        self.statement: Statement | None = None
        self.open: set[int] = set()           # id() of the tables with a scan open (see the docstring)
        self.counts: dict[int, Counts] = {}   # per open table: for EXPLAIN ANALYZE
        self.live = 0                         # execute() generators not yet closed


_backend = _Backend()


def begin_scan(table: object, kwargs: dict[str, Any]) -> Scan:
    if not _backend.open or _backend.statement is None:
        _backend.statement = Statement()
        _backend.counts.clear()
    _backend.open.add(id(table))
    counts = _backend.counts.setdefault(id(table), Counts())
    return Scan(_backend.statement, counts, kwargs)


def end_scan(table: object) -> None:
    """The executor ended the table's scans (end_scan())."""
    _backend.open.discard(id(table))
    _backend.counts.pop(id(table), None)


def planning() -> None:
    """A statement is being planned: with no scan running, any scan still open belongs to a
    statement that was aborted (see the module docstring)."""
    if not _backend.live:
        _backend.open.clear()
        _backend.counts.clear()


def counts(table: object) -> Counts | None:
    """The table's counts in the running statement (None: it has not executed since its end)."""
    return _backend.counts.get(id(table))


def stamp(context: Any, scan: Scan | None) -> None:
    """Fill a RequestContext's statement fields (the pid is the session's: see tables._context)."""
    if scan is None:
        return
    context.statement = scan.statement.id
    context.statement_total = scan.statement.total
    context.no_cache = not scan.cache


def tracked(execute: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    """Wrap a table's execute(): the scan opens before its first row, its rows are counted, and
    `self._scan` is this scan whenever its code runs (two scans of one table may interleave:
    each request is stamped with its own scan's statement and cache choice)."""

    @functools.wraps(execute)
    def run(self: Any, quals: Any, columns: Any, **kwargs: Any) -> Iterator[Any]:
        scan = begin_scan(self, kwargs)
        _backend.live += 1
        rows = execute(self, quals, columns, **kwargs)
        try:
            while True:
                self._scan = scan
                try:
                    row = next(rows)
                except StopIteration:
                    return
                scan.counts.add(row)
                yield row
        finally:
            _backend.live -= 1
            self._scan = None
            rows.close()

    return run
