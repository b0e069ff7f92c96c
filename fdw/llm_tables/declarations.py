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

The generation parameters (max_tokens, temperature, ...) are defined once, in
the registry llm_inference.v1.params.PARAMS: llm.completions has one request
column per entry (its name and SQL type, settable as an option), and the
sidecar checks every request against the same ranges; a column declared
with `param=` is checked against its range here, so a bad value fails when
the DDL runs (an option) or before any request is sent (a qual), with a
hint.  Beside that, what the wire format needs: an integer column's value
fits its SQL type, a stop list holds no NULL, text is UTF-8.  The foreign
table's own column types are checked against the declaration when the table
is first planned (check_column_types).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from llm_inference.v1.constraints import SCHEMA_HINT, ConstraintError, check_choices, load_schema
from llm_inference.v1.params import PARAMS, Param
from llm_tables.errors import INVALID_PARAMETER_VALUE, LlmError
from llm_tables.keycolumns import Check, KeyColumn, KeyColumns, fits, text_list

CHARACTER_NOT_IN_REPERTOIRE = "22021"
DATATYPE_MISMATCH = "42804"

# SQL type of a request column -> how its option text is parsed
_PARSERS: dict[str, Callable[[str], Any]] = {
    "text": str, "integer": int, "bigint": int, "double precision": float,
}
# SQL integer types -> the range a value must fit (the proto field has the same width)
_INT_RANGES = {"integer": (-2**31, 2**31 - 1), "bigint": (-2**63, 2**63 - 1)}
# A declared SQL type -> the column types (format_type_be's spelling, typmod aside) a foreign
# table may use for it: each reaches Python and comes back through the host (fdw/src/convert.c)
# with its meaning kept.  varchar is text; vector(N) is vector (the dimensions are checked
# against the model's when rows come); a wider integer holds every value; real is refused, as
# `temperature = 0.7` on a real column compares 0.7::real with 0.7 and drops the row.
_ACCEPTED_TYPES: dict[str, tuple[str, ...]] = {
    "text": ("text", "character varying"),
    "text[]": ("text[]", "character varying[]"),
    "integer": ("integer", "bigint"),
    "bigint": ("bigint",),
    "double precision": ("double precision",),
    "boolean": ("boolean",),
    "vector": ("vector",),
    "timestamptz": ("timestamp with time zone",),
    "jsonb": ("jsonb",),
}


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
    param: Param | None = None   # a generation parameter: its range (llm_inference.v1.params)

    def key_column(self) -> KeyColumn:
        checks = [self.check]
        if self.sql_type in _INT_RANGES:
            checks.append(fits(self.name, self.sql_type, *_INT_RANGES[self.sql_type]))
        if self.param is not None:
            checks.append(in_range(self.param))
        if self.sql_type in ("text", "text[]"):
            checks.append(utf8_text(self.name))
        return KeyColumn(self.name, required=self.required, many=self.many, check=_all(checks))


def request(name: str, sql_type: str, **kwargs: Any) -> Column:
    return Column(name, sql_type, request=True, **kwargs)


def _all(checks: list[Check | None]) -> Check | None:
    """One check that runs `checks` in order; the first problem wins."""
    present = [c for c in checks if c is not None]
    if len(present) <= 1:
        return present[0] if present else None
    return lambda value: next((p for p in (c(value) for c in present) if p), None)


def check_param(param: Param, value: Any, label: str | None = None) -> None:
    """An LlmError naming the parameter (as `label`), its range and what it means, unless
    `value` is valid."""
    problem = param.problem(value, label)
    if problem:
        raise LlmError(problem, hint=param.hint, sqlstate=INVALID_PARAMETER_VALUE)


def in_range(param: Param) -> Check:
    """A request column's check against its parameter's range.  It raises rather than returns
    the problem, so that the error carries the parameter's hint."""

    def check(value: Any) -> None:
        check_param(param, value)

    return check


def check_utf8(name: str, text: str) -> None:
    """An LlmError (22021) naming `name` when `text` is not UTF-8.  In a SQL_ASCII database the
    host hands bytes that are not UTF-8 over as lone surrogates (errors='surrogateescape', see
    fdw/src/python.c), which gRPC cannot send: this says so instead of a UnicodeEncodeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise LlmError(f"{name} is not valid UTF-8 ({what} at character {err.start + 1}): the models take UTF-8 text",
                       hint="The database's encoding (SHOW server_encoding;) is probably SQL_ASCII, which keeps "
                            "any bytes: convert the text to UTF-8 first (convert_from(bytes, 'LATIN1'), say, "
                            "for Latin-1), or use a database created with ENCODING 'UTF8'.",
                       sqlstate=CHARACTER_NOT_IN_REPERTOIRE) from None


def utf8_text(name: str) -> Check:
    """A text (or text[]) request column's check: UTF-8 only (check_utf8)."""

    def check(value: Any) -> None:
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                check_utf8(f'column "{name}"', item)

    return check


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

    @property
    def params(self) -> dict[str, Param]:
        """Request columns that are generation parameters, with their ranges."""
        return {c.name: c.param for c in self.columns if c.param is not None}

    def column_types(self, typmods: dict[str, int] | None = None) -> list[tuple[str, str]]:
        """(name, SQL type) per column; typmods gives e.g. vector's dimensions."""
        typmods = typmods or {}
        return [(c.name, f"{c.sql_type}({typmods[c.name]})" if c.name in typmods else c.sql_type)
                for c in self.columns]

    def check_column_types(self, columns: Mapping[str, Any]) -> None:
        """A DATATYPE_MISMATCH error naming each column whose type is not one the declaration
        accepts (an `embedding uuid` or `max_tokens text` would otherwise give garbage or a raw
        Python error at the first row).  `columns` holds the host's ColumnDefinitions; columns
        the declaration does not know, and hosts that give no base_type_name, are not checked."""
        declared = {c.name: _ACCEPTED_TYPES.get(c.sql_type, (c.sql_type,)) for c in self.columns}
        wrong = []   # (column, its type, the declared type)
        for name, column in columns.items():
            given = getattr(column, "base_type_name", "") or ""
            unqualified = given.rsplit(".", 1)[-1]   # extensions.vector when its schema is not on search_path
            if name in declared and given and unqualified not in declared[name]:
                wrong.append((name, given, declared[name][0]))
        if not wrong:
            return
        said = [f'column "{name}" is {given}, but an llmfdw {self.name} table declares it {expected}'
                for name, given, expected in wrong]
        name, _, expected = wrong[0]
        raise LlmError(said[0], detail="Also " + "; ".join(said[1:]) + "." if len(said) > 1 else None,
                       hint=f"ALTER FOREIGN TABLE ... ALTER COLUMN {name} TYPE {expected};  or IMPORT FOREIGN "
                            f"SCHEMA llm FROM SERVER ... INTO ...; creates the tables with the declared types.",
                       sqlstate=DATATYPE_MISMATCH)


# ---- Constrained output and per-row errors (llm.completions) ----

ON_ERROR = ("abort", "null")   # on_error: fail the statement (the default), or NULL the row with its error
CONSTRAINT_HINT = ("A JSON Schema such as '{\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, "
                   "\"required\": [\"city\"], \"additionalProperties\": false}', or choices such as "
                   "ARRAY['positive', 'negative'].  ")


def check_constraint(check: Callable[[Any, str], Any], value: Any, label: str) -> None:
    """Run a constraint check (llm_inference.v1.constraints: the sidecar runs the same) and
    raise its problem as a 22023 error with a hint, so a bad schema fails before any request."""
    try:
        check(value, label)
    except ConstraintError as err:
        hint = CONSTRAINT_HINT + (SCHEMA_HINT if label == "json_schema" else "")
        raise LlmError(str(err), hint=hint, sqlstate=INVALID_PARAMETER_VALUE) from None


def check_on_error(value: Any) -> None:
    if value not in ON_ERROR:
        raise LlmError(f"on_error must be 'abort' or 'null', got {value!r}",
                       hint="on_error = 'null' returns a failing row with its error in column error and NULL "
                            "outputs; 'abort' (the default) fails the statement.",
                       sqlstate=INVALID_PARAMETER_VALUE)


COMPLETIONS = TableSpec(
    "completions",
    (
        request("prompt", "text", required=True, many=True),
        request("model", "text", option=True),
        request("system", "text", option=True),
        *(request(p.name, p.sql_type, option=True, param=p) for p in PARAMS),   # the generation parameters
        request("stop", "text[]", check=text_list("stop")),
        request("json_schema", "jsonb", check=lambda value: check_constraint(load_schema, value, "json_schema")),
        request("choices", "text[]", check=lambda value: check_constraint(check_choices, value, "choices")),
        request("on_error", "text", check=lambda value: check_on_error(value)),   # abort (default) | null
        request("cache", "boolean"),   # false: the sidecar's result cache is neither read nor filled
        Column("completion", "text"),
        Column("finish_reason", "text"),
        Column("input_tokens", "integer"),
        Column("output_tokens", "integer"),
        Column("compute_ms", "double precision"),
        Column("completion_json", "jsonb"),   # the parsed answer under json_schema or choices, else NULL
        Column("error", "text"),              # on_error = 'null': why this row has no answer
    ),
    example="SELECT completion FROM {table} WHERE prompt = 'What is the capital of France?';",
)

EMBEDDINGS = TableSpec(
    "embeddings",
    (
        request("input", "text", required=True, many=True),
        request("model", "text", option=True),
        request("cache", "boolean"),   # false: the sidecar's result cache is neither read nor filled
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
        Column("cache_hits", "bigint"),   # requests (completions) or texts (embeddings) answered from the cache
    ),
    example="SELECT * FROM {table};",
)

REQUESTS = TableSpec(
    "requests",
    (
        Column("at", "timestamptz", range=True),   # arrival; WHERE at > ... ships only the rows in range
        Column("tenant", "text"),
        Column("model", "text"),
        Column("kind", "text"),               # generate | embed | rerank | list_models | usage
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

# ---- llm.chunks: texts split for embedding (the vectorizer's splitter; the sidecar's Chunk RPC) ----

CHUNK_MODES = ("tokens", "characters")


def at_least(name: str, low: int) -> Check:
    """A check that a count is at least `low` (the request field is unsigned)."""

    def check(value: Any) -> str | None:
        return None if value >= low else f"{name} must be at least {low}, got {value}"

    return check


def one_of(name: str, choices: tuple[str, ...]) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"{name} must be one of {', '.join(choices)}, got {value!r}"

    return check


CHUNKS = TableSpec(
    "chunks",
    (
        request("input", "text", required=True, many=True),
        request("model", "text", option=True),         # whose tokenizer counts the tokens
        request("max_tokens", "integer", option=True, check=at_least("max_tokens", 1)),   # default: all it reads
        request("overlap_tokens", "integer", option=True, check=at_least("overlap_tokens", 0)),
        request("mode", "text", option=True, check=one_of("mode", CHUNK_MODES)),   # default tokens
        request("max_chars", "integer", option=True, check=at_least("max_chars", 1)),   # characters mode
        request("overlap_chars", "integer", option=True, check=at_least("overlap_chars", 0)),
        request("separators", "text[]", check=text_list("separators")),
        Column("chunk_seq", "integer"),
        Column("chunk", "text"),
        Column("tokens", "integer"),
    ),
    example="SELECT chunk_seq, chunk FROM {table} WHERE input = 'a long text' AND max_tokens = 128;  "
            "-- or, for many rows at once: WHERE input = ANY(ARRAY(SELECT body FROM docs))",
)

# ---- llm.rerank: a cross-encoder's score of each document against a query (the Rerank RPC) ----

RERANK = TableSpec(
    "rerank",
    (
        request("query", "text", required=True),
        request("document", "text", required=True, many=True),   # = ANY(array): one request for all
        request("model", "text", option=True),                    # a rerank model (llm.models: task rerank)
        Column("score", "double precision"),                      # higher: more relevant (the model's scale)
    ),
    example="SELECT document, score FROM {table} WHERE query = 'what is a cat?' "
            "AND document = ANY(ARRAY['a cat is an animal', 'Paris is in France']) ORDER BY score DESC;",
)

# ---- llm.progress: how far each running statement of this tenant is (the sidecar's Progress RPC) ----

PROGRESS = TableSpec(
    "progress",
    (
        Column("pid", "integer"),              # the backend running the statement (pg_stat_activity.pid)
        Column("statement", "text"),           # the FDW's id of that statement
        Column("state", "text"),               # running (requests in flight) | idle (between or after them)
        Column("database", "text"),
        Column("role", "text"),
        Column("model", "text"),               # of its latest request
        Column("done", "bigint"),              # prompts answered, texts embedded (cache hits included)
        Column("total", "bigint"),             # prompts or texts its scans planned so far; NULL: unknown
        Column("requests", "bigint"),          # requests finished
        Column("running", "integer"),          # requests in flight now
        Column("errors", "bigint"),
        Column("input_tokens", "bigint"),      # running requests' tokens included
        Column("output_tokens", "bigint"),
        Column("cache_hits", "bigint"),
        Column("started", "timestamptz"),
        Column("updated", "timestamptz"),      # its latest request start or end
        Column("elapsed_ms", "double precision"),
        Column("remaining_ms", "double precision"),   # at the rate so far; NULL without total or progress
    ),
    example="SELECT pid, state, done, total, elapsed_ms, remaining_ms FROM {table};",
)

SPECS: dict[str, TableSpec] = {s.name: s for s in (COMPLETIONS, EMBEDDINGS, MODELS, USAGE, REQUESTS, CHUNKS,
                                                   PROGRESS, RERANK)}
