"""Ugly inputs: every operator on every column, NULLs, empty and huge texts.

Each query must either return correct rows or fail with a clear SQL error;
the backend must never crash (same backend pid afterwards) and the same
connection must run the next query.

Two levels.  The FDW host's qual handling (fdw/src/quals.c, convert.c) is fuzzed through
tests/echo_fdw.py, which reports every qual it receives as a NOTICE and runs no model: every
operator, with constants, NULLs and LATERAL parameters, on a column of every type the host
converts, checking the Python type each qual value arrives as.  The llm tables' own key-column
rules (a required qual missing, a request column the request did not take) are fuzzed on the
real tables with one value per type, so that each generation is two tokens long.
"""
from __future__ import annotations

import psycopg
import pytest

OPERATORS = ["= {v}", "<> {v}", "< {v}", ">= {v}", "IS NULL", "IS NOT NULL", "= ANY(ARRAY[{v}, {v}])",
             "<> ALL(ARRAY[{v}])", "IN ({v}, {v})", "BETWEEN {v} AND {v}", "IS DISTINCT FROM {v}"]
TEXT_OPERATORS = ["LIKE {v}", "ILIKE {v}", "~ {v}"]
# one value per type on the real tables (each non-error query generates)
VALUES = {"text": ["'x'"], "integer": ["2"], "bigint": ["2"], "double precision": ["'NaN'::float8"],
          "text[]": ["ARRAY['x']"], "vector": ["NULL::vector"], "boolean": ["true"]}

# The echo table: column type -> (values to compare with, the Python types a pushed value may have)
HOST_TYPES = {
    "text": (["'x'", "''", "repeat('é🐘', 50000)", "NULL::text"], "str"),
    "integer": (["2", "-2147483648", "NULL::int"], "int"),
    "bigint": (["9223372036854775807", "NULL::bigint"], "int"),
    "double precision": (["0.5", "'NaN'::float8", "'-Infinity'::float8"], "float"),
    "numeric": (["1.25", "'NaN'::numeric"], "float"),   # as Multicorn2: numeric -> float
    "boolean": (["true", "NULL::bool"], "bool"),
    "text[]": (["ARRAY['x', NULL]", "'{}'::text[]"], "list"),
    "bytea": (["'\\x00ff'::bytea"], "bytes"),
    # as Multicorn2: other types arrive as their text output, and so does a date Python cannot hold
    "jsonb": (["'{\"a\": [1, null]}'::jsonb"], "str"),
    "vector": (["'[1,2,3]'::vector"], "str"),
    "date": (["'2026-01-31'::date", "'infinity'::date"], "date str"),
    "timestamptz": (["'2026-01-31 12:00+00'::timestamptz"], "str"),
}


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


@pytest.fixture(scope="module")
def echo_types(pg_dsn):
    """fuzz.types: one column of every type in HOST_TYPES, backed by echo_fdw in `notice` mode."""
    cols = ", ".join(f"c{i} {typ}{'(3)' if typ == 'vector' else ''}" for i, typ in enumerate(HOST_TYPES))
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("DROP SCHEMA IF EXISTS fuzz CASCADE")
        c.execute("DROP SERVER IF EXISTS fuzz_echo CASCADE")
        c.execute("CREATE SCHEMA fuzz")
        c.execute("CREATE SERVER fuzz_echo FOREIGN DATA WRAPPER llmfdw OPTIONS (wrapper 'echo_fdw.EchoFdw')")
        c.execute(f"CREATE FOREIGN TABLE fuzz.types ({cols}) SERVER fuzz_echo OPTIONS (mode 'notice')")
    yield
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("DROP SCHEMA fuzz CASCADE")
        c.execute("DROP SERVER fuzz_echo CASCADE")


def value_type(op: str, pytype: str, typ: str) -> bool:
    """Whether a qual value of Python type `pytype` fits a qual with operator `op` on a column of
    SQL type `typ`: the column's Python type, None for NULL, a list for ANY/ALL."""
    if op.endswith(("ANY", "ALL")):
        return pytype in ("list", "NoneType")
    return pytype in (*HOST_TYPES[typ][1].split(), "NoneType")


@pytest.mark.parametrize("typ", list(HOST_TYPES))
def test_host_quals_of_every_type_and_operator(conn, echo_types, typ):
    """Every operator on a column of type `typ` (constants, NULLs, LATERAL parameters): the
    backend survives, errors are Postgres's own or clean, and each qual the host pushes arrives
    in Python as the column's type (SQL NULL as None, ANY/ALL as a list)."""
    column = f"c{list(HOST_TYPES).index(typ)}"
    pid = conn.info.backend_pid
    seen: list[str] = []
    conn.add_notice_handler(lambda d: seen.append(d.message_primary or ""))
    ops = OPERATORS + (TEXT_OPERATORS if typ == "text" else [])
    outcomes, pushed = {}, 0
    for op in ops:
        for v in HOST_TYPES[typ][0]:
            pred = op.format(v=v)
            for sql in (f"SELECT * FROM fuzz.types WHERE {column} {pred}",
                        f"SELECT s.* FROM (VALUES ({v})) p(x) CROSS JOIN LATERAL "
                        f"(SELECT * FROM fuzz.types WHERE {column} {op.format(v='p.x')}) s"):
                seen.clear()
                outcomes[sql] = survives(conn, sql, pid)
                quals = [m.split("\t") for m in seen if m.startswith("qual\t")]
                for _, field, qop, pytype, _ in quals:
                    assert field == column, (sql, field)
                    assert value_type(qop, pytype, typ), (sql, qop, pytype)
                pushed += len(quals)
    for sql, outcome in outcomes.items():
        assert outcome == "rows" or "Python" not in outcome and "Traceback" not in outcome, (sql, outcome)
    assert pushed > len(HOST_TYPES[typ][0]), "no qual reached the FDW class"


def test_host_survives_huge_and_odd_quals(conn, echo_types):
    """A 100,000-element ANY list, a 10 MB text, a NUL-free but odd Unicode text."""
    pid = conn.info.backend_pid
    seen: list[str] = []
    conn.add_notice_handler(lambda d: seen.append(d.message_primary or ""))
    conn.execute("SELECT * FROM fuzz.types WHERE c1 = ANY(%s)", (list(range(100_000)),)).fetchall()
    assert any(m.startswith("qual\tc1\t= ANY\tlist") for m in seen)
    seen.clear()
    conn.execute("SELECT * FROM fuzz.types WHERE c0 = %s", ("x" * 10_000_000,)).fetchall()
    assert seen == ["qual\tc0\t=\tstr\t'" + "x" * 10_000_000 + "'"]   # the whole text, once
    seen.clear()
    odd = "\u202e\U0001f418\ud7ff\t\\'\""
    conn.execute("SELECT * FROM fuzz.types WHERE c0 = %s", (odd,)).fetchall()
    assert seen == [f"qual\tc0\t=\tstr\t{odd!r}"]
    assert survives(conn, "SELECT 1", pid) == "rows"


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
