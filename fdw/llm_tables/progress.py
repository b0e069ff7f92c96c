"""llm.progress: how far the running statements of this tenant are, one row per backend.

Another session reads it while a long statement runs (`prompt = ANY(...)` over 10,000 rows, a
batched join): done of total (prompts or texts), tokens so far, elapsed time and an estimate of
the rest.  The numbers come from the sidecar (Progress RPC), which counts the requests each
statement sends: the FDW stamps them with the backend pid, a statement id and the total its
scans planned (statements.py).  A statement stays listed, as `idle`, until it has been quiet for
the sidecar's quiet time (30 s); a backend that has run several shows its latest.  Only this
tenant's statements are listed (the sidecar never returns another tenant's).
"""
from __future__ import annotations

from typing import Any, Iterator

from multicorn import Qual

from llm_tables.declarations import PROGRESS
from llm_tables.tables import ListingTable, _timestamptz
from llm_inference.v1 import inference_pb2 as pb


class ProgressTable(ListingTable):
    """One row per backend pid: its latest statement's progress."""

    spec = PROGRESS

    def execute(self, quals: list[Qual], columns: set[str], **kwargs: Any) -> Iterator[dict[str, Any]]:
        response = self.client.progress(pb.ProgressRequest(context=self.context()))
        seen: set[int] = set()
        for r in response.rows:   # latest activity first: the first row of a pid is its latest
            if r.backend_pid in seen:
                continue
            seen.add(r.backend_pid)
            yield {
                "pid": r.backend_pid, "statement": r.statement, "state": "running" if r.running else "idle",
                "database": r.database or None, "role": r.role or None, "model": r.model or None,
                "done": r.done, "total": r.total if r.HasField("total") else None,
                "requests": r.requests, "running": r.running, "errors": r.errors,
                "input_tokens": r.input_tokens, "output_tokens": r.output_tokens, "cache_hits": r.cache_hits,
                "started": _timestamptz(r.started_unix_ns), "updated": _timestamptz(r.updated_unix_ns),
                "elapsed_ms": r.elapsed_ns / 1e6,
                "remaining_ms": r.remaining_ns / 1e6 if r.HasField("remaining_ns") else None,
            }
