"""The FDW host itself (fdw/src), driven through real SQL with tests/echo_fdw.py.

No sidecar involved: these pin down the Multicorn-API behaviour (quals,
conversions, paths, errors, cancellation) that the llm.* tables build on.
"""
from __future__ import annotations

import time

import psycopg
import pytest

from backend_cancel import CANCEL_WITHIN_S, cancel_from_another_session


@pytest.fixture(scope="module")
def echo(pg_dsn):
    """Foreign tables backed by echo_fdw.EchoFdw, in schema echo."""
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("DROP SCHEMA IF EXISTS echo CASCADE")
        c.execute("DROP SERVER IF EXISTS echo CASCADE")
        c.execute("CREATE SCHEMA echo")
        c.execute("CREATE SERVER echo FOREIGN DATA WRAPPER llmfdw OPTIONS (wrapper 'echo_fdw.EchoFdw')")
        c.execute("""CREATE FOREIGN TABLE echo.quals (field text, op text, value text, pytype text,
                     key text, columns text[]) SERVER echo OPTIONS (mode 'quals')""")
        c.execute("""CREATE FOREIGN TABLE echo.rows (i int, label text, vec vector(3), tags text[],
                     flag bool, blob bytea, doc jsonb) SERVER echo OPTIONS (mode 'rows')""")
        for mode in ("error", "crash", "badrow", "warning"):
            c.execute(f"CREATE FOREIGN TABLE echo.{mode} (i int) SERVER echo OPTIONS (mode '{mode}')")
        c.execute("CREATE FOREIGN TABLE echo.wait (i int) SERVER echo OPTIONS (mode 'wait', seconds '30')")
    yield
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("DROP SCHEMA echo CASCADE")
        c.execute("DROP SERVER echo CASCADE")


def quals_seen(conn, where: str, params=()) -> list[tuple]:
    """The quals echo_fdw received; the row for the qual on `field` survives Postgres's recheck."""
    sql = f"SELECT field, op, value, pytype FROM echo.quals WHERE field = 'field' AND {where}"
    return conn.execute(sql, params).fetchall()


def test_rows_convert_through_type_input_functions(conn, echo):
    rows = conn.execute("SELECT i, label, vec::text, tags, flag, blob, doc FROM echo.rows ORDER BY i").fetchall()
    assert rows[1] == (1, "row 1", "[1,0.5,-1]", ["a", "b1", None], False, b"\x01\x00\xff", {"i": 1, "s": "x"})
    assert len(rows) == 3


def test_qual_values_have_python_types(conn, echo):
    assert conn.execute("SELECT op, value, pytype FROM echo.quals WHERE field = 'field'").fetchall() == [
        ("=", "'field'", "str")]
    # a commuted qual is normalised to column-on-the-left
    assert conn.execute("SELECT op, value FROM echo.quals WHERE 'field' = field").fetchall() == [("=", "'field'")]
    rows = conn.execute(
        "SELECT op, value, pytype FROM echo.quals WHERE field = ANY(ARRAY['field', 'x'])").fetchall()
    assert rows == [("= ANY", "['field', 'x']", "list")]


def test_null_tests_and_params(conn, echo):
    # IS NULL arrives as (col, '=', None); the row for it is filtered by recheck,
    # but the qual on field proves both were extracted in one call
    assert quals_seen(conn, "key IS NULL") == [("field", "=", "'field'", "str")]
    # a bound parameter (a Param in the plan) is evaluated at execution
    with conn.cursor() as cur:
        cur.execute("SELECT value, pytype FROM echo.quals WHERE field = %s", ("field",), prepare=True)
        assert cur.fetchall() == [("'field'", "str")]


def test_join_becomes_parameterized_per_row_quals(conn, echo):
    conn.execute("CREATE TEMP TABLE outer_keys (k text)")
    conn.execute("INSERT INTO outer_keys VALUES ('a'), ('b'), ('c')")
    plan = "\n".join(r[0] for r in conn.execute(
        "EXPLAIN SELECT * FROM outer_keys o JOIN echo.quals e ON e.key = o.k"))
    assert "Nested Loop" in plan and "Foreign Scan on quals" in plan
    rows = conn.execute(
        "SELECT o.k, e.value FROM outer_keys o JOIN echo.quals e ON e.key = o.k ORDER BY o.k").fetchall()
    assert rows == [("a", "'a'"), ("b", "'b'"), ("c", "'c'")]


def test_explain_shows_fdw_lines(conn, echo):
    plan = "\n".join(r[0] for r in conn.execute("EXPLAIN SELECT * FROM echo.quals WHERE field = 'x'"))
    assert "Multicorn: echo mode=quals" in plan
    assert "Multicorn: quals: field = x" in plan


@pytest.mark.parametrize("table, message", [
    ("error", "the echo table refuses"),
    ("crash", "ZeroDivisionError: boom"),
    ("badrow", "a result row has 2 values but the table has 1 columns"),
])
def test_python_failures_are_sql_errors_and_the_session_survives(conn, echo, table, message):
    with pytest.raises(psycopg.Error) as exc:
        conn.execute(f"SELECT * FROM echo.{table}")
    assert message in str(exc.value)
    if table == "error":
        assert exc.value.diag.message_hint == "ask nicely"
    if table == "crash":
        assert exc.value.diag.message_detail == "The Python traceback is in the server log."
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_warning_reaches_the_client(conn, echo):
    notices = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    assert conn.execute("SELECT i FROM echo.warning").fetchall() == [(1,)]
    assert "a warning from python" in notices


def test_wrapper_validation(conn, echo):
    with pytest.raises(psycopg.Error, match="No module named 'no_such_module'"):
        conn.execute("CREATE SERVER bad FOREIGN DATA WRAPPER llmfdw OPTIONS (wrapper 'no_such_module.X')")
    with pytest.raises(psycopg.Error, match='option "wrapper" belongs on a foreign server'):
        conn.execute("CREATE FOREIGN TABLE echo.bad (i int) SERVER echo OPTIONS (wrapper 'x.Y')")


def test_alter_foreign_table_rebuilds_the_instance(conn, echo):
    conn.execute("CREATE FOREIGN TABLE echo.n (i int) SERVER echo OPTIONS (mode 'rows', n '2')")
    assert conn.execute("SELECT count(*) FROM echo.n").fetchone() == (2,)
    conn.execute("ALTER FOREIGN TABLE echo.n OPTIONS (SET n '5')")
    assert conn.execute("SELECT count(*) FROM echo.n").fetchone() == (5,)


def test_statement_timeout_interrupts_a_waiting_scan(conn, echo):
    conn.execute("SET statement_timeout = '200ms'")
    start = time.monotonic()
    with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
        conn.execute("SELECT * FROM echo.wait")
    elapsed = time.monotonic() - start
    conn.execute("RESET statement_timeout")
    assert elapsed < 0.2 + CANCEL_WITHIN_S   # echo.wait would wait 30 s
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_pg_cancel_backend_interrupts_a_waiting_scan(conn, pg_dsn, echo):
    error, after = cancel_from_another_session(conn, pg_dsn, "SELECT * FROM echo.wait")
    assert isinstance(error, psycopg.errors.QueryCanceled)
    assert "user request" in str(error)
    assert after < CANCEL_WITHIN_S
    assert conn.execute("SELECT 1").fetchone() == (1,)
