"""The FDW as real SQL: options, EXPLAIN, ALTER, pgvector types, joins, cancellation."""
from __future__ import annotations

import time

import psycopg
import pytest

from backend_cancel import (CANCEL_WITHIN_S, assert_generation_stops, cancel_from_another_session,
                            generation_tokens, wait_until_decoding)
from sidecar_process import sample, scrape

LONG = "Write a very long story about a dragon and a knight, with many chapters."


def plan(conn, sql: str) -> str:
    return "\n".join(r[0] for r in conn.execute("EXPLAIN (VERBOSE) " + sql))


def test_table_options_are_request_defaults_and_quals_override_them(conn):
    conn.execute("ALTER FOREIGN TABLE llm.completions OPTIONS (ADD max_tokens '3')")
    try:
        row = conn.execute("SELECT max_tokens, output_tokens, finish_reason FROM llm.completions "
                           "WHERE prompt = 'Tell me about the sea.'").fetchone()
        assert row == (3, 3, "length")
        row = conn.execute("SELECT max_tokens, output_tokens FROM llm.completions "
                           "WHERE prompt = 'Tell me about the sea.' AND max_tokens = 4").fetchone()
        assert row == (4, 4)
    finally:
        conn.execute("ALTER FOREIGN TABLE llm.completions OPTIONS (DROP max_tokens)")


@pytest.mark.parametrize("ddl, words", [
    ("ALTER FOREIGN TABLE llm.completions OPTIONS (ADD colour 'blue')", "unknown option 'colour'"),
    ("ALTER FOREIGN TABLE llm.completions OPTIONS (ADD max_tokens 'lots')", "max_tokens must be an integer"),
    ("ALTER FOREIGN TABLE llm.completions OPTIONS (SET table 'completion')", "unknown llmfdw table kind"),
    ("ALTER SERVER llm_sidecar OPTIONS (ADD colour 'blue')", "unknown option 'colour' for an llmfdw server"),
    ("ALTER SERVER llm_sidecar OPTIONS (ADD default_max_tokens 'lots')", "default_max_tokens must be an integer"),
    ("ALTER SERVER llm_sidecar OPTIONS (ADD timeout '-1')", "timeout must be a positive"),
])
def test_bad_options_fail_when_the_ddl_runs(conn, ddl, words):
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=words):
        conn.execute(ddl)
    assert conn.execute("SELECT count(*) FROM llm.models").fetchone()[0] >= 2


def test_out_of_range_default_is_refused_when_the_ddl_runs_naming_it(conn):
    # the range is llm_inference.v1.params's, which the sidecar checks too
    with pytest.raises(psycopg.errors.InvalidParameterValue,
                       match=r"option temperature must be in \[0, 2\] \(0 = greedy\), got 9"):
        conn.execute("ALTER FOREIGN TABLE llm.completions OPTIONS (ADD temperature '9')")


def test_explain_verbose_shows_quals_model_and_address(conn, sidecar_socket):
    text = plan(conn, "SELECT completion FROM llm.completions WHERE prompt = 'hi' AND max_tokens = 7")
    assert "prompt = 'hi'" in text and "max_tokens = 7" in text
    assert "smollm2-135m-instruct" in text
    assert sidecar_socket in text


def test_alter_server_rebuilds_the_instance(conn, sidecar_socket):
    conn.execute("ALTER SERVER llm_sidecar OPTIONS (SET address 'unix:///tmp/llmfdw-nowhere.sock')")
    try:
        with pytest.raises(psycopg.Error, match="not reachable"):
            conn.execute("SELECT * FROM llm.models")
    finally:
        conn.execute(f"ALTER SERVER llm_sidecar OPTIONS (SET address 'unix://{sidecar_socket}')")
    assert conn.execute("SELECT count(*) FROM llm.models").fetchone()[0] >= 2


def test_vector_dimension_mismatch_is_a_clear_error(conn):
    conn.execute("CREATE FOREIGN TABLE public.emb768 (input text, embedding vector(768)) "
                 "SERVER llm_sidecar OPTIONS (table 'embeddings', model 'all-minilm-l6-v2')")
    try:
        with pytest.raises(psycopg.Error) as exc:
            conn.execute("SELECT embedding FROM public.emb768 WHERE input = 'hello'")
        assert "384-dimensional" in str(exc.value) and "vector(768)" in str(exc.value)
        assert "ALTER FOREIGN TABLE" in exc.value.diag.message_hint
    finally:
        conn.execute("DROP FOREIGN TABLE public.emb768")


def test_embeddings_store_into_a_vector_column_with_an_hnsw_index(conn):
    conn.execute("CREATE TEMP TABLE notes (id int, body text, embedding vector(384))")
    conn.execute("INSERT INTO notes (id, body) SELECT g, 'note ' || g FROM generate_series(1, 40) g")
    conn.execute("""UPDATE notes n SET embedding = e.embedding
                    FROM llm.embeddings e WHERE e.input = ANY(ARRAY(SELECT body FROM notes)) AND e.input = n.body""")
    conn.execute("CREATE INDEX ON notes USING hnsw (embedding vector_cosine_ops)")
    assert conn.execute("SELECT count(*) FROM notes WHERE embedding IS NOT NULL").fetchone() == (40,)
    nearest = conn.execute("SELECT id FROM notes ORDER BY embedding <=> llm.embed('note 17') LIMIT 1").fetchone()
    assert nearest == (17,)


def test_join_is_a_parameterized_nested_loop_and_memoize_skips_repeats(conn, sidecar_metrics_port):
    # the plain nested loop, as it plans with the batched join off (tests/test_batch_join.py has that)
    conn.execute("SET llmfdw.join_batch_size = 0")
    conn.execute("CREATE TEMP TABLE reviews (id int, body text)")
    conn.execute("INSERT INTO reviews SELECT g, CASE WHEN g % 2 = 0 THEN 'great' ELSE 'awful' END "
                 "FROM generate_series(1, 40) g")
    conn.execute("ANALYZE reviews")
    sql = "SELECT r.id, e.embedding FROM reviews r JOIN llm.embeddings e ON e.input = r.body"
    text = plan(conn, sql)
    assert "Nested Loop" in text and "Memoize" in text, text
    before = sample(scrape(sidecar_metrics_port), "llmfdw_requests_total", rpc="Embed")
    rows = conn.execute(sql).fetchall()
    calls = sample(scrape(sidecar_metrics_port), "llmfdw_requests_total", rpc="Embed") - before
    assert len(rows) == 40
    assert calls == 2  # two distinct bodies


def test_cancel_during_generation_stops_the_sidecar_too(conn, pg_dsn, sidecar_metrics_port):
    start = generation_tokens(sidecar_metrics_port)
    error, after = cancel_from_another_session(
        conn, pg_dsn, "SELECT completion FROM llm.completions WHERE prompt = %s AND max_tokens = 1500", (LONG,),
        when=lambda: wait_until_decoding(sidecar_metrics_port, start))
    assert isinstance(error, psycopg.errors.QueryCanceled)
    assert "canceling statement due to user request" in str(error)
    assert after < CANCEL_WITHIN_S
    assert_generation_stops(sidecar_metrics_port)
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_statement_timeout_becomes_the_deadline(conn, sidecar_metrics_port):
    conn.execute("SET statement_timeout = '400ms'")
    try:
        start = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
            conn.execute("SELECT completion FROM llm.completions WHERE prompt = %s AND max_tokens = 1500", (LONG,))
        assert time.monotonic() - start < 0.4 + CANCEL_WITHIN_S
    finally:
        conn.execute("RESET statement_timeout")
    assert_generation_stops(sidecar_metrics_port)
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_rag_answers_from_the_retrieved_rows(conn):
    conn.execute("CREATE TEMP TABLE kb (id serial, body text, embedding vector(384))")
    facts = ["The access code for the Zorblax vault is 4417.",
             "Llamas live in the Andes.",
             "The Blue Heron bakery sells rye bread.",
             "Quarterly revenue grew by 12 percent.",
             "The Zorblax vault is in Oslo."]
    for f in facts:
        conn.execute("INSERT INTO kb (body) VALUES (%s)", (f,))
    conn.execute("UPDATE kb SET embedding = e.embedding FROM llm.embeddings e "
                 "WHERE e.input = ANY(ARRAY(SELECT body FROM kb)) AND e.input = kb.body")
    conn.execute("CREATE INDEX ON kb USING hnsw (embedding vector_cosine_ops)")
    answer, sources = conn.execute(
        "SELECT answer, sources FROM llm.rag('What is the access code for the Zorblax vault?', 'kb', k => 2)"
    ).fetchone()
    assert sources[0] == facts[0] and len(sources) == 2
    assert "4417" in answer
