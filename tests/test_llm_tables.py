"""llm.completions, llm.embeddings and llm.models end to end:
real SQL -> FDW host -> gRPC -> sidecar -> real models."""
from __future__ import annotations

import numpy as np
import psycopg
import pytest

from sidecar_process import sample, scrape
from vectors import assert_same_embeddings


def vec(conn, text: str) -> np.ndarray:
    row = conn.execute("SELECT embedding::text FROM llm.embeddings WHERE input = %s", (text,)).fetchone()
    return np.array([float(x) for x in row[0].strip("[]").split(",")])


def cosine_distance(conn, a: str, b: str) -> float:
    return conn.execute(
        """SELECT a.embedding <=> b.embedding FROM llm.embeddings a, llm.embeddings b
           WHERE a.input = %s AND b.input = %s""", (a, b)).fetchone()[0]


def test_completion_answers_paris(conn):
    row = conn.execute(
        "SELECT completion, finish_reason, input_tokens, output_tokens, model FROM llm.completions "
        "WHERE prompt = 'What is the capital of France?'").fetchone()
    completion, finish, tin, tout, model = row
    assert "Paris" in completion
    assert finish == "stop"
    assert tin > 5 and 0 < tout <= 128
    assert model == "smollm2-135m-instruct"


def test_completion_is_reproducible_by_default(conn):
    sql = "SELECT completion FROM llm.completions WHERE prompt = 'Name a colour.'"
    assert conn.execute(sql).fetchone() == conn.execute(sql).fetchone()


def test_max_tokens_limits_the_answer(conn):
    row = conn.execute(
        "SELECT finish_reason, output_tokens, max_tokens FROM llm.completions "
        "WHERE prompt = 'Tell me a long story about a dragon.' AND max_tokens = 5").fetchone()
    assert row == ("length", 5, 5)


def test_several_prompts_in_one_query(conn):
    rows = conn.execute(
        "SELECT prompt, completion FROM llm.completions "
        "WHERE prompt = ANY(ARRAY['What is 2+2?', 'What is the capital of France?']) AND max_tokens = 24"
    ).fetchall()
    assert sorted(r[0] for r in rows) == ['What is 2+2?', 'What is the capital of France?']
    assert all(r[1] for r in rows)


def test_many_prompts_run_through_a_bounded_window(conn):
    rows = conn.execute(
        "SELECT prompt, output_tokens FROM llm.completions "
        "WHERE prompt = ANY(ARRAY(SELECT 'Say the number ' || g FROM generate_series(1, 40) g)) AND max_tokens = 2"
    ).fetchall()
    assert len(rows) == 40 and all(0 < r[1] <= 2 for r in rows)


def test_embedding_has_384_dims_and_is_meaningful(conn):
    assert conn.execute("SELECT vector_dims(embedding) FROM llm.embeddings WHERE input = 'hello'").fetchone() == (384,)
    close = cosine_distance(conn, "The cat sat on the mat.", "A cat was sitting on a rug.")
    far = cosine_distance(conn, "The cat sat on the mat.", "Quarterly revenue grew by 12 percent.")
    assert close < far


def test_join_with_a_user_table_gives_one_correct_row_per_user_row(conn):
    conn.execute("CREATE TEMP TABLE docs (id int, body text)")
    bodies = ["Postgres is a database.", "Llamas live in the Andes.", "Postgres is a database."]
    for i, b in enumerate(bodies):
        conn.execute("INSERT INTO docs VALUES (%s, %s)", (i, b))
    rows = conn.execute(
        "SELECT d.id, d.body, e.embedding::text FROM docs d JOIN llm.embeddings e ON e.input = d.body ORDER BY d.id"
    ).fetchall()
    assert [r[0] for r in rows] == [0, 1, 2]
    # each row's vector is its own text's (embedded alone below: another batch, so by cosine)
    got = [[float(x) for x in emb.strip("[]").split(",")] for _, _, emb in rows]
    assert_same_embeddings(got, [vec(conn, body) for _, body, _ in rows])


def embed_calls(port: int) -> float:
    return sample(scrape(port), "llmfdw_requests_total", rpc="Embed")


def test_any_array_returns_one_row_per_distinct_element_from_one_request(conn, sidecar_metrics_port):
    before = embed_calls(sidecar_metrics_port)
    rows = conn.execute(
        "SELECT input, vector_dims(embedding) FROM llm.embeddings "
        "WHERE input = ANY(ARRAY['one', 'two', 'three', 'two', ''])").fetchall()
    assert sorted(rows) == [("", 384), ("one", 384), ("three", 384), ("two", 384)]
    assert embed_calls(sidecar_metrics_port) - before == 1


def test_bulk_form_with_an_init_plan_array(conn, sidecar_metrics_port):
    conn.execute("CREATE TEMP TABLE many AS SELECT 'sentence number ' || g AS body FROM generate_series(1, 150) g")
    before = embed_calls(sidecar_metrics_port)
    n = conn.execute(
        "SELECT count(*) FROM llm.embeddings WHERE input = ANY(ARRAY(SELECT body FROM many))").fetchone()[0]
    assert n == 150
    assert embed_calls(sidecar_metrics_port) - before == 1


def test_models_lists_what_the_sidecar_serves(conn):
    rows = conn.execute("SELECT name, task, dimensions, state FROM llm.models ORDER BY name").fetchall()
    assert ("all-minilm-l6-v2", "embed", 384, "ready") in rows
    assert any(r[0] == "smollm2-135m-instruct" and r[1] == "generate" and r[3] == "ready" for r in rows)


def test_missing_prompt_names_the_qual_and_shows_how(conn):
    with pytest.raises(psycopg.Error) as exc:
        conn.execute("SELECT completion FROM llm.completions")
    assert '"prompt"' in str(exc.value)
    assert "WHERE prompt = " in exc.value.diag.message_hint
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_missing_input_names_the_qual(conn):
    with pytest.raises(psycopg.Error) as exc:
        conn.execute("SELECT embedding FROM llm.embeddings WHERE input LIKE 'a%'")
    assert "input" in str(exc.value)
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_unknown_model_is_a_clear_error(conn):
    with pytest.raises(psycopg.Error) as exc:
        conn.execute("SELECT completion FROM llm.completions WHERE prompt = 'hi' AND model = 'gpt-17'")
    assert "gpt-17" in str(exc.value)
    assert "llm.models" in exc.value.diag.message_hint
    assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("where, word", [
    ("max_tokens = 0", "max_tokens"),
    ("temperature = 3", "temperature"),
    ("top_p = 0", "top_p"),
    ("max_tokens > 5", "only supports"),
])
def test_invalid_parameters_are_clear_errors(conn, where, word):
    with pytest.raises(psycopg.Error) as exc:
        conn.execute(f"SELECT completion FROM llm.completions WHERE prompt = 'hi' AND {where}")
    assert word in str(exc.value)
    assert exc.value.sqlstate == "22023"
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_stopped_sidecar_is_a_clear_error(conn):
    conn.execute("DROP SERVER IF EXISTS llm_dead CASCADE")
    conn.execute("CREATE SERVER llm_dead FOREIGN DATA WRAPPER llmfdw "
                 "OPTIONS (wrapper 'llm_tables.tables.SidecarTables', address 'unix:///tmp/llmfdw-nobody.sock')")
    conn.execute("CREATE FOREIGN TABLE public.dead_models (name text) SERVER llm_dead OPTIONS (table 'models')")
    try:
        with pytest.raises(psycopg.Error) as exc:
            conn.execute("SELECT * FROM public.dead_models")
        assert "not reachable" in str(exc.value)
        assert "ALTER SERVER" in exc.value.diag.message_hint
        assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        conn.execute("DROP SERVER llm_dead CASCADE")


def test_sql_helpers_use_the_same_path(conn):
    assert "Paris" in conn.execute("SELECT llm.complete('What is the capital of France?')").fetchone()[0]
    assert conn.execute("SELECT llm.complete('Tell me a story.', max_tokens => 3) IS NOT NULL").fetchone() == (True,)
    assert conn.execute("SELECT vector_dims(llm.embed('hello'))").fetchone() == (384,)
    assert conn.execute("SELECT llm.embed(NULL) IS NULL").fetchone() == (True,)
    one, table = conn.execute("SELECT llm.embed('hello')::text, e.embedding::text "
                              "FROM llm.embeddings e WHERE input = 'hello'").fetchone()
    assert_same_embeddings([one.strip("[]").split(",")], [table.strip("[]").split(",")])


def test_embed_batch_keeps_input_order_and_duplicates(conn):
    rows = conn.execute(
        "SELECT ord, input, embedding IS NOT NULL FROM llm.embed_batch(ARRAY['b', 'a', 'b', NULL])").fetchall()
    assert rows == [(1, "b", True), (2, "a", True), (3, "b", True), (4, None, False)]
