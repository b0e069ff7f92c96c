"""A batched join (fdw/src/batchjoin_*.c) on a foreign table whose key column has a non-ASCII name.

The batched join finds the class's batch_key_columns and request_columns among the table's
columns by name: in a LATIN1 database "clé" is stored as other bytes than the UTF-8 that Python's
C API gives, so the names must be converted to the server encoding first (llmfdw_attnums_of).
Before that, a LATIN1 database planned such a join as the plain nested loop, one execute() per
outer row.  tests/keyed_fdw.py is the FDW class.
"""
from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

ENCODINGS = ["UTF8", "LATIN1"]


@pytest.fixture(scope="module", params=ENCODINGS)
def db(request, pg_server) -> Iterator[psycopg.Connection]:
    """A UTF8-client connection to a fresh database in that encoding: a keyed foreign table whose
    columns are "clé" and "réponse", and a local table of outer rows with a repeated key."""
    name = f"llmfdw_join_{request.param.lower()}"
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {name} ENCODING '{request.param}' LC_COLLATE 'C' LC_CTYPE 'C' "
                  "TEMPLATE template0")
    with psycopg.connect(pg_server.dsn(name), autocommit=True, client_encoding="UTF8") as conn:
        conn.execute("CREATE EXTENSION llmfdw CASCADE")
        conn.execute("CREATE SERVER keyed FOREIGN DATA WRAPPER llmfdw OPTIONS (wrapper 'keyed_fdw.KeyedFdw')")
        conn.execute("""CREATE FOREIGN TABLE mots ("clé" text, "réponse" text) SERVER keyed
                        OPTIONS (key 'clé', answer 'réponse')""")
        conn.execute("CREATE TABLE docs (id int, body text)")
        conn.execute("INSERT INTO docs VALUES (1, 'café'), (2, 'thé'), (3, 'café'), (4, NULL)")
        conn.execute("ANALYZE docs")
        yield conn
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as c:
        c.execute(f"DROP DATABASE {name} WITH (FORCE)")


JOIN = 'SELECT d.id, m."clé", m."réponse" FROM docs d JOIN mots m ON m."clé" = d.body ORDER BY d.id'


def test_join_on_a_non_ascii_key_column_is_batched(db):
    plan = "\n".join(r[0] for r in db.execute("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + JOIN))
    assert "LLM Batched Nested Loop" in plan, plan
    assert 'Batched Keys: "clé" = ANY(d.body)' in plan, plan
    assert "Requests: 1" in plan, plan


def test_rows_of_the_batched_join_are_the_nested_loops(db):
    batched = db.execute(JOIN).fetchall()
    db.execute("SET llmfdw.join_batch_size = 0")
    try:
        plain = db.execute(JOIN).fetchall()
    finally:
        db.execute("RESET llmfdw.join_batch_size")
    assert batched == plain == [(1, "café", "CAFÉ"), (2, "thé", "THÉ"), (3, "café", "CAFÉ")]
