"""Key columns: which quals a virtual table needs, and what they become.

As in Steampipe, each table declares its key columns: the quals that turn
into request fields.  A required key column missing from the query fails
with an error that names the column and the operators it accepts, and a hint
with a query that works.  An operator a key column cannot turn into a
request (``max_tokens > 5``) is an error too, rather than a silently empty
result.

Range hints are the other kind of pushed-down qual: bounds on an output
column (``llm.requests.at``), declared with ``Column(..., range=True)``.
``col > v``, ``>=``, ``<``, ``<=`` and ``=`` (so also ``BETWEEN``, which
Postgres splits into ``>=`` and ``<=``) become the tightest lower and upper
bound the request carries (``range_hint``), so the sidecar sends only the
rows in range.  A range column is not a request column: each row carries
its own value, and Postgres rechecks every qual on the rows that come back.
So a hint only ever narrows what is shipped, never what the query returns,
and a qual that cannot be a bound (another operator, a value unknown at
plan time, a value the table cannot read) is simply not sent, never an
error: the host's check of request columns (check_request_columns in
fdw/src/plan.c) does not apply to it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from multicorn import Qual

from llm_tables import interrupts
from llm_tables.errors import INVALID_PARAMETER_VALUE, LlmError

Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class KeyColumn:
    """A column whose quals become part of the request."""

    name: str
    required: bool = False
    many: bool = False          # accepts col = ANY(array): one row per element
    check: Check | None = None  # returns a message when a value is invalid

    @property
    def operators(self) -> str:
        return "= or = ANY(array)" if self.many else "="


@dataclass
class Resolved:
    """Values per key column.  values[name] is a list (several for ANY);
    `empty` is True when the quals can match no row (e.g. col = NULL)."""

    values: dict[str, list[Any]]
    empty: bool = False

    def one(self, name: str, default: Any = None) -> Any:
        vals = self.values.get(name)
        return vals[0] if vals else default


def fits(name: str, sql_type: str, low: int, high: int) -> Check:
    """A check that an integer fits its column's SQL type (and so the request field)."""

    def check(value: Any) -> str | None:
        if low <= value <= high:
            return None
        return f"{value!r} is out of range for {name}, a column of type {sql_type} ({low} to {high})"

    return check


def text_list(name: str) -> Check:
    """A check for an array of non-empty strings (an empty stop string would stop at once)."""

    def check(value: Any) -> str | None:
        items = value if isinstance(value, list) else [value]
        if any(item is None for item in items):
            return f"{name} must not contain NULL"
        if any(item == "" for item in items):
            return f"{name} must not contain empty strings"
        return None

    return check


class KeyColumns:
    """The key columns of one table, and how to read quals against them."""

    def __init__(self, table: str, columns: Iterable[KeyColumn], example: str) -> None:
        self.table = table
        self.columns = {c.name: c for c in columns}
        self.example = example

    @property
    def required(self) -> list[KeyColumn]:
        return [c for c in self.columns.values() if c.required]

    def has_required(self, quals: Iterable[Qual]) -> bool:
        """Whether the quals (as seen at plan time) supply every required column."""
        names = {q.field_name for q in quals if self._usable(q)}
        return all(c.name in names for c in self.required)

    def _usable(self, qual: Qual) -> bool:
        col = self.columns.get(qual.field_name)
        if col is None:
            return False
        if qual.is_list_operator:
            return col.many and qual.operator == ("=", True)
        return qual.operator == "="

    def resolve(self, quals: Iterable[Qual]) -> Resolved:
        """Collect the values of key columns; raise a clear error for a
        missing required column, an unusable operator, or an invalid value."""
        values: dict[str, list[Any]] = {}
        empty = False
        for qual in quals:
            col = self.columns.get(qual.field_name)
            if col is None:
                continue  # an output column: Postgres filters on it
            if not self._usable(qual):
                raise LlmError(
                    f"{self.table}.{col.name} only supports {col.operators}, not {_op(qual)}",
                    hint=self.example,
                    sqlstate=INVALID_PARAMETER_VALUE,
                )
            if qual.is_list_operator:
                given = qual.value if qual.value is not None else []  # col = ANY(NULL): no row
            else:
                given = [qual.value]
            given = _without_nulls(given)
            if not given:
                empty = True
            for v in interrupts.checked(given):   # a long list takes a while: stay cancellable
                self.check(col, v)
            if col.name in values:  # several quals on one column: intersect
                values[col.name] = _intersection(values[col.name], given)
                empty = empty or not values[col.name]
            else:
                values[col.name] = _distinct(given)
        for col in self.required:
            if col.name not in values and not empty:
                raise LlmError(
                    f'{self.table} needs a value for "{col.name}": add WHERE {col.name} {col.operators.split(" or ")[0]} ...',
                    hint=self.example,
                    sqlstate=INVALID_PARAMETER_VALUE,
                )
        return Resolved(values, empty)

    def check(self, col: KeyColumn, value: Any) -> None:
        if col.check is None:
            return
        problem = col.check(value)
        if problem:
            raise LlmError(problem, sqlstate=INVALID_PARAMETER_VALUE)


RANGE_OPERATORS = (">", ">=", "<", "<=", "=")


@dataclass(frozen=True)
class Range:
    """Bounds on one column: low/high are None when the quals set none on that side."""

    low: Any = None
    low_inclusive: bool = False
    high: Any = None
    high_inclusive: bool = False

    @property
    def bounded(self) -> bool:
        return self.low is not None or self.high is not None


def range_hint(quals: Iterable[Qual], column: str, parse: Callable[[Any], Any] = lambda v: v) -> Range:
    """The tightest bounds that the quals on `column` put on it (see the module docstring).
    `parse` turns a qual's value into a comparable bound, or None when it cannot (then that qual
    is left to Postgres).  Two bounds on one side keep the tighter; at a tie, the exclusive one."""
    low = high = None
    low_inc = high_inc = False
    for qual in quals:
        if qual.field_name != column or qual.is_list_operator or qual.operator not in RANGE_OPERATORS:
            continue
        value = None if qual.value is None else parse(qual.value)
        if value is None:
            continue
        if qual.operator in (">", ">=", "="):
            inclusive = qual.operator != ">"
            if low is None or value > low or (value == low and not inclusive):
                low, low_inc = value, inclusive
        if qual.operator in ("<", "<=", "="):
            inclusive = qual.operator != "<"
            if high is None or value < high or (value == high and not inclusive):
                high, high_inc = value, inclusive
    return Range(low, low_inc, high, high_inc)


def _without_nulls(values: list[Any]) -> list[Any]:
    """values without its NULLs: the list itself when it has none (see _distinct)."""
    if type(values) is list and not any(v is None for v in interrupts.checked(values)):
        return values
    return [v for v in interrupts.checked(values) if v is not None]


def _distinct(values: list[Any]) -> list[Any]:
    """Distinct values in order; values may be unhashable (an array column's lists, which are
    short: a stop list).  When they are already distinct, the list itself: a copy of the
    200,000 texts of `input = ANY(...)` would live as long as the scan, and when a cancel aborts
    it, dropping the copy's references costs the backend milliseconds before the client hears
    (the host frees the query's own list after the transaction: fdw/src/rowsource.c)."""
    distinct: dict[Any, None] = {}
    try:   # in slices, asking Postgres between them: hashing 200,000 texts takes a while
        for start in interrupts.checked(range(0, len(values), interrupts.EVERY), every=1):
            distinct.update(dict.fromkeys(values[start:start + interrupts.EVERY]))
        return values if type(values) is list and len(distinct) == len(values) else list(distinct)
    except TypeError:
        pass
    out: list[Any] = []
    for v in interrupts.checked(values):
        if v not in out:
            out.append(v)
    return out


def _intersection(kept: list[Any], given: list[Any]) -> list[Any]:
    """The values of `kept` that are also in `given`, in kept's order: by hashing where the values
    allow (`input = ANY(a) AND input = ANY(b)` over two long arrays is linear, not quadratic)."""
    try:
        wanted: Any = set(given)
    except TypeError:
        wanted = given
    return [v for v in interrupts.checked(kept) if v in wanted]


def _op(qual: Qual) -> str:
    if qual.is_list_operator:
        name, any_ = qual.operator
        return f"{name} {'ANY' if any_ else 'ALL'}(array)"
    if qual.value is None:
        return "IS NULL" if qual.operator == "=" else "IS NOT NULL"
    return {"~~": "LIKE", "~~*": "ILIKE", "!~~": "NOT LIKE"}.get(qual.operator, qual.operator)
