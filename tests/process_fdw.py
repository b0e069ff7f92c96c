"""A Multicorn-API FDW class that reports on the backend process it runs in (no sidecar): for
tests of preloading (llmfdw.preload_python), where every backend is forked from a postmaster
that already started Python and imported llm_tables.

One row: pid, the llm_tables session id, a draw from `random`, and whether llm_tables.tables
was imported before this module was (true only in a backend that inherited it).
"""
from __future__ import annotations

import os
import random
import sys

INHERITED = "llm_tables.tables" in sys.modules

from multicorn import ForeignDataWrapper  # noqa: E402

from llm_tables.client import session_id  # noqa: E402


class ProcessFdw(ForeignDataWrapper):
    def execute(self, quals, columns, **kwargs):
        yield {"pid": os.getpid(), "session": session_id(), "draw": random.random(), "inherited": INHERITED}
