"""Each virtual table, declared once: its columns and what each one is.

A column is either a request column (Steampipe's key column: a qual on it
becomes a request field, and every row echoes the value the request used) or
an output column (filled from the sidecar's answer); an output column with
`range=True` also sends its range quals (`at > now() - interval '1 hour'`) as
bounds the request carries, a hint Postgres rechecks (keycolumns.range_hint).
Request columns that
may have a default carry `option=True`: the table option `name` (or the
server option `default_name`) sets it.  From these declarations come the key
columns the FDW class resolves quals with (keycolumns.py), the options it
accepts (options.py), and the DDL that IMPORT FOREIGN SCHEMA creates
(SidecarTables.import_schema in tables.py).

Ranges of request values (max_tokens >= 1, temperature in [0, 2], ...) are
checked once, in the sidecar, which answers with an error naming the field;
here only what the wire format needs is checked: an integer column's value
fits its SQL type, a stop list holds no NULL.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from llm_tables.keycolumns import Check, KeyColumn, KeyColumns, fits, text_list

# SQL type of a request column -> how its option text is parsed
_PARSERS: dict[str, Callable[[str], Any]] = {
    "text": str, "integer": int, "bigint": int, "double precision": float,
}
# SQL integer types -> the range a value must fit (the proto field has the same width)
_INT_RANGES = {"integer": (-2**31, 2**31 - 1), "bigint": (-2**63, 2**63 - 1)}


@dataclass(frozen=True)
class Column:
    """One column of a virtual table."""

    name: str
    sql_type: str
    request: bool = False   # a request column: its qual goes into the request, rows echo it
    required: bool = False  # the request cannot be made without it
    many: bool = False      # accepts = ANY(array): one row per element
    option: bool = False    # a default may be set as table option `name` / server `default_name`
    check: Check | None = None
    range: bool = False     # an output column whose > >= < <= = quals are sent as bounds (a hint:
                            # Postgres rechecks them; see keycolumns.range_hint)

    def key_column(self) -> KeyColumn:
        check = self.check
        if check is None and self.sql_type in _INT_RANGES:
            check = fits(self.name, self.sql_type, *_INT_RANGES[self.sql_type])
        return KeyColumn(self.name, required=self.required, many=self.many, check=check)


def request(name: str, sql_type: str, **kwargs: Any) -> Column:
    return Column(name, sql_type, request=True, **kwargs)


@dataclass(frozen=True)
class TableSpec:
    """A virtual table: its name (the `table` option), its columns, an example query."""

    name: str
    columns: tuple[Column, ...]
    example: str

    def keys(self, table: str) -> KeyColumns:
        """The key columns, with messages naming the foreign table as the user called it."""
        return KeyColumns(table, [c.key_column() for c in self.columns if c.request],
                          self.example.format(table=table))

    @property
    def request_columns(self) -> list[Column]:
        return [c for c in self.columns if c.request]

    @property
    def range_columns(self) -> list[Column]:
        return [c for c in self.columns if c.range]

    @property
    def option_parsers(self) -> dict[str, Callable[[str], Any]]:
        """Request defaults this table accepts as options, with their parsers."""
        return {c.name: _PARSERS[c.sql_type] for c in self.columns if c.option}

    def column_types(self, typmods: dict[str, int] | None = None) -> list[tuple[str, str]]:
        """(name, SQL type) per column; typmods gives e.g. vector's dimensions."""
        typmods = typmods or {}
        return [(c.name, f"{c.sql_type}({typmods[c.name]})" if c.name in typmods else c.sql_type)
                for c in self.columns]


COMPLETIONS = TableSpec(
    "completions",
    (
        request("prompt", "text", required=True, many=True),
        request("model", "text", option=True),
        request("system", "text", option=True),
        request("max_tokens", "integer", option=True),
        request("temperature", "double precision", option=True),
        request("top_p", "double precision", option=True),
        request("seed", "bigint", option=True),
        request("stop", "text[]", check=text_list("stop")),
        Column("completion", "text"),
        Column("finish_reason", "text"),
        Column("input_tokens", "integer"),
        Column("output_tokens", "integer"),
        Column("compute_ms", "double precision"),
    ),
    example="SELECT completion FROM {table} WHERE prompt = 'What is the capital of France?';",
)

EMBEDDINGS = TableSpec(
    "embeddings",
    (
        request("input", "text", required=True, many=True),
        request("model", "text", option=True),
        Column("embedding", "vector"),
        Column("dimensions", "integer"),
        Column("input_tokens", "integer"),
        Column("truncated", "boolean"),
    ),
    example="SELECT embedding FROM {table} WHERE input = 'hello';  "
            "-- or, for many rows at once: WHERE input = ANY(ARRAY(SELECT body FROM docs))",
)

MODELS = TableSpec(
    "models",
    (
        Column("name", "text"),
        Column("task", "text"),
        Column("engine", "text"),
        Column("dimensions", "integer"),
        Column("context_length", "integer"),
        Column("state", "text"),
        Column("error", "text"),
        Column("source", "text"),
    ),
    example="SELECT * FROM {table};",
)

USAGE = TableSpec(
    "usage",
    (
        Column("tenant", "text"),
        Column("model", "text"),
        Column("requests", "bigint"),
        Column("errors", "bigint"),
        Column("input_tokens", "bigint"),
        Column("output_tokens", "bigint"),
        Column("embedded_inputs", "bigint"),
        Column("queue_ms", "double precision"),
        Column("compute_ms", "double precision"),
        Column("since", "timestamptz"),
    ),
    example="SELECT * FROM {table};",
)

REQUESTS = TableSpec(
    "requests",
    (
        Column("at", "timestamptz", range=True),   # arrival; WHERE at > ... ships only the rows in range
        Column("tenant", "text"),
        Column("model", "text"),
        Column("kind", "text"),               # generate | embed | list_models | usage
        Column("status", "text"),             # OK or the gRPC status code's name
        Column("queue_ms", "double precision"),
        Column("first_token_ms", "double precision"),   # generate only
        Column("total_ms", "double precision"),
        Column("input_tokens", "integer"),
        Column("output_tokens", "integer"),
        Column("embedded_inputs", "integer"),
        Column("compute_ms", "double precision"),
        Column("request_id", "text"),
    ),
    example="SELECT * FROM {table} WHERE at > now() - interval '15 minutes';",
)

SPECS: dict[str, TableSpec] = {s.name: s for s in (COMPLETIONS, EMBEDDINGS, MODELS, USAGE, REQUESTS)}
