"""Recent requests: a bounded window per tenant of finished requests, what the Requests RPC returns.

The servicer records each finished request once (in _finish, beside the usage book and the
metrics), whatever its outcome, when it was authenticated: as with the usage book, a caller
cannot make records for tenants it cannot authenticate as.  Calls of the Requests RPC itself are
not recorded, so a dashboard that reads the window every few seconds does not fill it.

Each tenant has a window of its own, so no tenant can push out another's records (one window
for all once let a role that can only read llm.models, scanning it 10,500 times, empty another
tenant's 9,999 rows).  A window has two lanes:

- model requests (generate, embed): the last `max_rows` of the tenant's;
- metadata reads (list_models, usage): the last METADATA_ROWS of the tenant's.  They are kept,
  so llm.requests still shows who read the models or the usage, but in a lane of their own:
  a dashboard that scans llm.models every few seconds cannot crowd out the model requests,
  which are what the window is for (latency, queue time, errors).

No record is older than `max_age_seconds` (both lanes); a window whose newest record is older
goes altogether.  Records are appended as requests finish, so a lane is in order of finishing;
`at` is when a request arrived, so a long request is recorded after shorter ones that arrived
later.  Eviction by age looks at the finish time (the order of the lanes), and reads return
records sorted by `at`.

The number of windows is bounded too (`max_tenants`), so memory is: at most
max_tenants x (max_rows + METADATA_ROWS) records, about 475 bytes each (tracemalloc, windows
filled to the defaults' bounds, 32 x 10,100 records: 153 MB at worst).
A tenant that has no window while max_tenants exist takes the window of the least recently
written tenant, with one exception: tenants named in the config (`tenants:`) are `configured`
and an unconfigured tenant never takes their windows (its record is dropped when every window
is a configured tenant's).  The trade-off:

- With `auth: required` only configured tenants are authenticated, so only they ever get a
  window: with max_tenants >= the number of tenants, no tenant ever loses its window to another.
- With `auth: off` the tenant is whatever the caller names (through SQL: a server or user
  mapping option `tenant`, which only a superuser can set, else the database's name).  A caller
  able to name many tenants (a role that may create databases, or any process that can reach
  the sidecar's socket directly) can make max_tenants windows and so push out the window of an
  unconfigured tenant that has not written since, all of it at once.  It cannot push out a
  configured tenant's: list the tenants whose history matters under `tenants:` (limits may be
  left to the defaults), and keep max_tenants above their number.  Without authentication the
  sidecar cannot tell a real tenant from a made-up name; the bound keeps its memory fixed, and
  a caller that can name any tenant could read that tenant's window anyway.

A read names its tenant (the authenticated one; the servicer never passes another) and may carry
bounds on `at`: only records in range are returned, so `WHERE at > now() - interval '15 minutes'`
ships only the last 15 minutes.  A read does not count as a write for eviction.  Everything runs
on the event loop: no lock is needed.
"""
from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

DEFAULT_MAX_ROWS = 10_000
DEFAULT_MAX_AGE_SECONDS = 3600.0
DEFAULT_MAX_TENANTS = 32
METADATA_ROWS = 100            # per tenant: its last list_models and usage calls
MODEL_KINDS = frozenset({"generate", "embed", "rerank"})   # the kinds in the max_rows lane


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


class _Window:
    """One tenant's records: model requests and metadata reads in lanes of their own."""
    __slots__ = ("requests", "reads", "last_write")

    def __init__(self, max_rows: int) -> None:
        self.requests: deque[Record] = deque(maxlen=max_rows)
        self.reads: deque[Record] = deque(maxlen=METADATA_ROWS)
        self.last_write = 0

    def add(self, record: Record) -> None:
        (self.requests if record.kind in MODEL_KINDS else self.reads).append(record)  # full: drops its oldest
        self.last_write = record.finished_unix_ns

    def expire(self, oldest: int) -> None:
        for lane in (self.requests, self.reads):
            while lane and lane[0].finished_unix_ns < oldest:
                lane.popleft()

    def __len__(self) -> int:
        return len(self.requests) + len(self.reads)


class History:
    """The windows of recent requests, one per tenant; see the module docstring for the bounds."""

    def __init__(self, max_rows: int = DEFAULT_MAX_ROWS, max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS,
                 max_tenants: int = DEFAULT_MAX_TENANTS, configured: Iterable[str] = (),
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.max_rows = max_rows
        self.max_age_seconds = max_age_seconds
        self.max_tenants = max_tenants
        self.configured = frozenset(configured)
        self._clock = clock
        self._windows: OrderedDict[str, _Window] = OrderedDict()   # least recently written first

    def __len__(self) -> int:
        return sum(len(w) for w in self._windows.values())

    def tenants(self) -> list[str]:
        """The tenants that have a window, least recently written first."""
        return list(self._windows)

    def record(self, record: Record) -> None:
        now = self._clock()
        if not record.finished_unix_ns:
            record = replace(record, finished_unix_ns=now)
        oldest = self._oldest(now)
        self._drop_stale(oldest)
        window = self._windows.get(record.tenant)
        if window is None:
            if not self._make_room(record.tenant):
                return
            window = self._windows[record.tenant] = _Window(self.max_rows)
        else:
            self._windows.move_to_end(record.tenant)
        window.add(record)
        window.expire(oldest)

    def rows(self, tenant: str, bounds: Bounds = Bounds()) -> list[Record]:
        """One tenant's records within `bounds`, by arrival time."""
        window = self._windows.get(tenant)
        if window is None:
            return []
        window.expire(self._oldest(self._clock()))
        return sorted((r for lane in (window.requests, window.reads) for r in lane if r.at_unix_ns in bounds),
                      key=lambda r: r.at_unix_ns)

    def _oldest(self, now: int) -> int:
        """The finish time below which records have expired."""
        return now - int(self.max_age_seconds * 1e9)

    def _drop_stale(self, oldest: int) -> None:
        """Drop the windows whose every record has expired: those at the front of the write order."""
        while self._windows:
            tenant, window = next(iter(self._windows.items()))
            if window.last_write >= oldest:
                return
            del self._windows[tenant]

    def _make_room(self, tenant: str) -> bool:
        """Make room for a new window for `tenant`; False when it may not have one."""
        if len(self._windows) < self.max_tenants:
            return True
        victim = next((t for t in self._windows if t not in self.configured), None)
        if victim is None:   # every window is a configured tenant's
            if tenant not in self.configured:
                return False
            victim = next(iter(self._windows))
        del self._windows[victim]
        return True
