"""How far each running statement is: the Progress RPC (llm.progress).

The FDW stamps each request's RequestContext with its backend pid, an id of the statement it
belongs to, and how many prompts or texts the statement's scans have planned so far.  The
servicer tells this book when a request of such a statement starts and ends; the book keeps,
per (tenant, pid, statement), what is done, what runs, the tokens (those of running requests
read live from their usage, which the engines fill in as they decode) and the cache hits.

Every count a caller sees only grows: the done count shown is a high-water mark (a call the
FDW cancels and sends again, an idle cursor's, would otherwise take back what it had done).

Bounded: an entry goes once its statement has been quiet (no request running, none arriving)
for quiet_seconds, and at most max_entries are kept (the least recently active quiet one goes
first, else the least recently active).  Everything runs on the event loop: no lock.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator

from llm_sidecar.metering import Metered

QUIET_SECONDS = 30.0
MAX_ENTRIES = 10_000
# Statuses after which a request's prompt or texts are done: OK, and the failures that concern
# that request alone (its row carries the error under on_error = 'null'; see the FDW's ROW_CODES)
DONE_STATUSES = ("OK", "INVALID_ARGUMENT", "INTERNAL")

Key = tuple[str, int, str]   # (tenant, backend pid, statement)


@dataclass
class Running:
    """A request being served: how many items it stands for, and its usage as it grows."""
    items: int
    usage: Metered
    embeds: bool   # its items are done one by one as texts come back (Embed, Chunk)


@dataclass
class Statement:
    """One statement's counters."""
    tenant: str
    pid: int
    statement: str
    database: str = ""
    role: str = ""
    model: str = ""
    started_ns: int = field(default_factory=time.time_ns)
    updated_ns: int = field(default_factory=time.time_ns)
    quiet_since: float | None = None   # monotonic: when its last running request ended
    total: int = 0
    done: int = 0          # items of finished requests
    shown_done: int = 0    # the high-water mark of what was reported
    requests: int = 0
    errors: int = 0
    input_tokens: int = 0  # of finished requests
    output_tokens: int = 0
    cache_hits: int = 0
    running: dict[int, Running] = field(default_factory=dict)

    def done_now(self) -> int:
        live = sum(min(r.items, r.usage.embedded_inputs)
                   for r in self.running.values() if r.embeds)
        self.shown_done = max(self.shown_done, self.done + live)
        return min(self.shown_done, self.total) if self.total else self.shown_done

    def tokens_now(self) -> tuple[int, int]:
        return (self.input_tokens + sum(r.usage.input_tokens for r in self.running.values()),
                self.output_tokens + sum(r.usage.output_tokens for r in self.running.values()))

    def hits_now(self) -> int:
        return self.cache_hits + sum(r.usage.cache_hits for r in self.running.values())


@dataclass(frozen=True)
class Snapshot:
    """What the Progress RPC returns for one statement."""
    stmt: Statement
    done: int
    input_tokens: int
    output_tokens: int
    cache_hits: int
    elapsed_ns: int
    remaining_ns: int | None


class ProgressBook:
    def __init__(self, quiet_seconds: float = QUIET_SECONDS, max_entries: int = MAX_ENTRIES) -> None:
        self.quiet_seconds = quiet_seconds
        self.max_entries = max_entries
        self._entries: OrderedDict[Key, Statement] = OrderedDict()   # least recently active first

    def __len__(self) -> int:
        return len(self._entries)

    def started(self, tenant: str, pid: int, statement: str, total: int, request: int, items: int,
                usage: Metered, *, embeds: bool, model: str, database: str = "", role: str = "") -> Key | None:
        """A request of (tenant, pid, statement) starts; `request` identifies it until finished().
        None (not tracked) when the request names no backend or statement."""
        if not pid or not statement:
            return None
        self._expire()
        key = (tenant, pid, statement)
        stmt = self._entries.get(key)
        if stmt is None:
            self._make_room()
            stmt = self._entries[key] = Statement(tenant, pid, statement, database, role)
        self._entries.move_to_end(key)
        stmt.model, stmt.total = model, max(stmt.total, total)
        stmt.updated_ns, stmt.quiet_since = time.time_ns(), None
        stmt.running[request] = Running(items, usage, embeds)
        return key

    def finished(self, key: Key | None, request: int, status: str) -> None:
        stmt = self._entries.get(key) if key is not None else None
        run = stmt.running.pop(request, None) if stmt is not None else None
        if run is None:
            return
        stmt.requests += 1
        stmt.errors += status != "OK"
        if status in DONE_STATUSES:
            stmt.done += run.items
        elif run.embeds:
            stmt.done += min(run.items, run.usage.embedded_inputs)
        stmt.input_tokens += run.usage.input_tokens
        stmt.output_tokens += run.usage.output_tokens
        stmt.cache_hits += run.usage.cache_hits
        stmt.updated_ns = time.time_ns()
        self._entries.move_to_end(key)
        if not stmt.running:
            stmt.quiet_since = time.monotonic()

    def rows(self, tenant: str) -> Iterator[Snapshot]:
        """The tenant's statements, latest activity first."""
        self._expire()
        now = time.time_ns()
        for stmt in reversed(self._entries.values()):
            if stmt.tenant != tenant:
                continue
            done = stmt.done_now()
            tokens_in, tokens_out = stmt.tokens_now()
            elapsed = max(0, now - stmt.started_ns)
            remaining = (elapsed * (stmt.total - done) // done) if stmt.total and done else None
            yield Snapshot(stmt, done, tokens_in, tokens_out, stmt.hits_now(), elapsed, remaining)

    def _expire(self) -> None:
        """Drop the statements quiet for quiet_seconds.  The entries are in order of their latest
        activity, so the walk stops at the first quiet one that is recent enough (running ones,
        at most the requests in flight, are stepped over)."""
        cutoff = time.monotonic() - self.quiet_seconds
        old = []
        for key, stmt in self._entries.items():
            if stmt.quiet_since is None:
                continue
            if stmt.quiet_since >= cutoff:
                break
            old.append(key)
        for key in old:
            del self._entries[key]

    def _make_room(self) -> None:
        while len(self._entries) >= self.max_entries:
            quiet = next((k for k, s in self._entries.items() if not s.running), None)
            del self._entries[quiet if quiet is not None else next(iter(self._entries))]
