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

"The text below" is built from option `codepoints` (decimal code points, comma-separated), so a
table in a LATIN1 database can still ask for characters that LATIN1 cannot hold.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from multicorn import ColumnDefinition, ForeignDataWrapper
from multicorn.utils import ERROR, WARNING, log_to_postgres


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
        elif self.mode == "typeerror":
            yield {"name": "sum", "value": sum(["a", "b"])}  # TypeError: int + str
        else:
            raise ValueError(f"unknown mode {self.mode!r}")
