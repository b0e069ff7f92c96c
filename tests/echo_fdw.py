"""A Multicorn-API FDW class for testing the FDW host itself (no sidecar).

Table option `mode` picks the behaviour:
  quals   - one row per qual received: (field, operator, value repr, value type)
  notice  - no rows; one NOTICE per qual received: "qual<TAB>field<TAB>operator<TAB>type<TAB>repr"
            (for quals on columns whose rows Postgres's recheck would drop)
  rows    - `n` rows of (i, label, vec) built from option `n` (default 3)
  error   - raises an exception carrying a hint
  crash   - raises an unexpected Python exception
  badrow  - yields a row with the wrong number of values
  wait    - waits up to `seconds`, polling for a cancel like the real client
"""
from __future__ import annotations

import time

from multicorn import ForeignDataWrapper
from multicorn.utils import check_interrupts, log_to_postgres, ERROR, INFO, WARNING

calls: list[str] = []


def operator(qual) -> str:
    """'=' for a plain qual, '= ANY' / '<> ALL' for one over an array."""
    op = qual.operator
    return op if isinstance(op, str) else f"{op[0]} {'ANY' if op[1] else 'ALL'}"


class EchoFdw(ForeignDataWrapper):
    def __init__(self, options, columns):
        super().__init__(options, columns)
        self.mode = options.get("mode", "quals")
        self.options = options
        self.columns = columns

    def get_path_keys(self):
        return [(("key",), 1)] if "key" in self.columns else []

    def execute(self, quals, columns, **kwargs):
        calls.append(self.mode)
        if self.mode == "quals":
            for q in quals:
                yield {"field": q.field_name, "op": operator(q), "value": repr(q.value),
                       "pytype": type(q.value).__name__, "key": q.value if q.field_name == "key" else None,
                       "columns": sorted(columns)}
        elif self.mode == "notice":
            for q in quals:
                log_to_postgres(f"qual\t{q.field_name}\t{operator(q)}\t{type(q.value).__name__}\t{q.value!r}", INFO)
            yield from ()
        elif self.mode == "rows":
            for i in range(int(self.options.get("n", "3"))):
                yield {"i": i, "label": f"row {i}", "vec": [float(i), 0.5, -1.0], "tags": ["a", f"b{i}", None],
                       "flag": i % 2 == 0, "blob": bytes([i, 0, 255]), "doc": {"i": i, "s": "x"}}
        elif self.mode == "error":
            log_to_postgres("the echo table refuses", ERROR, hint="ask nicely")
        elif self.mode == "warning":
            log_to_postgres("a warning from python", WARNING)
            yield {"i": 1}
        elif self.mode == "crash":
            raise ZeroDivisionError("boom")
        elif self.mode == "badrow":
            yield (1, 2)
        elif self.mode == "wait":
            deadline = time.monotonic() + float(self.options.get("seconds", "30"))
            try:
                while time.monotonic() < deadline:
                    time.sleep(0.02)
                    check_interrupts()
                yield {"i": 0}
            finally:
                calls.append("closed")

    def explain(self, quals, columns, sortkeys=None, verbose=False, **kwargs):
        return [f"echo mode={self.mode}", f"quals: {', '.join(map(repr, quals)) or 'none'}"]
