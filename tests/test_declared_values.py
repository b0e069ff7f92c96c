"""Values and column types against the tables' declarations, tried as a delegated admin and a
plain role (never the superuser, except to set the stage).

- Generation parameters (max_tokens, temperature, top_p, seed, the penalties) have one range each
  (llm_inference.v1.params.PARAMS): a table option or server default out of it fails when the DDL runs,
  a qual out of it fails before any request, with SQLSTATE 22023 and a hint; NaN nowhere passes.
- A foreign table whose column types are not the declaration's (`embedding uuid`,
  `max_tokens text`) fails at its first query with 42804 naming the column and both types;
  harmless variants (varchar, vector(N), a wider integer) and IMPORT FOREIGN SCHEMA's tables work.
"""
from __future__ import annotations

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

EMBED_MODEL = "all-minilm-l6-v2"
GEN_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def roles(pg_dsn, sidecar_socket):
    """vt_dora: USAGE on the wrapper and CREATE on the database (she owns server vt_srv and schema
    vt).  vt_alice: a member of llm_user."""
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("CREATE ROLE vt_dora LOGIN")
        c.execute("CREATE ROLE vt_alice LOGIN IN ROLE llm_user")
        c.execute("GRANT USAGE ON FOREIGN DATA WRAPPER llmfdw TO vt_dora")
        c.execute("GRANT CREATE ON DATABASE llmfdw_test TO vt_dora")
    dora = make_conninfo(pg_dsn, user="vt_dora")
    run(dora, f"CREATE SERVER vt_srv FOREIGN DATA WRAPPER llmfdw OPTIONS (address 'unix://{sidecar_socket}')")
    run(dora, "CREATE SCHEMA vt")
    yield {"dora": dora, "alice": make_conninfo(pg_dsn, user="vt_alice")}
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        for role in ("vt_dora", "vt_alice"):
            c.execute(f"DROP OWNED BY {role}")
            c.execute(f"DROP ROLE {role}")


def run(dsn: str, sql: str):
    with psycopg.connect(dsn, autocommit=True) as c:
        cur = c.execute(sql)
        return cur.fetchall() if cur.description else None


def refused(dsn: str, sql: str, error: type[psycopg.Error]) -> psycopg.Error:
    """The error `sql` fails with; the session is still usable afterwards."""
    with psycopg.connect(dsn, autocommit=True) as c:
        with pytest.raises(error) as exc:
            c.execute(sql)
        assert c.execute("SELECT 1").fetchone() == (1,)
    return exc.value


@pytest.mark.parametrize("ddl, words", [
    ("CREATE SERVER vt_bad FOREIGN DATA WRAPPER llmfdw OPTIONS (address 'unix:///x.sock', "
     "default_temperature 'NaN')", "option default_temperature must be in [0, 2] (0 = greedy), got nan"),
    ("ALTER SERVER vt_srv OPTIONS (ADD default_max_tokens '-5')",
     "option default_max_tokens must be at least 1, got -5"),
    ("ALTER SERVER vt_srv OPTIONS (ADD default_temperature 'Infinity')",
     "option default_temperature must be in [0, 2] (0 = greedy), got inf"),
    ("CREATE FOREIGN TABLE vt.c_bad (prompt text, completion text) SERVER vt_srv "
     "OPTIONS (table 'completions', temperature 'NaN')",
     "option temperature must be in [0, 2] (0 = greedy), got nan"),
    ("CREATE FOREIGN TABLE vt.c_bad (prompt text, completion text) SERVER vt_srv "
     "OPTIONS (table 'completions', top_p '0')", "option top_p must be in (0, 1], got 0"),
    ("CREATE FOREIGN TABLE vt.c_bad (prompt text, completion text) SERVER vt_srv "
     "OPTIONS (table 'completions', seed '-1')", "option seed must be in [0, 2147483647], got -1"),
    ("ALTER SERVER vt_srv OPTIONS (ADD default_frequency_penalty '2.5')",
     "option default_frequency_penalty must be in [-2, 2], got 2.5"),
    ("CREATE FOREIGN TABLE vt.c_bad (prompt text, completion text) SERVER vt_srv "
     "OPTIONS (table 'completions', repetition_penalty '0')", "option repetition_penalty must be in (0, 2], got 0"),
])
def test_defaults_out_of_range_fail_when_the_ddl_runs(roles, ddl, words):
    err = refused(roles["dora"], ddl, psycopg.errors.InvalidParameterValue)
    assert err.diag.message_primary == words
    assert err.diag.message_hint   # what the parameter means


def test_defaults_in_range_are_taken(roles):
    run(roles["dora"], "ALTER SERVER vt_srv OPTIONS (ADD default_temperature '0', ADD default_max_tokens '2', "
                       "ADD default_frequency_penalty '-1.5')")
    try:
        run(roles["dora"], f"CREATE FOREIGN TABLE vt.c_ok (prompt text, max_tokens int, temperature float8, "
                           f"frequency_penalty float8, output_tokens int) SERVER vt_srv "
                           f"OPTIONS (table 'completions', model '{GEN_MODEL}', top_p '1', seed '7')")
        rows = run(roles["dora"], "SELECT max_tokens, temperature, frequency_penalty, output_tokens FROM vt.c_ok "
                                  "WHERE prompt = 'Hi'")
        assert rows == [(2, 0.0, -1.5, 2)]
    finally:
        run(roles["dora"], "DROP FOREIGN TABLE IF EXISTS vt.c_ok")
        run(roles["dora"], "ALTER SERVER vt_srv OPTIONS (DROP default_temperature, DROP default_max_tokens, "
                           "DROP default_frequency_penalty)")


@pytest.mark.parametrize("qual, words", [
    ("temperature = 'NaN'", "temperature must be in [0, 2] (0 = greedy), got nan"),
    ("temperature = '-Infinity'", "temperature must be in [0, 2] (0 = greedy), got -inf"),
    ("max_tokens = -5", "max_tokens must be at least 1, got -5"),
    ("top_p = 0", "top_p must be in (0, 1], got 0"),
    ("seed = -1", "seed must be in [0, 2147483647], got -1"),
    ("presence_penalty = 'NaN'", "presence_penalty must be in [-2, 2], got nan"),
    ("repetition_penalty = 2.5", "repetition_penalty must be in (0, 2], got 2.5"),
])
def test_parameters_out_of_range_in_a_query_name_the_range_with_a_hint(roles, qual, words):
    err = refused(roles["alice"], f"SELECT completion FROM llm.completions WHERE prompt = 'Hi' AND {qual}",
                  psycopg.errors.InvalidParameterValue)
    assert err.diag.message_primary == words
    assert err.diag.message_hint.startswith(qual.split()[0] + ": ")


@pytest.mark.parametrize("table, query, words", [
    (f"vt.e_uuid (input text, embedding uuid) SERVER vt_srv OPTIONS (table 'embeddings', model '{EMBED_MODEL}')",
     "SELECT embedding FROM vt.e_uuid WHERE input = 'a cat'",
     'column "embedding" is uuid, but an llmfdw embeddings table declares it vector'),
    ("vt.c_text (prompt text, max_tokens text, completion text) SERVER vt_srv OPTIONS (table 'completions')",
     "SELECT completion FROM vt.c_text WHERE prompt = 'Hi' AND max_tokens = '3'",
     'column "max_tokens" is text, but an llmfdw completions table declares it integer'),
    ("vt.c_real (prompt text, temperature real, completion text) SERVER vt_srv OPTIONS (table 'completions')",
     "SELECT completion FROM vt.c_real WHERE prompt = 'Hi' AND temperature = 0.7",
     'column "temperature" is real, but an llmfdw completions table declares it double precision'),
    ("vt.u_int (tenant text, requests smallint) SERVER vt_srv OPTIONS (table 'usage')",
     "SELECT * FROM vt.u_int",
     'column "requests" is smallint, but an llmfdw usage table declares it bigint'),
])
def test_wrong_column_types_fail_at_the_first_query_naming_the_column(roles, table, query, words):
    run(roles["dora"], f"CREATE FOREIGN TABLE {table}")
    name = table.split()[0]
    try:
        err = refused(roles["dora"], query, psycopg.errors.DatatypeMismatch)
        assert err.diag.message_primary == words
        assert "ALTER COLUMN" in err.diag.message_hint
        assert name.split(".")[1] in err.diag.context
    finally:
        run(roles["dora"], f"DROP FOREIGN TABLE {name}")


def test_a_column_fixed_as_the_hint_says_works(roles):
    run(roles["dora"], f"CREATE FOREIGN TABLE vt.e_fix (input text, embedding uuid) SERVER vt_srv "
                       f"OPTIONS (table 'embeddings', model '{EMBED_MODEL}')")
    try:
        refused(roles["dora"], "SELECT embedding FROM vt.e_fix WHERE input = 'a cat'", psycopg.errors.DatatypeMismatch)
        run(roles["dora"], "ALTER FOREIGN TABLE vt.e_fix ALTER COLUMN embedding TYPE vector")
        assert run(roles["dora"], "SELECT vector_dims(embedding) FROM vt.e_fix WHERE input = 'a cat'") == [(384,)]
    finally:
        run(roles["dora"], "DROP FOREIGN TABLE vt.e_fix")


def test_harmless_variants_of_the_declared_types_work(roles):
    """varchar for text, vector(384) for vector, bigint for integer: each value keeps its meaning."""
    dora = roles["dora"]
    run(dora, f"CREATE FOREIGN TABLE vt.e_var (input varchar(100), embedding vector(384), dimensions bigint) "
              f"SERVER vt_srv OPTIONS (table 'embeddings', model '{EMBED_MODEL}')")
    run(dora, f"CREATE FOREIGN TABLE vt.e_ref (input text, embedding vector) "
              f"SERVER vt_srv OPTIONS (table 'embeddings', model '{EMBED_MODEL}')")
    run(dora, f"CREATE FOREIGN TABLE vt.c_var (prompt varchar, max_tokens bigint, output_tokens bigint, "
              f"stop varchar[], completion varchar) SERVER vt_srv OPTIONS (table 'completions', model '{GEN_MODEL}')")
    try:
        rows = run(dora, "SELECT v.input, v.dimensions, 1 - (v.embedding <=> r.embedding) "
                         "FROM vt.e_var v JOIN vt.e_ref r ON r.input = v.input::text "
                         "WHERE v.input = ANY(ARRAY['a small cat', 'the stock market']::varchar[]) ORDER BY 1")
        assert [r[:2] for r in rows] == [("a small cat", 384), ("the stock market", 384)]
        assert all(r[2] > 0.999 for r in rows)
        rows = run(dora, "SELECT prompt, max_tokens, output_tokens FROM vt.c_var "
                         "WHERE prompt = 'Count to ten.' AND max_tokens = 3 AND stop = ARRAY['zzz']::varchar[]")
        assert rows == [("Count to ten.", 3, 3)]
    finally:
        run(dora, "DROP FOREIGN TABLE vt.e_var, vt.e_ref, vt.c_var")


def test_the_tables_import_foreign_schema_creates_are_accepted(roles):
    dora = roles["dora"]
    run(dora, "CREATE SCHEMA vt_imported")
    try:
        run(dora, "IMPORT FOREIGN SCHEMA llm FROM SERVER vt_srv INTO vt_imported")
        assert run(dora, "SELECT vector_dims(embedding) FROM vt_imported.embeddings WHERE input = 'a cat'") == [(384,)]
        assert run(dora, "SELECT output_tokens FROM vt_imported.completions WHERE prompt = 'Hi' AND max_tokens = 1") \
            == [(1,)]
        assert (EMBED_MODEL,) in run(dora, "SELECT name FROM vt_imported.models")
        run(dora, "SELECT * FROM vt_imported.usage")
        assert run(dora, "SELECT count(*) > 0 FROM vt_imported.requests WHERE at > now() - interval '1 hour'") \
            == [(True,)]
    finally:
        run(dora, "DROP SCHEMA vt_imported CASCADE")
