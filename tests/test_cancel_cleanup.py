"""A cancel that lands anywhere in a query over a long array ends it, and the backend goes on.

The host asks Postgres whether to stop while it converts the array to Python (every 4,096 items)
and hands what the cancelled query leaves behind (its traceback's frames, a half-built list) to a
thread that frees it once the transaction or subtransaction has ended (fdw/src/python.c), so a
Ctrl-C does not wait for 200,000 objects to be freed.  These tests check that every such path
ends in Postgres's own cancel error (57014) and leaves a backend that answers the next query
correctly, also when the cancel is caught inside a transaction.  They assert no timing: the
statement_timeout values only spread the cancel over the stages of the query (the array's
subquery, the conversion, the FDW's Python, the calls to the sidecar).
Everything runs as a plain role (a member of llm_user), but for the superuser's setup of a
server for tests/boundary_fdw.py.
"""
from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest

from roles import llm_user_role

ROLE = "cancel_carol"
BIG = ("SELECT count(*) FROM llm.embeddings WHERE input = ANY(ARRAY("
       "SELECT 'cancel me ' || g || ' ' || md5(g::text) FROM generate_series(1, 200000) g))")
SMALL = "SELECT count(*) FROM llm.embeddings WHERE input = ANY(ARRAY['one', 'two', 'one'])"


@pytest.fixture(scope="module")
def carol(pg_dsn):
    """The conninfo of a plain role that may query the llm tables."""
    with llm_user_role(pg_dsn, ROLE) as conninfo:
        yield conninfo


def test_cancels_at_every_stage_of_a_long_array_end_the_query_and_the_backend_goes_on(carol):
    with psycopg.connect(carol, autocommit=True) as c:
        pid = c.info.backend_pid
        assert c.execute(SMALL).fetchone() == (2,)
        for timeout in ("1ms", "20ms", "60ms", "150ms", "300ms", "600ms", "1200ms"):
            c.execute(f"SET statement_timeout = '{timeout}'")
            with pytest.raises(psycopg.errors.QueryCanceled) as err:
                c.execute(BIG)
            assert err.value.sqlstate == "57014"
            c.execute("RESET statement_timeout")
            assert c.execute(SMALL).fetchone() == (2,), f"after a cancel at {timeout}"
        assert c.execute("SELECT pg_backend_pid()").fetchone() == (pid,)   # the same backend, alive


def test_a_cancel_caught_in_a_transaction_lets_it_go_on(carol):
    """The garbage is freed when the subtransaction ends, while the transaction and its Python
    go on: a savepoint, and a PL/pgSQL block that catches query_canceled."""
    with psycopg.connect(carol) as c:
        c.execute("SAVEPOINT s")
        c.execute("SET LOCAL statement_timeout = '200ms'")
        with pytest.raises(psycopg.errors.QueryCanceled):
            c.execute(BIG)
        c.execute("ROLLBACK TO SAVEPOINT s")
        c.execute("SET LOCAL statement_timeout = 0")
        assert c.execute(SMALL).fetchone() == (2,)
        c.commit()
    with psycopg.connect(carol, autocommit=True) as c:
        notices: list[str] = []
        c.add_notice_handler(lambda d: notices.append(d.message_primary))
        c.execute("SET statement_timeout = '200ms'")   # armed once, for the whole DO
        c.execute(f"""
            DO $$
            DECLARE n bigint;
            BEGIN
                BEGIN
                    EXECUTE $q${BIG}$q$ INTO n;
                EXCEPTION WHEN query_canceled THEN
                    RAISE NOTICE 'caught %', SQLSTATE;
                END;
                EXECUTE $q${SMALL}$q$ INTO n;
                RAISE NOTICE 'then %', n;
            END $$""")
        assert notices == ["caught 57014", "then 2"]


@pytest.fixture(scope="module")
def freed_table(pg_dsn, carol) -> Iterator[None]:
    """freeing.freed and freeing.where_freed (tests/boundary_fdw.py), readable by the plain role."""
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("DROP SCHEMA IF EXISTS freeing CASCADE")
        c.execute("DROP SERVER IF EXISTS freeing CASCADE")
        c.execute("CREATE SCHEMA freeing")
        c.execute("CREATE SERVER freeing FOREIGN DATA WRAPPER llmfdw OPTIONS (wrapper 'boundary_fdw.BoundaryFdw')")
        for mode in ("freed", "where_freed"):
            c.execute(f"CREATE FOREIGN TABLE freeing.{mode} (name text, value text) "
                      f"SERVER freeing OPTIONS (mode '{mode}')")
        c.execute(f"GRANT USAGE ON SCHEMA freeing TO {ROLE}")
        c.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA freeing TO {ROLE}")
    yield
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("DROP SCHEMA freeing CASCADE")
        c.execute("DROP SERVER freeing CASCADE")


def where_freed(c: psycopg.Connection) -> str:
    """Where the last freeing.freed scan's quals were freed, once they are (the freeing thread
    runs after the transaction, beside the backend: this waits for it, asserting no time)."""
    for _ in range(400):
        where = c.execute("SELECT value FROM freeing.where_freed").fetchone()[0]
        if where != "not yet":
            return where
        time.sleep(0.05)
    return where


def test_an_aborted_scan_frees_its_quals_off_the_backend_thread(carol, freed_table):
    """Postgres fails between two rows: the abort closes the generator on the backend's thread
    (its finally blocks cancel its calls there) but leaves its quals, which for `input =
    ANY(<200,000 texts>)` took milliseconds to free, to the freeing thread.  A scan that ends
    normally frees them at once, on the backend's thread."""
    scan = "SELECT {} FROM freeing.freed WHERE name = ANY(ARRAY['x', 'y'])"
    with psycopg.connect(carol, autocommit=True) as c:
        assert c.execute(scan.format("count(*)")).fetchone() == (2,)
        assert where_freed(c) == "backend thread"
        with pytest.raises(psycopg.errors.DivisionByZero):
            c.execute(scan.format("1 / (value::int - 2)"))   # fails on the second row
        assert where_freed(c) == "another thread"
        assert c.execute(scan.format("count(*)")).fetchone() == (2,)   # and the backend goes on
