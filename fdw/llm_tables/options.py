"""Options of the llmfdw foreign tables, from table, server and user mapping.

The host merges them into one dict (Multicorn's order: table, then server,
then user mapping; a later source wins).  Defaults for the request follow
the opposite order a user expects: a table option ``model`` (or
``max_tokens``, ...) wins over the server's ``default_model`` (or
``default_max_tokens``, ...).  Which request columns take a default, and how
their text parses, comes from each table's declaration (declarations.py),
and so does the range of a generation parameter's default
(llm_inference.v1.params), checked when the DDL runs as when a query runs.
Unknown options are errors, so a typo is never silently ignored.  Where each
connection option may be set (server, user mapping, table) is checked when
the DDL runs, by the host's validator (fdw/src/option.c).
"""
from __future__ import annotations

from typing import Any, Callable

from llm_inference.v1.params import Param
from llm_tables.declarations import SPECS, TableSpec, check_param, check_utf8
from llm_tables.errors import INVALID_PARAMETER_VALUE, LlmError
from llm_tables.tls import OPTIONS as TLS_OPTIONS, tls_settings

DEFAULT_TIMEOUT = 600.0
# name -> parser, for options that are not request defaults
CONNECTION: dict[str, Callable[[str], Any]] = {
    "address": str, "timeout": float, "tenant": str, "token": str, "table": str,
    **{name: str for name in TLS_OPTIONS},
}


def parse_options(spec: TableSpec, raw: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(connection settings, request defaults) from the merged options."""
    defaults_spec = spec.option_parsers
    connection: dict[str, Any] = {}
    table_level: dict[str, Any] = {}
    server_level: dict[str, Any] = {}
    for key, value in raw.items():
        if key in CONNECTION:
            connection[key] = _cast(key, value, CONNECTION[key])
        elif key in defaults_spec:
            table_level[key] = _default(key, value, defaults_spec[key], spec.params.get(key))
        elif key.startswith("default_") and _known_default(key[len("default_"):]):
            name = key[len("default_"):]
            if name in defaults_spec:  # a server default for another table kind is no error here
                server_level[name] = _default(key, value, defaults_spec[name], spec.params.get(name))
        else:
            known = sorted([*CONNECTION, *defaults_spec, *(f"default_{k}" for k in defaults_spec)])
            raise LlmError(f"unknown option {key!r} for an llmfdw {spec.name} table",
                           hint=f"Known options: {', '.join(known)}.", sqlstate=INVALID_PARAMETER_VALUE)
    if "timeout" in connection and not connection["timeout"] > 0:
        raise LlmError(f"option timeout must be a positive number of seconds, not {raw['timeout']!r}",
                       sqlstate=INVALID_PARAMETER_VALUE)
    return connection, {**server_level, **table_level}


def check_table_options(raw: dict[str, str]) -> None:
    """Called by the host's validator for a foreign table's options (CREATE/ALTER FOREIGN
    TABLE) that name a `table` kind: a typo fails when the DDL runs, not at the first query."""
    kind = raw.get("table")
    if kind not in SPECS:
        raise LlmError(f"unknown llmfdw table kind {kind!r}; expected one of {', '.join(sorted(SPECS))}",
                       hint="IMPORT FOREIGN SCHEMA llm FROM SERVER your_server INTO llm; creates the tables.",
                       sqlstate=INVALID_PARAMETER_VALUE)
    parse_options(SPECS[kind], raw)


def check_server_options(raw: dict[str, str]) -> None:
    """Called by the host's validator for a server of llmfdw's own tables (no wrapper option):
    its connection options and the request defaults (`default_<column>`) of any table kind."""
    for key, value in raw.items():
        if key in CONNECTION:
            _cast(key, value, CONNECTION[key])
        elif key.startswith("default_") and _known_default(key[len("default_"):]):
            name = key[len("default_"):]
            for spec in (s for s in SPECS.values() if name in s.option_parsers):   # each table it applies to
                _default(key, value, spec.option_parsers[name], spec.params.get(name))
        else:
            known = sorted({"address", "timeout", "tenant", *TLS_OPTIONS,
                            *(f"default_{k}" for spec in SPECS.values() for k in spec.option_parsers)})
            raise LlmError(f"unknown option {key!r} for an llmfdw server",
                           hint=f"Known options: {', '.join(known)}.", sqlstate=INVALID_PARAMETER_VALUE)
    if "timeout" in raw and not float(raw["timeout"]) > 0:
        raise LlmError(f"option timeout must be a positive number of seconds, not {raw['timeout']!r}",
                       sqlstate=INVALID_PARAMETER_VALUE)
    tls_settings(raw)


def _known_default(name: str) -> bool:
    return any(name in spec.option_parsers for spec in SPECS.values())


def _default(key: str, value: str, parse: Callable[[str], Any], param: Param | None) -> Any:
    """Option `key`, a request column's default: parsed, in the range of its generation
    parameter if it is one, and UTF-8 if text (a SQL_ASCII database keeps any bytes)."""
    parsed = _cast(key, value, parse)
    if param is not None:
        check_param(param, parsed, f"option {key}")
    if isinstance(parsed, str):
        check_utf8(f"option {key}", parsed)
    return parsed


def _cast(key: str, value: str, parse: Callable[[str], Any]) -> Any:
    try:
        return parse(value)
    except ValueError:
        kind = {int: "an integer", float: "a number"}.get(parse, "text")
        raise LlmError(f"option {key} must be {kind}, not {value!r}", sqlstate=INVALID_PARAMETER_VALUE) from None
