"""What crosses the FDW host's boundary with Python: errors, column definitions, the default class.

Driven through real SQL with tests/boundary_fdw.py (encodings: tests/test_encoding.py).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest


@pytest.fixture(scope="module")
def boundary(pg_dsn) -> Iterator[None]:
    """Foreign tables backed by boundary_fdw.BoundaryFdw, in schema boundary."""
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("DROP SCHEMA IF EXISTS boundary CASCADE")
        c.execute("DROP SERVER IF EXISTS boundary CASCADE")
        c.execute("CREATE SCHEMA boundary")
        c.execute("CREATE SERVER boundary FOREIGN DATA WRAPPER llmfdw "
                  "OPTIONS (wrapper 'boundary_fdw.BoundaryFdw')")
        c.execute("CREATE FOREIGN TABLE boundary.typeerror (name text, value text) "
                  "SERVER boundary OPTIONS (mode 'typeerror')")
        c.execute("CREATE FOREIGN TABLE boundary.error (name text, value text) "
                  "SERVER boundary OPTIONS (mode 'error', codepoints '110,111')")
        c.execute("CREATE FOREIGN TABLE boundary.columns (name text, value text, zeta text, alpha int) "
                  "SERVER boundary OPTIONS (mode 'columns')")
        c.execute("CREATE FOREIGN TABLE boundary.thread (name text, value text) "
                  "SERVER boundary OPTIONS (mode 'thread')")
    yield
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("DROP SCHEMA boundary CASCADE")
        c.execute("DROP SERVER boundary CASCADE")


def server_log(work_dir: Path) -> str:
    """The test cluster's server log so far."""
    return (work_dir / "log" / "postgres.log").read_text(errors="replace")


def test_unexpected_exception_shows_type_and_message_but_no_paths(conn, boundary, work_dir):
    with pytest.raises(psycopg.Error) as exc:
        conn.execute("SELECT * FROM boundary.typeerror")
    diag = exc.value.diag
    assert diag.message_primary == "TypeError: unsupported operand type(s) for +: 'int' and 'str'"
    assert diag.context == "iterating over the result of execute()"
    client_sees = "\n".join(filter(None, [str(exc.value), diag.message_primary, diag.message_detail,
                                          diag.message_hint, diag.context]))
    for leak in ("/", "site-packages", "Traceback", ".py"):
        assert leak not in client_sees
    assert diag.message_detail == "The Python traceback is in the server log."
    # the traceback is not lost: it went to the server log
    log = server_log(work_dir)
    assert "Traceback (most recent call last)" in log and "boundary_fdw.py" in log
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_multicorn_exception_keeps_message_hint_detail_and_sqlstate(conn, boundary):
    with pytest.raises(psycopg.Error) as exc:
        conn.execute("SELECT * FROM boundary.error")
    diag = exc.value.diag
    assert (diag.message_primary, diag.message_hint, diag.message_detail) == ("no", "no", "no")
    assert diag.sqlstate == "HV000"  # fdw_error, as log_to_postgres(ERROR) always gave


def test_fdw_class_sees_its_columns_in_table_order(conn, boundary):
    rows = conn.execute("SELECT name, value, zeta FROM boundary.columns").fetchall()
    assert rows == [("name", "text", ""), ("value", "text", ""), ("zeta", "text", ""), ("alpha", "integer", "")]
    conn.execute("ALTER FOREIGN TABLE boundary.columns ADD COLUMN middle text")
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM boundary.columns")]
    finally:
        conn.execute("ALTER FOREIGN TABLE boundary.columns DROP COLUMN middle")
    assert names == ["name", "value", "zeta", "alpha", "middle"]


def test_server_without_wrapper_option_runs_the_sidecar_tables(conn):
    options = conn.execute("SELECT srvoptions FROM pg_foreign_server WHERE srvname = 'llm_sidecar'").fetchone()[0]
    assert not any(o.startswith("wrapper=") for o in options)
    names = {r[0] for r in conn.execute("SELECT name FROM llm.models")}
    assert "smollm2-135m-instruct" in names


def test_a_python_thread_never_enters_postgres(conn, boundary):
    """Python threads live in a backend (gRPC's; the one that frees a cancelled query's objects,
    whose finalizers may run FDW code): each host function refuses a call from one, since
    Postgres is not thread-safe, and the backend goes on."""
    rows = dict(conn.execute("SELECT name, value FROM boundary.thread").fetchall())
    assert set(rows) == {"log", "session", "interrupt_pending", "statement_time_left"}
    for name, value in rows.items():
        assert value == "RuntimeError: llmfdw: Postgres may only be called from the backend's own thread", name
    assert conn.execute("SELECT count(*) FROM boundary.thread").fetchone() == (4,)
