"""The planner's choice of the batched nested loop (fdw/src/batchjoin_plan.c) has no cliffs.

`UPDATE t SET emb = e.embedding FROM llm.embeddings e WHERE e.input = t.body` sends one request
per batch of outer rows through the batched node, or one request per outer row through the plain
parameterized Nested Loop.  The node must be chosen for every outer size, on both sides of each
batch boundary, with fresh statistics, with none (no ANALYZE after a big insert) and after bloat
(every row updated once), and the join's row estimate must be about the outer rows (each input is
one embedding), not the unparameterized scan's guess of a billion.  EXPLAIN only: no model work.
"""
from __future__ import annotations

import re

import pytest

NODE = "LLM Batched Nested Loop"
SIZES = (1, 2, 10, 999, 1000, 1001, 1100, 1999, 2001, 5000, 20000, 50000)
UPDATE = "UPDATE {t} SET emb = e.embedding FROM llm.embeddings e WHERE e.input = {t}.body"


def plan(conn, sql: str, costs: bool = False) -> str:
    return "\n".join(r[0] for r in conn.execute(f"EXPLAIN (COSTS {'ON' if costs else 'OFF'}) {sql}"))


def estimates(conn, sql: str) -> tuple[float, float]:
    """Row estimates of the join (the first line below ModifyTable) and of its outer scan (the
    planner's guess of the outer rows, which without statistics is not n)."""
    lines = plan(conn, sql, costs=True).splitlines()
    rows = [float(re.search(r"rows=(\d+)", line).group(1)) for line in lines if "rows=" in line]
    return rows[1], rows[2]


@pytest.fixture
def big(conn):
    """50,000 distinct short texts, analyzed: outer sizes come from WHERE id <= n."""
    conn.execute("CREATE TEMP TABLE big (id int PRIMARY KEY, body text, emb vector(384))")
    conn.execute("INSERT INTO big SELECT g, 'note ' || g FROM generate_series(1, 50000) g")
    conn.execute("ANALYZE big")
    yield "big"
    conn.execute("DROP TABLE big")


def table(conn, name: str, n: int) -> str:
    """A fresh table of n distinct texts that was never analyzed (the planner guesses from pages)."""
    conn.execute(f"CREATE TEMP TABLE {name} (id int, body text, emb vector(384))")
    conn.execute(f"INSERT INTO {name} SELECT g, 'note ' || g FROM generate_series(1, {n}) g")
    return name


def assert_batched(conn, sql: str, outer: int, what: str) -> None:
    text = plan(conn, sql)
    assert NODE in text, f"{what}, {outer} outer rows: plain nested loop\n{text}"
    join, outer_estimate = estimates(conn, sql)
    assert join <= outer_estimate, f"{what}, {outer} outer rows: join estimate {join}, outer {outer_estimate}"


def test_update_from_is_batched_at_every_size_with_fresh_statistics(conn, big):
    for n in SIZES:
        assert_batched(conn, UPDATE.format(t="big") + f" AND big.id <= {n}", n, "analyzed, WHERE id <= n")


def test_update_from_is_batched_with_stale_statistics_and_after_bloat(conn):
    for n in SIZES:
        t = table(conn, f"fresh_{n}", n)
        try:
            assert_batched(conn, UPDATE.format(t=t), n, "never analyzed")
            conn.execute(f"ANALYZE {t}")
            conn.execute(f"INSERT INTO {t} SELECT g, 'note ' || g FROM generate_series({n} + 1, {2 * n}) g")
            assert_batched(conn, UPDATE.format(t=t), 2 * n, "stale statistics after doubling")
            conn.execute(f"UPDATE {t} SET emb = NULL")
            assert_batched(conn, UPDATE.format(t=t), 2 * n, "after bloat")
        finally:
            conn.execute(f"DROP TABLE {t}")


def test_select_join_is_batched_and_estimated_at_the_outer_rows(conn, big):
    for n in (1, 1001, 2001):
        sql = f"SELECT b.id, e.dimensions FROM big b JOIN llm.embeddings e ON e.input = b.body WHERE b.id <= {n}"
        text = plan(conn, sql, costs=True)
        assert NODE in text, text
        rows = float(re.search(r"rows=(\d+)", text.splitlines()[0]).group(1))
        assert rows <= 2 * n + 10, text
