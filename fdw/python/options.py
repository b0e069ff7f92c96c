"""Options of the llm.* foreign tables, from table, server and user mapping.

The host merges them into one dict (Multicorn's order: table, then server,
then user mapping; a later source wins).  Defaults for the request follow
the opposite order a user expects: a table option ``model`` (or
``max_tokens``, ...) wins over the server's ``default_model`` (or
``default_max_tokens``, ...).  Unknown options are errors, so a typo is
never silently ignored.
"""
from __future__ import annotations

from typing import Any, Callable

from llmfdw.fdw.errors import INVALID_PARAMETER_VALUE, LlmError

# name -> parser, for options that are not request defaults
CONNECTION: dict[str, Callable[[str], Any]] = {
    "address": str, "timeout": float, "tenant": str, "token": str, "table": str,
}
# request defaults per table kind: usable as `name` (table) or `default_name` (server)
DEFAULTS: dict[str, dict[str, Callable[[str], Any]]] = {
    "completions": {"model": str, "system": str, "max_tokens": int, "temperature": float,
                    "top_p": float, "seed": int},
    "embeddings": {"model": str},
    "models": {},
    "usage": {},
}


def parse_options(kind: str, raw: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(connection settings, request defaults) from the merged options."""
    defaults_spec = DEFAULTS[kind]
    connection: dict[str, Any] = {}
    table_level: dict[str, Any] = {}
    server_level: dict[str, Any] = {}
    for key, value in raw.items():
        if key in CONNECTION:
            connection[key] = _cast(key, value, CONNECTION[key])
        elif key in defaults_spec:
            table_level[key] = _cast(key, value, defaults_spec[key])
        elif key.startswith("default_") and key[len("default_"):] in defaults_spec:
            name = key[len("default_"):]
            server_level[name] = _cast(key, value, defaults_spec[name])
        else:
            known = sorted([*CONNECTION, *defaults_spec, *(f"default_{k}" for k in defaults_spec)])
            raise LlmError(f"unknown option {key!r} for llm.{kind}",
                           hint=f"Known options: {', '.join(known)}.", sqlstate=INVALID_PARAMETER_VALUE)
    return connection, {**server_level, **table_level}


def _cast(key: str, value: str, parse: Callable[[str], Any]) -> Any:
    try:
        return parse(value)
    except ValueError:
        kind = {int: "an integer", float: "a number"}.get(parse, "text")
        raise LlmError(f"option {key} must be {kind}, not {value!r}", sqlstate=INVALID_PARAMETER_VALUE) from None
