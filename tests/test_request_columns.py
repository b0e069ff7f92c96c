"""A wrong row is worse than an error: every condition on a request column reaches the request.

Request columns (prompt, max_tokens, temperature, ... and input, model) become request fields and
each row echoes them.  A condition on one that the request did not carry would filter rows the
request never made, so the query returns fewer rows than it should and says nothing.  The host
plans such conditions into the request (parameterized by the other table) or refuses the plan.
Bad values get SQL errors that name the column, never a Python traceback.
"""
from __future__ import annotations

import psycopg
import pytest

from vectors import assert_same_embeddings

PROMPT = "Count from one to twenty: one, two, three,"


def test_optional_column_joined_from_another_table_reaches_the_request(conn):
    rows = conn.execute(
        "SELECT p.n, c.max_tokens, c.output_tokens FROM generate_series(1, 3) p(n) "
        "JOIN llm.completions c ON c.prompt = %s AND c.max_tokens = p.n ORDER BY p.n", (PROMPT,)).fetchall()
    assert [r[0] for r in rows] == [1, 2, 3]
    assert all(n == max_tokens and 1 <= out <= n for n, max_tokens, out in rows)


def test_lateral_temperature_and_max_tokens_reach_the_request(conn):
    rows = conn.execute(
        "SELECT t.temp, t.n, c.temperature, c.max_tokens, c.output_tokens "
        "FROM (VALUES (0.0::float8, 2), (0.7, 3)) t(temp, n), "
        "LATERAL (SELECT * FROM llm.completions WHERE prompt = %s AND temperature = t.temp "
        "         AND max_tokens = t.n AND seed = 7) c ORDER BY t.n", (PROMPT,)).fetchall()
    assert len(rows) == 2
    for temp, n, echoed_temp, echoed_n, out in rows:
        assert (echoed_temp, echoed_n) == (temp, n) and 1 <= out <= n


def test_prompt_and_max_tokens_both_from_the_outer_row(conn):
    conn.execute("CREATE TEMP TABLE asks (q text, n int)")
    conn.execute("INSERT INTO asks VALUES ('Say hi.', 1), ('Say bye.', 2), ('Say hi.', 2)")
    rows = conn.execute("SELECT a.q, a.n, c.output_tokens FROM asks a JOIN llm.completions c "
                        "ON c.prompt = a.q AND c.max_tokens = a.n ORDER BY a.q, a.n").fetchall()
    assert [(q, n) for q, n, _ in rows] == [("Say bye.", 2), ("Say hi.", 1), ("Say hi.", 2)]
    assert all(out <= n for _, n, out in rows)


# Greedy decoding of this prompt starts "1. 1 cat"; with any of the penalties it takes another path.
REPETITIVE = "Write the word cat ten times."


@pytest.mark.parametrize("column", ["frequency_penalty", "presence_penalty", "repetition_penalty"])
def test_sampling_penalties_reach_llama_cpp(conn, column):
    """Each penalty goes from the qual to llama.cpp under llama.cpp's name for it (repetition_penalty
    as repeat_penalty: one it did not know would be ignored and change nothing), and the row is
    whole: a completion of max_tokens tokens, echoing the value."""
    sql = "SELECT completion, finish_reason, output_tokens, {0} FROM llm.completions " \
          "WHERE prompt = %s AND max_tokens = 4{1}"
    plain = conn.execute(sql.format(column, ""), (REPETITIVE,)).fetchone()
    penalised = conn.execute(sql.format(column, f" AND {column} = 1.5"), (REPETITIVE,)).fetchone()
    assert plain[1:] == ("length", 4, None) and penalised[1:] == ("length", 4, 1.5)
    assert penalised[0] != plain[0], (plain[0], penalised[0])


@pytest.mark.parametrize("condition", [
    "max_tokens = 5.5",             # numeric comparison: a cast on the column, not sendable
    "max_tokens::text = '5'",
    "coalesce(max_tokens, 0) = 3",
    "temperature::numeric = 0.5",
])
def test_unsendable_condition_on_a_request_column_is_an_error(conn, condition):
    with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
        conn.execute(f"SELECT completion FROM llm.completions WHERE prompt = 'hi' AND {condition}")
    column = condition.split("::")[0].split("(")[-1].split(",")[0].split(" ")[0]
    assert f'column "{column}"' in str(err.value)
    assert err.value.diag.message_hint and "=" in err.value.diag.message_hint


def test_join_that_cannot_reach_the_request_is_an_error_not_empty(conn):
    # c is the preserved side of a LEFT JOIN: it cannot be parameterized by p, so the join
    # clause on max_tokens could only filter: refused.
    with pytest.raises(psycopg.errors.FeatureNotSupported, match='column "max_tokens"'):
        conn.execute("SELECT * FROM (SELECT * FROM llm.completions WHERE prompt = 'hi') c "
                     "LEFT JOIN generate_series(1, 2) p(n) ON c.max_tokens = p.n").fetchall()


def test_output_columns_still_filter_normally(conn):
    rows = conn.execute("SELECT input FROM llm.embeddings WHERE input = ANY(ARRAY['a', 'bb']) "
                        "AND dimensions = 384 AND length(input) > 1").fetchall()
    assert rows == [("bb",)]


@pytest.mark.parametrize("sql, sqlstate, words", [
    ("SELECT completion FROM llm.completions WHERE prompt = 'hi' AND max_tokens = 2147483648",
     "22023", ["max_tokens", "out of range"]),
    ("SELECT completion FROM llm.completions WHERE prompt = 'hi' AND stop = ARRAY['a', NULL]",
     "22023", ["stop", "NULL"]),
    ("SELECT completion FROM llm.completions WHERE prompt = 'hi' AND stop = ARRAY['']",
     "22023", ["stop", "empty"]),
    ("SELECT completion FROM llm.completions WHERE prompt = 'hi' AND temperature = 'NaN'",
     "22023", ["temperature"]),
    ("SELECT completion FROM llm.completions WHERE prompt = 'hi' AND frequency_penalty = 2.5",
     "22023", ["frequency_penalty must be in [-2, 2], got 2.5"]),
    ("SELECT * FROM llm.rag('What is it?', 'pg_class', k => 0)", "22023", ["k", "at least 1"]),
])
def test_bad_values_are_sql_errors_naming_the_column(conn, sql, sqlstate, words):
    with pytest.raises(psycopg.Error) as err:
        conn.execute(sql).fetchall()
    text = str(err.value) + (err.value.diag.message_detail or "")
    assert err.value.sqlstate == sqlstate, text
    for word in words:
        assert word in text
    assert "site-packages" not in text and "Traceback" not in text and ".py" not in text
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_any_of_null_array_is_no_rows_as_in_sql(conn):
    # x = ANY(NULL) is NULL in SQL, for a real table too: no row, no error
    assert conn.execute("SELECT * FROM llm.embeddings WHERE input = ANY(NULL::text[])").fetchall() == []


def test_request_over_the_message_limit_is_a_clear_error(conn):
    with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="limited to 64 MiB") as err:
        conn.execute("SELECT completion FROM llm.completions WHERE prompt = repeat('x', 70000000)").fetchall()
    assert "tenant" not in str(err.value)
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_embedding_inputs_over_the_message_limit_go_in_parts(conn):
    """70 inputs of 1 MB (70 MB, over gRPC's 64 MiB message) go as 9 requests of at most 8 MiB
    (tables.embed_parts); every row still pairs its input with that input's own vector."""
    rows = conn.execute("SELECT input, embedding FROM llm.embeddings WHERE input = "
                        "ANY(ARRAY(SELECT g || repeat(' x', 500000) FROM generate_series(1, 70) g))").fetchall()
    assert sorted(int(text.split(" ", 1)[0]) for text, _ in rows) == list(range(1, 71))
    by_input = dict(rows)
    for g in (1, 35, 70):   # parts 1, 5 and 9
        text = f"{g}" + " x" * 500000
        alone, = conn.execute("SELECT embedding FROM llm.embeddings WHERE input = %s", (text,)).fetchone()
        assert_same_embeddings([alone], [by_input[text]])


@pytest.mark.parametrize("stop", ["ARRAY[ARRAY['a', 'b'], ARRAY['c', 'd']]", "'[0:1]={a,b}'::text[]"],
                         ids=["two-dimensions", "lower-bound-0"])
def test_array_a_list_cannot_stand_for_is_an_error_not_empty(conn, stop):
    """The FDW sees an array as a Python list, which has neither dimensions nor a lower bound: the
    row would echo a one-dimensional array from 1, which Postgres's recheck drops (0 rows).  The
    host refuses such a value before anything is sent."""
    with pytest.raises(psycopg.Error) as err:
        conn.execute(f"SELECT completion FROM llm.completions WHERE prompt = 'hi' AND stop = {stop}").fetchall()
    assert err.value.sqlstate == "22023", str(err.value)
    assert 'column "stop"' in str(err.value)
    assert "one dimension, lower bound 1" in err.value.diag.message_hint


def test_model_name_too_long_is_refused_before_sending(conn):
    """A 20,000-character name overflowed gRPC's metadata limit on its way back in the sidecar's
    error ("metadata size exceeds hard limit", with a hint about the sidecar)."""
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT completion FROM llm.completions WHERE prompt = 'hi' AND model = repeat('m', 20000)"
                     ).fetchall()
    assert err.value.sqlstate == "22023", str(err.value)
    assert "model name is 20,000 bytes long" in str(err.value)
    assert "llm.models" in err.value.diag.message_hint


def test_explain_of_a_generic_plan_shows_parameters_as_question_marks(conn):
    conn.execute("PREPARE ask(text, int) AS SELECT completion FROM llm.completions "
                 "WHERE prompt = $1 AND max_tokens = $2")
    try:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN EXECUTE ask('hi', 3)").fetchall())
        assert "prompt = ?" in plan and "max_tokens = ?" in plan, plan
        assert "None" not in plan
    finally:
        conn.execute("DEALLOCATE ask")
        conn.execute("RESET plan_cache_mode")
