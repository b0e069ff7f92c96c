"""Recent requests: a bounded window of finished requests, what the Requests RPC returns.

The servicer records each finished request once (in _finish, beside the usage book and the
metrics), whatever its outcome, when it was authenticated: as with the usage book, a caller
cannot make records for tenants it cannot authenticate as.  Calls of the Requests RPC itself are
not recorded, so a dashboard that reads the window every few seconds does not fill it.

The window is bounded two ways, both set in the sidecar's YAML (`history`, see config.py):
at most `max_rows` records (all tenants together: one fixed memory bound for the sidecar, a few
hundred bytes a record) and none older than `max_age_seconds`.  A record leaves when either bound
says so; the oldest go first.  Records are appended as requests finish, so they are in order of
finishing; `at` is when a request arrived, so a long request is recorded after shorter ones that
arrived later.  Eviction by age looks at the finish time (the order of the deque), and reads
return records sorted by `at`.

A read names its tenant (the authenticated one; the servicer never passes another) and may carry
bounds on `at`: only records in range are returned, so `WHERE at > now() - interval '15 minutes'`
ships only the last 15 minutes.  Everything runs on the event loop: no lock is needed.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, replace

DEFAULT_MAX_ROWS = 10_000
DEFAULT_MAX_AGE_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class Record:
    """One finished request (the fields of RequestRecord in the proto)."""
    at_unix_ns: int           # arrival, wall clock
    tenant: str
    model: str
    kind: str                 # generate | embed | list_models | usage
    status: str               # OK or the status code's name
    queue_ns: int
    first_token_ns: int | None
    total_ns: int
    input_tokens: int
    output_tokens: int
    embedded_inputs: int
    compute_ns: int
    request_id: str
    finished_unix_ns: int = 0   # when it was recorded (the window's order)


@dataclass(frozen=True)
class Bounds:
    """A range on `at` (Unix ns); None is unbounded on that side."""
    after: int | None = None
    after_inclusive: bool = False
    before: int | None = None
    before_inclusive: bool = False

    def __contains__(self, at: int) -> bool:
        if self.after is not None and (at < self.after or (at == self.after and not self.after_inclusive)):
            return False
        if self.before is not None and (at > self.before or (at == self.before and not self.before_inclusive)):
            return False
        return True


class History:
    def __init__(self, max_rows: int = DEFAULT_MAX_ROWS, max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS,
                 clock=time.time_ns) -> None:
        self.max_rows = max_rows
        self.max_age_seconds = max_age_seconds
        self._clock = clock
        self._records: deque[Record] = deque(maxlen=max_rows)

    def __len__(self) -> int:
        return len(self._records)

    def record(self, record: Record) -> None:
        now = self._clock()
        if not record.finished_unix_ns:
            record = replace(record, finished_unix_ns=now)
        self._records.append(record)   # a full deque(maxlen) drops its oldest
        self._expire(now)

    def _expire(self, now: int) -> None:
        oldest = now - int(self.max_age_seconds * 1e9)
        while self._records and self._records[0].finished_unix_ns < oldest:
            self._records.popleft()

    def rows(self, tenant: str, bounds: Bounds = Bounds()) -> list[Record]:
        """One tenant's records within `bounds`, by arrival time."""
        self._expire(self._clock())
        return sorted((r for r in self._records if r.tenant == tenant and r.at_unix_ns in bounds),
                      key=lambda r: r.at_unix_ns)

