"""Multicorn2's ``multicorn.utils``: report to Postgres from FDW code.

Inside the llmfdw host, messages go to Postgres through the built-in module
``_llmfdw_host``; elsewhere (plain Python, tests) they go to ``logging``.
"""
from __future__ import annotations

import logging

try:  # present only inside a Postgres backend running the llmfdw host
    import _llmfdw_host as _host
except ImportError:  # pragma: no cover - exercised outside Postgres
    _host = None

__all__ = ["MulticornException", "log_to_postgres", "check_interrupts", "ERROR", "CRITICAL",
           "WARNING", "INFO", "DEBUG"]

DEBUG, INFO, WARNING, ERROR, CRITICAL = (logging.DEBUG, logging.INFO, logging.WARNING,
                                         logging.ERROR, logging.CRITICAL)


class MulticornException(Exception):
    """Raised by log_to_postgres(ERROR): becomes a SQL ERROR once Python has unwound."""

    def __init__(self, message: str, hint: str | None = None, detail: str | None = None,
                 sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.detail = detail
        self.sqlstate = sqlstate


def log_to_postgres(message: str, level: int = INFO, hint: str | None = None,
                    detail: str | None = None) -> None:
    """Report a message; ERROR and CRITICAL raise MulticornException.

    Levels map as in Multicorn2: DEBUG -> DEBUG1, INFO -> NOTICE,
    WARNING -> WARNING.  Unlike Multicorn2, CRITICAL is an ERROR, not a FATAL
    that would end the user's session.
    """
    if level >= ERROR:
        raise MulticornException(message, hint=hint, detail=detail)
    if _host is None:
        logging.getLogger("multicorn").log(level, message)
        return
    pg_level = {DEBUG: _host.DEBUG, INFO: _host.NOTICE, WARNING: _host.WARNING}.get(level)
    if pg_level is None:
        raise KeyError(level)
    _host.log(pg_level, message, hint, detail)


class QueryCanceled(Exception):
    """Postgres asked the running query to stop (cancel, statement_timeout, terminate)."""


def check_interrupts() -> None:
    """Raise QueryCanceled if Postgres wants the current query to stop.

    The host then reports Postgres's own cancel error.  Outside Postgres this
    never raises.
    """
    if _host is not None and _host.interrupt_pending():
        raise QueryCanceled("query canceled")
