"""Usage per (tenant, model) since the sidecar started: what the Usage RPC returns.

The servicer records each finished request once, with the same numbers it
sent the caller in that request's Usage messages, so a tenant's totals are
exactly the sum of its requests.  A result-cache hit (cache.py) is counted in
cache_hits too; it carries its answer's token counts (as its caller's row
shows them) and no queue or compute time: compute is what the engines did.  Only authenticated requests for a served
model are recorded: a caller cannot make rows for tenants or models at will
(beyond tenant names when auth is off).  Everything runs on the event loop,
so no lock is needed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields


@dataclass
class Metered:
    """One request's usage; engines fill it in as they work, so a cancelled request
    is metered for the work it caused."""
    input_tokens: int = 0
    output_tokens: int = 0
    embedded_inputs: int = 0
    queue_ns: int = 0      # arrival until the engine started it (admission + engine queue)
    compute_ns: int = 0    # engine time attributed to it
    cache_hits: int = 0    # answered from the result cache (cache.py): a Generate, or Embed texts


@dataclass
class Totals(Metered):
    requests: int = 0
    errors: int = 0


class UsageBook:
    def __init__(self) -> None:
        self.since_unix_ns = time.time_ns()
        self._rows: dict[tuple[str, str], Totals] = {}

    def record(self, tenant: str, model: str, ok: bool, usage: Metered) -> None:
        row = self._rows.setdefault((tenant, model), Totals())
        row.requests += 1
        row.errors += not ok
        for f in fields(Metered):
            setattr(row, f.name, getattr(row, f.name) + getattr(usage, f.name))

    def rows(self, tenant: str) -> list[tuple[str, Totals]]:
        """(model, totals) of one tenant, by model name."""
        return sorted(((model, row) for (t, model), row in self._rows.items() if t == tenant),
                      key=lambda item: item[0])
