"""Ugly inputs: every operator on every column, NULLs, empty and huge texts.

Each query must either return correct rows or fail with a clear SQL error;
the backend must never crash (same backend pid afterwards) and the same
connection must run the next query.
"""
from __future__ import annotations

import psycopg
import pytest

OPERATORS = ["= {v}", "<> {v}", "< {v}", ">= {v}", "IS NULL", "IS NOT NULL", "= ANY(ARRAY[{v}, {v}])",
             "<> ALL(ARRAY[{v}])", "IN ({v}, {v})", "BETWEEN {v} AND {v}", "IS DISTINCT FROM {v}"]
TEXT_OPERATORS = ["LIKE {v}", "ILIKE {v}", "~ {v}"]
VALUES = {"text": ["'x'", "''", "NULL::text"], "integer": ["2", "-1", "NULL::int"], "bigint": ["2", "NULL::bigint"],
          "double precision": ["0.5", "-1", "'NaN'::float8"], "text[]": ["ARRAY['x']", "'{}'::text[]"],
          "vector": ["NULL::vector"], "boolean": ["true"]}


def columns(conn, table: str) -> list[tuple[str, str]]:
    return conn.execute(
        "SELECT attname, format_type(atttypid, NULL) FROM pg_attribute "
        "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum", (table,)).fetchall()


def survives(conn, sql: str, pid: int) -> str:
    """Run sql; return 'rows' or 'error: ...', after checking the session is intact."""
    try:
        conn.execute(sql).fetchall()
        outcome = "rows"
    except psycopg.OperationalError:
        raise
    except psycopg.Error as err:
        assert err.diag.message_primary, f"error without a message for {sql}"
        outcome = f"error: {err.diag.message_primary}"
    assert conn.execute("SELECT pg_backend_pid()").fetchone() == (pid,), f"backend changed after {sql}"
    return outcome


@pytest.fixture
def short_answers(conn):
    """Two-token answers keep a few hundred generations fast."""
    conn.execute("ALTER FOREIGN TABLE llm.completions OPTIONS (ADD max_tokens '2')")
    yield
    conn.execute("ALTER FOREIGN TABLE llm.completions OPTIONS (DROP max_tokens)")


@pytest.mark.parametrize("table, required", [
    ("llm.completions", "prompt = 'Say hi.'"),
    ("llm.embeddings", "input = 'hello'"),
    ("llm.models", "true"),
])
def test_every_operator_on_every_column(conn, short_answers, table, required):
    pid = conn.info.backend_pid
    outcomes = {}
    for name, typ in columns(conn, table):
        base = typ.split("(")[0]
        ops = OPERATORS + (TEXT_OPERATORS if base == "text" else [])
        for op in ops:
            for v in VALUES.get(base, ["NULL"]):
                if base == "vector" and "{v}" in op and "ANY" not in op and "ALL" not in op and "IN" not in op:
                    v = "llm.embed('hello')"
                pred = f"{name} {op.format(v=v)}"
                for sql in (f"SELECT * FROM {table} WHERE {required} AND {pred}",
                            f"SELECT * FROM {table} WHERE {pred}"):
                    outcomes[sql] = survives(conn, sql, pid)
    # errors must be the ones we wrote for users, or Postgres's own type errors
    for sql, outcome in outcomes.items():
        if outcome.startswith("error"):
            assert "Traceback" not in outcome and "Error:" not in outcome.split(":", 1)[1][:40], (sql, outcome)
    assert any(o == "rows" for o in outcomes.values())


def test_nulls_empties_and_huge_inputs(conn):
    pid = conn.info.backend_pid
    assert conn.execute("SELECT * FROM llm.completions WHERE prompt = NULL").fetchall() == []
    assert conn.execute("SELECT * FROM llm.embeddings WHERE input IS NULL").fetchall() == []
    assert conn.execute("SELECT * FROM llm.embeddings WHERE input = ANY(ARRAY[NULL, NULL]::text[])").fetchall() == []
    assert conn.execute("SELECT * FROM llm.embeddings WHERE input = ANY('{}'::text[])").fetchall() == []
    assert conn.execute("SELECT vector_dims(embedding) FROM llm.embeddings WHERE input = ''").fetchone() == (384,)
    row = conn.execute("SELECT completion IS NOT NULL FROM llm.completions WHERE prompt = '' AND max_tokens = 3").fetchone()
    assert row == (True,)
    huge = "All work and no play makes Jack a dull boy. " * 23000   # ~1 MB, under max_input_bytes
    row = conn.execute("SELECT truncated, input_tokens FROM llm.embeddings WHERE input = %s", (huge,)).fetchone()
    assert row[0] is True and row[1] > 256
    with pytest.raises(psycopg.Error) as exc:
        conn.execute("SELECT completion FROM llm.completions WHERE prompt = %s", (huge,))
    assert "context" in str(exc.value).lower() or "too long" in str(exc.value).lower() or "exceed" in str(exc.value).lower()
    assert exc.value.sqlstate == "22023"
    assert survives(conn, "SELECT 1", pid) == "rows"
    weird = "naïve café \u202e 🐘 \t\n \\ ' \""
    row = conn.execute("SELECT input FROM llm.embeddings WHERE input = %s", (weird,)).fetchone()
    assert row == (weird,)
