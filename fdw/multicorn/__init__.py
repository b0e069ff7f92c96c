"""Multicorn2's Python API, as run by the llmfdw FDW host.

FDW classes import from here exactly as they would from Multicorn2
(``from multicorn import ForeignDataWrapper, Qual``), so the same classes also
run under a real Multicorn2.  The host (fdw/src) builds Qual and
ColumnDefinition objects from this module; their shapes follow Multicorn2's.
"""
from __future__ import annotations

import os
import pkgutil
from collections import OrderedDict, namedtuple
from typing import Any, Iterable, Mapping

# Modules written for Multicorn2's package (its testfdw.py, say, which imports ``.utils``) can sit
# in a ``multicorn/`` directory anywhere on sys.path: it joins this package's path.
_OWN_PATH = list(__path__)
__path__ = pkgutil.extend_path(__path__, __name__)


def _look_again() -> None:
    """In a forked child: a backend that inherited this package from a postmaster that preloaded
    it (llmfdw.preload_python) finds the ``multicorn/`` directories there are now, as a backend
    importing it itself would, not only those of the server's start."""
    global __path__
    __path__ = pkgutil.extend_path(list(_OWN_PATH), __name__)


os.register_at_fork(after_in_child=_look_again)

__all__ = [
    "ANY",
    "ALL",
    "ColumnDefinition",
    "ForeignDataWrapper",
    "Qual",
    "SortKey",
    "TableDefinition",
]

ANY = object()
ALL = object()

SortKey = namedtuple("SortKey", ["attname", "attnum", "is_reversed", "nulls_first", "collate"])


class Qual:
    """A restriction ``field_name operator value`` pushed down by Postgres.

    ``operator`` is the operator's name (``=``, ``<>``, ``~~`` for LIKE, ...)
    or, for ``col op ANY/ALL(array)``, a tuple ``(name, True)`` for ANY and
    ``(name, False)`` for ALL; then ``value`` is a list.  ``IS NULL`` is
    ``Qual(col, "=", None)`` and ``IS NOT NULL`` is ``Qual(col, "<>", None)``.
    """

    def __init__(self, field_name: str, operator: str | tuple[str, bool], value: Any) -> None:
        self.field_name = field_name
        self.operator = operator
        self.value = value

    @property
    def is_list_operator(self) -> bool:
        return isinstance(self.operator, tuple)

    @property
    def list_any_or_all(self) -> object | None:
        if not self.is_list_operator:
            return None
        return ANY if self.operator[1] else ALL

    def __repr__(self) -> str:
        # Multicorn2's format: the value as str, so Qual('a', '=', 'x') shows as "a = x"
        if self.is_list_operator:
            name, any_ = self.operator
            return f"{self.field_name} {name} {'ANY' if any_ else 'ALL'}({self.value})"
        return f"{self.field_name} {self.operator} {self.value}"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Qual)
            and (self.field_name, self.operator, self.value)
            == (other.field_name, other.operator, other.value)
        )

    def __hash__(self) -> int:
        value = tuple(self.value) if isinstance(self.value, list) else self.value
        return hash((self.field_name, self.operator, value))


class ColumnDefinition:
    """A column of the foreign table, as the FDW class's constructor sees it."""

    def __init__(
        self,
        column_name: str,
        type_oid: int = 0,
        typmod: int = 0,
        type_name: str = "",
        base_type_name: str = "",
        options: Mapping[str, str] | None = None,
    ) -> None:
        self.column_name = column_name
        self.type_oid = type_oid
        self.typmod = typmod
        self.type_name = type_name
        self.base_type_name = base_type_name
        self.options = dict(options or {})

    def __repr__(self) -> str:
        return f"{self.column_name} {self.type_name}"

    def to_statement(self) -> str:
        return f'"{self.column_name}" {self.type_name}'


class TableDefinition:
    """A foreign table to create, as returned by import_schema()."""

    def __init__(
        self,
        table_name: str,
        columns: Iterable[ColumnDefinition] = (),
        options: Mapping[str, str] | None = None,
    ) -> None:
        self.table_name = table_name
        self.columns = list(columns)
        self.options = dict(options or {})

    def to_statement(self, schema_name: str, server_name: str) -> str:
        cols = ",\n  ".join(c.to_statement() for c in self.columns)
        stmt = f'CREATE FOREIGN TABLE "{schema_name}"."{self.table_name}" (\n  {cols}\n) SERVER "{server_name}"'
        if self.options:
            opts = ", ".join(f"{k} '{str(v).replace(chr(39), chr(39) * 2)}'" for k, v in self.options.items())
            stmt += f" OPTIONS ({opts})"
        return stmt


class ForeignDataWrapper:
    """Base class of FDW classes; subclassing is optional (methods are looked up by name).

    The read side of Multicorn2's API.  The write API (insert/update/delete, rowid_column,
    bulk_insert) is not supported by the llmfdw host: foreign tables of such a class refuse
    INSERT/UPDATE/DELETE with an error naming the class.
    """

    _startup_cost = 20

    def __init__(self, fdw_options: dict[str, str], fdw_columns: "OrderedDict[str, ColumnDefinition]") -> None:
        self.fdw_options = fdw_options
        self.fdw_columns = fdw_columns

    def get_rel_size(self, quals: list[Qual], columns: set[str]) -> tuple[float, int]:
        return (100000000, len(columns) * 100)

    def can_sort(self, sortkeys: list[SortKey]) -> list[SortKey]:
        """The sortkeys (a prefix of the list, in order) execute() can return rows sorted by."""
        return []

    def can_limit(self, limit: int | None, offset: int | None) -> bool:
        """Whether execute() applies LIMIT/OFFSET itself (then it gets limit= and offset=)."""
        return False

    def get_path_keys(self) -> list[tuple[tuple[str, ...], float]]:
        return []

    def execute(self, quals: list[Qual], columns: set[str], sortkeys: list[SortKey] | None = None,
                limit: int | None = None, offset: int | None = None) -> Iterable[Any]:
        raise NotImplementedError("an FDW class must implement execute()")

    def explain(self, quals: list[Qual], columns: set[str], sortkeys: list[SortKey] | None = None,
                verbose: bool = False, limit: int | None = None, offset: int | None = None) -> Iterable[str]:
        return []

    def end_scan(self) -> None:
        pass

    @classmethod
    def import_schema(cls, schema: str, srv_options: dict[str, str], options: dict[str, str],
                      restriction_type: str | None, restricts: list[str]) -> list["TableDefinition"]:
        raise NotImplementedError("This FDW does not support IMPORT FOREIGN SCHEMA")


def get_class(name: str) -> type:
    """What Multicorn2's C library asks its own `multicorn` package for first.  Reaching this one
    means Multicorn2 runs in a backend whose interpreter llmfdw's postmaster started, with this
    package first on sys.path (llmfdw.preload_python): say how to separate them."""
    raise RuntimeError(
        f"Multicorn2 found llmfdw's multicorn module (looking up {name!r}): llmfdw preloads Python in "
        "this cluster's postmaster, and its backends share that interpreter. In a cluster that also "
        "runs Multicorn2, set llmfdw.preload_python = off in postgresql.conf and restart.")
