"""The batched nested loop (fdw/src/batchjoin_plan.c, batchjoin_exec.c): joins with llm.* tables, one request per batch.

A join, UPDATE ... FROM or LATERAL query with llm.embeddings / llm.completions runs as a custom
join node that sends the keys of a whole batch of outer rows in one execute() call
(`input = ANY(list)`: one Embed request, or concurrent Generate calls), then matches the rows that
come back to their outer rows.  Every test compares with the plain nested loop
(SET llmfdw.join_batch_size = 0): same rows, same NULLs, same duplicates.  Vectors are compared
by cosine (tests/vectors.py): the model's numerics depend on how many inputs share a batch, and
in bfloat16 that shows in the 4th decimal.
"""
from __future__ import annotations

import re
import threading
import time

import psycopg
import pytest

from backend_cancel import (CANCEL_WITHIN_S, assert_generation_stops, cancel_from_another_session,
                            generation_tokens, wait_until_decoding)
from sidecar_process import sample, scrape
from vectors import assert_same_embeddings

NODE = "LLM Batched Nested Loop"


def plan(conn, sql: str, params=None, analyze: bool = False) -> str:
    options = "ANALYZE, COSTS OFF, SUMMARY OFF, BUFFERS OFF" if analyze else "COSTS OFF"
    return "\n".join(r[0] for r in conn.execute(f"EXPLAIN ({options}) {sql}", params))


def requests(port: int, rpc: str) -> float:
    return sample(scrape(port), "llmfdw_requests_total", rpc=rpc)


def unbatched(conn, sql: str, params=None) -> list:
    """The rows of sql as the plain parameterized nested loop makes them."""
    conn.execute("SET llmfdw.join_batch_size = 0")
    try:
        assert NODE not in plan(conn, sql, params)
        return conn.execute(sql, params).fetchall()
    finally:
        conn.execute("RESET llmfdw.join_batch_size")


def vectors(rows) -> list:
    """The last column of each row (an embedding)."""
    return [r[-1] for r in rows]


def bulk_form(conn) -> list:
    """(id, body, embedding) of docs from the bulk form: one Embed request, no join with the table."""
    sql = ("WITH e AS MATERIALIZED (SELECT input, embedding FROM llm.embeddings "
           "WHERE input = ANY(ARRAY(SELECT body FROM docs))) "
           "SELECT d.id, d.body, e.embedding FROM docs d JOIN e ON e.input = d.body ORDER BY d.id")
    assert NODE not in plan(conn, sql)
    return conn.execute(sql).fetchall()


@pytest.fixture
def docs(conn):
    """100 distinct short texts."""
    conn.execute("CREATE TEMP TABLE docs (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO docs SELECT g, 'note number ' || g || ' about topic ' || g % 7 "
                 "FROM generate_series(1, 100) g")
    conn.execute("ANALYZE docs")
    return "docs"


@pytest.fixture
def repeats(conn):
    """60 rows over 4 distinct texts, plus two NULL bodies."""
    conn.execute("CREATE TEMP TABLE repeats (id int, body text)")
    conn.execute("INSERT INTO repeats SELECT g, (ARRAY['a cat', 'a dog sat on the mat', 'tax forms', "
                 "'the quarterly revenue of the company grew'])[g % 4 + 1] FROM generate_series(1, 60) g")
    conn.execute("INSERT INTO repeats VALUES (61, NULL), (62, NULL)")
    conn.execute("ANALYZE repeats")
    return "repeats"


def test_plain_join_is_one_embed_request_with_the_rows_of_the_plain_plan(conn, docs, sidecar_metrics_port):
    sql = "SELECT d.id, e.input, e.embedding FROM docs d JOIN llm.embeddings e ON e.input = d.body ORDER BY d.id"
    text = plan(conn, sql)
    assert NODE in text and "Batch Size: 1000" in text and "Batched Keys: input = ANY(d.body)" in text
    assert text.index("Sort") < text.index(NODE), "the node claims no order: a Sort does it"
    before = requests(sidecar_metrics_port, "Embed")
    rows = conn.execute(sql).fetchall()
    assert requests(sidecar_metrics_port, "Embed") - before == 1
    assert [(r[0], r[1]) for r in rows] == [(i, f"note number {i} about topic {i % 7}") for i in range(1, 101)]

    assert_same_embeddings(vectors(rows), vectors(bulk_form(conn)))
    plain = unbatched(conn, sql)
    assert [r[:2] for r in plain] == [r[:2] for r in rows]
    assert_same_embeddings(vectors(plain), vectors(rows))


def test_explain_analyze_counts_batches_and_requests(conn, docs, sidecar_metrics_port):
    conn.execute("SET llmfdw.join_batch_size = 40")
    before = requests(sidecar_metrics_port, "Embed")
    text = plan(conn, "SELECT d.id, e.dimensions FROM docs d JOIN llm.embeddings e ON e.input = d.body",
                analyze=True)
    assert "Batch Size: 40" in text and "Batches: 3" in text and "Requests: 3" in text, text
    assert re.search(r"Nested Loop\) \(actual time=\S+ rows=100(\.00)? ", text), text
    assert requests(sidecar_metrics_port, "Embed") - before == 3


def test_duplicates_and_nulls_among_outer_keys_inner_and_left(conn, repeats, sidecar_metrics_port):
    for join in ("JOIN", "LEFT JOIN"):
        sql = (f"SELECT r.id, e.input, e.dimensions FROM repeats r {join} llm.embeddings e ON e.input = r.body "
               "ORDER BY r.id")
        assert NODE in plan(conn, sql)
        before = requests(sidecar_metrics_port, "Embed")
        rows = conn.execute(sql).fetchall()
        assert requests(sidecar_metrics_port, "Embed") - before == 1  # 4 distinct inputs, one request
        assert rows == unbatched(conn, sql)
        assert len(rows) == (60 if join == "JOIN" else 62)
    assert rows[-2:] == [(61, None, None), (62, None, None)]


@pytest.mark.parametrize("exists", ["EXISTS", "NOT EXISTS"])
def test_semi_and_anti_joins(conn, repeats, exists):
    sql = (f"SELECT r.id FROM repeats r WHERE {exists} (SELECT 1 FROM llm.embeddings e "
           "WHERE e.input = r.body AND e.input_tokens > 4) ORDER BY r.id")
    text = plan(conn, sql)
    assert NODE in text and ("Join Type: Semi" if exists == "EXISTS" else "Join Type: Anti") in text, text
    rows = conn.execute(sql).fetchall()
    assert rows == unbatched(conn, sql)
    # 'a cat' and 'tax forms' are short; the NULL bodies match nothing
    expected = [(i,) for i in range(1, 61) if i % 4 in (1, 3)]
    assert rows == (expected if exists == "EXISTS" else
                    sorted(set((i,) for i in range(1, 63)) - set(expected)))


def test_other_join_clauses_are_rechecked_on_each_pair(conn, repeats):
    conn.execute("ALTER TABLE repeats ADD COLUMN min_tokens int")
    conn.execute("UPDATE repeats SET min_tokens = id % 10")
    sql = ("SELECT r.id, e.input_tokens FROM repeats r LEFT JOIN llm.embeddings e "
           "ON e.input = r.body AND e.input_tokens > r.min_tokens ORDER BY r.id")
    assert NODE in plan(conn, sql)
    rows = conn.execute(sql).fetchall()
    assert rows == unbatched(conn, sql)
    assert any(t is None for _, t in rows) and any(t is not None for _, t in rows)


def test_lateral_generation_gives_the_plain_plans_completions(conn, sidecar_metrics_port):
    sql = ("SELECT t.p, c.completion, c.output_tokens FROM (VALUES ('What is 2+2?'), ('Name a colour.'), "
           "('Say hi.'), ('Name a fruit.'), ('What is 2+2?')) t(p), "
           "LATERAL (SELECT * FROM llm.completions WHERE prompt = t.p AND max_tokens = 6) c ORDER BY 1")
    assert NODE in plan(conn, sql)
    before = requests(sidecar_metrics_port, "Generate")
    rows = conn.execute(sql).fetchall()
    assert requests(sidecar_metrics_port, "Generate") - before == 4  # distinct prompts
    assert len(rows) == 5 and all(0 < r[2] <= 6 for r in rows)
    assert rows == unbatched(conn, sql)


def test_several_key_columns_from_the_outer_row_make_one_request_per_group(conn):
    conn.execute("CREATE TEMP TABLE asks (q text, n int)")
    conn.execute("INSERT INTO asks VALUES ('Say hi.', 1), ('Say bye.', 2), ('Say hi.', 2), ('Say hi.', 1), "
                 "(NULL, 3), ('Say yes.', NULL), ('Count to three.', 2)")
    sql = ("SELECT a.q, a.n, c.max_tokens, c.output_tokens, c.completion FROM asks a "
           "LEFT JOIN llm.completions c ON c.prompt = a.q AND c.max_tokens = a.n ORDER BY 1, 2")
    text = plan(conn, sql, analyze=True)
    assert "Batched Keys: prompt = ANY(a.q), max_tokens = a.n" in text
    assert "Requests: 2" in text, text  # max_tokens 1 and 2; NULL keys are sent nowhere
    rows = conn.execute(sql).fetchall()
    assert rows == unbatched(conn, sql)
    assert [(q, n, m) for q, n, m, _, _ in rows] == [
        ("Count to three.", 2, 2), ("Say bye.", 2, 2), ("Say hi.", 1, 1), ("Say hi.", 1, 1),
        ("Say hi.", 2, 2), ("Say yes.", None, None), (None, 3, None)]


def test_update_from_embeds_the_table_in_one_request(conn, docs, sidecar_metrics_port):
    conn.execute("ALTER TABLE docs ADD COLUMN embedding vector(384)")
    sql = "UPDATE docs d SET embedding = e.embedding FROM llm.embeddings e WHERE e.input = d.body"
    assert NODE in plan(conn, sql)
    before = requests(sidecar_metrics_port, "Embed")
    assert conn.execute(sql).rowcount == 100
    assert requests(sidecar_metrics_port, "Embed") - before == 1
    got = conn.execute("SELECT id, body, embedding FROM docs ORDER BY id").fetchall()
    assert_same_embeddings(vectors(got), vectors(bulk_form(conn)))


@pytest.mark.parametrize("change, updated", [("id = id", 20), ("body = body || '!'", 19)])
def test_update_from_meeting_a_concurrent_update_rechecks_as_the_nested_loop(conn, pg_dsn, change, updated):
    """EvalPlanQual: the row another transaction updated is joined with the inner row of the
    original join, so a changed key no longer matches (the plain plan's result)."""
    conn.execute("DROP TABLE IF EXISTS bj_epq")
    conn.execute("CREATE TABLE bj_epq (id int, body text, embedding vector(384))")
    try:
        counts = []
        for batch_size in (1000, 0):
            conn.execute(f"SET llmfdw.join_batch_size = {batch_size}")
            conn.execute("TRUNCATE bj_epq")
            conn.execute("INSERT INTO bj_epq SELECT g, 'row number ' || g FROM generate_series(1, 20) g")
            sql = "UPDATE bj_epq t SET embedding = e.embedding FROM llm.embeddings e WHERE e.input = t.body"
            assert (NODE in plan(conn, sql)) == (batch_size > 0)
            with psycopg.connect(pg_dsn) as other:
                other.execute(f"UPDATE bj_epq SET {change} WHERE id = 7")
                result: dict = {}
                worker = threading.Thread(target=lambda: result.update(n=conn.execute(sql).rowcount))
                worker.start()
                time.sleep(0.5)  # the UPDATE waits for the other transaction's row lock
                other.commit()
                worker.join(30)
            counts.append(result["n"])
        assert counts == [updated, updated]
    finally:
        conn.execute("RESET llmfdw.join_batch_size")
        conn.execute("DROP TABLE bj_epq")


def test_limit_stops_before_the_next_batch(conn, docs, sidecar_metrics_port):
    conn.execute("SET llmfdw.join_batch_size = 10")
    # the CTE is planned without the LIMIT and read lazily: the node sees the LIMIT stop it
    sql = ("WITH j AS MATERIALIZED (SELECT d.id FROM docs d JOIN llm.embeddings e ON e.input = d.body) "
           "SELECT * FROM j LIMIT 3")
    text = plan(conn, sql, analyze=True)
    assert NODE in text and "Batches: 1" in text and "Requests: 1" in text, text
    before = requests(sidecar_metrics_port, "Embed")
    assert len(conn.execute(sql).fetchall()) == 3
    assert requests(sidecar_metrics_port, "Embed") - before == 1


def test_rescans_in_a_correlated_subquery(conn, docs):
    sql = ("SELECT g, (SELECT string_agg(e.input, '|' ORDER BY e.input) FROM docs d "
           "JOIN llm.embeddings e ON e.input = d.body || g WHERE d.id <= 3) FROM generate_series(1, 3) g")
    assert NODE in plan(conn, sql)
    rows = conn.execute(sql).fetchall()
    assert rows == unbatched(conn, sql)
    assert rows[1] == (2, "note number 1 about topic 12|note number 2 about topic 22|note number 3 about topic 32")


def test_condition_that_cannot_reach_the_request_is_still_an_error(conn, docs):
    with pytest.raises(psycopg.Error, match='column "max_tokens"'):
        conn.execute("SELECT * FROM docs d JOIN llm.completions c ON c.prompt = d.body "
                     "AND c.max_tokens::text = '5'").fetchall()


LONG = "Write a very long story about a dragon and a knight, with many chapters."


LATERAL_LONG = ("SELECT c.completion FROM generate_series(1, 4) g, LATERAL (SELECT * FROM llm.completions "
                "WHERE prompt = %s || ' Chapter ' || g AND max_tokens = 1500) c")


def test_cancel_mid_batch_stops_the_query_and_the_sidecar(conn, pg_dsn, sidecar_metrics_port):
    assert NODE in plan(conn, LATERAL_LONG, (LONG,))
    start = generation_tokens(sidecar_metrics_port)
    error, after = cancel_from_another_session(
        conn, pg_dsn, LATERAL_LONG, (LONG,), when=lambda: wait_until_decoding(sidecar_metrics_port, start, 8))
    assert isinstance(error, psycopg.errors.QueryCanceled)
    assert after < CANCEL_WITHIN_S
    assert_generation_stops(sidecar_metrics_port)
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_statement_timeout_stops_a_batch(conn, sidecar_metrics_port):
    conn.execute("SET statement_timeout = '600ms'")
    try:
        start = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
            conn.execute(LATERAL_LONG, (LONG,))
        assert time.monotonic() - start < 0.6 + CANCEL_WITHIN_S
    finally:
        conn.execute("RESET statement_timeout")
    assert_generation_stops(sidecar_metrics_port)
