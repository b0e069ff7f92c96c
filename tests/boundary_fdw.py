"""A Multicorn-API FDW class for testing the boundary between the FDW host and Python (no sidecar).

Every table it backs has the columns (name text, value text) and maybe more. Table option `mode`
picks the behaviour:
  options    - one row per table option, then one per column option as "column.option"
  columns    - one row per column definition, in the order the host passed them (value: type name;
               a third column, if any, gets the text below)
  text       - one row whose value is the text below
  error      - log_to_postgres(ERROR) with the text below as message, hint and detail
  warning    - log_to_postgres(WARNING) with the text below, then one row
  typeerror  - raises TypeError, an unexpected exception
  thread     - calls each host function from a Python thread: one row per function, with what the
               call gave there (a thread must never enter Postgres: the host refuses it)
  freed      - rows ("x", "1") and ("x", "2"), noting which thread drops the last reference to
               the quals it was given: "backend thread" or "another thread" (the host's freeing
               thread, fdw/src/rowsource.c); "not yet" until then
  where_freed - one row: ("where", what the last `freed` scan noted)

"The text below" is built from option `codepoints` (decimal code points, comma-separated), so a
table in a LATIN1 database can still ask for characters that LATIN1 cannot hold.
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

from multicorn import ColumnDefinition, ForeignDataWrapper
from multicorn.utils import ERROR, WARNING, log_to_postgres

# where the last `freed` scan's quals were freed (module state: it outlives the scan)
_freed = {"where": "no scan"}


def _note_where_freed() -> None:
    """A weakref callback: runs in the thread that drops a `freed` scan's last Qual."""
    on_backend = threading.get_ident() == threading.main_thread().ident
    _freed["where"] = "backend thread" if on_backend else "another thread"


class BoundaryFdw(ForeignDataWrapper):
    """See the module docstring."""

    def __init__(self, options: Mapping[str, str], columns: Mapping[str, ColumnDefinition]) -> None:
        super().__init__(options, columns)
        self.options = dict(options)
        self.columns = columns
        self.mode = self.options.get("mode", "options")

    def text(self) -> str:
        """The characters listed in option `codepoints`."""
        return "".join(chr(int(cp)) for cp in self.options.get("codepoints", "").split(",") if cp)

    def execute(self, quals: list, columns: set[str], **kwargs: Any) -> Iterator[dict[str, Any]]:
        if self.mode == "options":
            for name, value in self.options.items():
                yield {"name": name, "value": value}
            for column in self.columns.values():
                for name, value in column.options.items():
                    yield {"name": f"{column.column_name}.{name}", "value": value}
        elif self.mode == "columns":
            names = list(self.columns.keys())
            for name in names:
                row = {"name": name, "value": self.columns[name].type_name}
                if len(names) > 2:
                    row[names[2]] = self.text()
                yield row
        elif self.mode == "text":
            yield {"name": "text", "value": self.text()}
        elif self.mode == "error":
            log_to_postgres(self.text(), ERROR, hint=self.text(), detail=self.text())
        elif self.mode == "warning":
            log_to_postgres(self.text(), WARNING)
            yield {"name": "warning", "value": self.text()}
        elif self.mode == "thread":
            yield from self.from_a_thread()
        elif self.mode == "freed":
            _freed["where"] = "not yet"
            for qual in quals:
                weakref.finalize(qual, _note_where_freed)
            yield {"name": "x", "value": "1"}
            yield {"name": "x", "value": "2"}
        elif self.mode == "where_freed":
            yield {"name": "where", "value": _freed["where"]}
        elif self.mode == "typeerror":
            yield {"name": "sum", "value": sum(["a", "b"])}  # TypeError: int + str
        else:
            raise ValueError(f"unknown mode {self.mode!r}")

    def from_a_thread(self) -> Iterator[dict[str, Any]]:
        """Each host function called from another thread: the exception's type and message."""
        import threading

        import _llmfdw_host as host

        calls = {"log": lambda: host.log(WARNING, "from a thread"), "session": host.session,
                 "interrupt_pending": host.interrupt_pending, "statement_time_left": host.statement_time_left}
        outcome: dict[str, str] = {}

        def call_all() -> None:
            for name, call in calls.items():
                try:
                    outcome[name] = f"returned {call()!r}"
                except Exception as exc:   # what the host raised is the row's value
                    outcome[name] = f"{type(exc).__name__}: {exc}"

        thread = threading.Thread(target=call_all)
        thread.start()
        thread.join()
        for name in calls:
            yield {"name": name, "value": outcome[name]}
