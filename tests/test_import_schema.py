"""The tables come from their declarations through IMPORT FOREIGN SCHEMA, and setting up again
keeps what users built on them."""
from __future__ import annotations

import psycopg
import pytest

from deploy import embedded
from llmfdw.fdw.declarations import SPECS


@pytest.fixture
def imported(conn, pg_dsn, sidecar_socket):
    conn.execute(f"CREATE SERVER imp FOREIGN DATA WRAPPER llmfdw OPTIONS (address 'unix://{sidecar_socket}')")
    conn.execute("CREATE SCHEMA imp")
    yield conn
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("DROP SCHEMA imp CASCADE")
        c.execute("DROP SERVER imp CASCADE")


def columns(conn, table: str) -> list[tuple[str, str]]:
    return conn.execute("SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute "
                        "WHERE attrelid = %s::regclass AND attnum > 0 ORDER BY attnum", (table,)).fetchall()


def test_the_setup_tables_are_their_declarations(conn):
    for name, spec in SPECS.items():
        declared = [(n, t.replace("vector", "vector(384)") if n == "embedding" else t)
                    for n, t in spec.column_types()]
        assert columns(conn, f"llm.{name}") == [
            (n, t.replace("timestamptz", "timestamp with time zone")) for n, t in declared]


def test_import_limit_to_with_the_sidecars_models_as_defaults(imported):
    imported.execute("IMPORT FOREIGN SCHEMA llm LIMIT TO (embeddings, models) FROM SERVER imp INTO imp")
    tables = imported.execute("SELECT c.relname::text, c2.ftoptions FROM pg_class c JOIN pg_foreign_table c2 "
                              "ON c2.ftrelid = c.oid WHERE c.relnamespace = 'imp'::regnamespace "
                              "ORDER BY 1").fetchall()
    assert tables == [("embeddings", ["table=embeddings", "model=all-minilm-l6-v2"]), ("models", ["table=models"])]
    assert ("embedding", "vector(384)") in columns(imported, "imp.embeddings")
    assert imported.execute("SELECT vector_dims(embedding) FROM imp.embeddings WHERE input = 'hi'").fetchone() == (384,)
    # errors and hints name the user's own table and server
    with pytest.raises(psycopg.errors.InvalidParameterValue) as err:
        imported.execute("SELECT * FROM imp.embeddings")
    assert 'imp.embeddings needs a value for "input"' in str(err.value)
    assert "FROM imp.embeddings" in err.value.diag.message_hint


def test_import_of_another_remote_schema_is_a_clear_error(imported):
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="has one, llm"):
        imported.execute("IMPORT FOREIGN SCHEMA public FROM SERVER imp INTO imp")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="takes no options"):
        imported.execute("IMPORT FOREIGN SCHEMA llm FROM SERVER imp INTO imp OPTIONS (colour 'blue')")


def test_setting_up_again_keeps_views_grants_and_data(conn, pg_server, sidecar_socket):
    conn.execute("CREATE VIEW public.cat_vec AS SELECT input, embedding FROM llm.embeddings WHERE input = 'a cat'")
    conn.execute("CREATE MATERIALIZED VIEW public.cat_mat AS SELECT input, embedding FROM llm.embeddings "
                 "WHERE input = 'a cat'")
    conn.execute("CREATE ROLE keeper")
    conn.execute("GRANT SELECT ON llm.embeddings TO keeper")
    try:
        before = conn.execute("SELECT oid FROM pg_class WHERE oid = 'llm.embeddings'::regclass").fetchone()
        embedded.apply_schema(pg_server, "llmfdw_test", f"unix://{sidecar_socket}")
        assert conn.execute("SELECT oid FROM pg_class WHERE oid = 'llm.embeddings'::regclass").fetchone() == before
        assert conn.execute("SELECT count(*) FROM public.cat_mat").fetchone() == (1,)
        assert conn.execute("SELECT vector_dims(embedding) FROM public.cat_vec").fetchone() == (384,)
        assert conn.execute("SELECT has_table_privilege('keeper', 'llm.embeddings', 'SELECT')").fetchone() == (True,)
    finally:
        conn.execute("DROP MATERIALIZED VIEW public.cat_mat")
        conn.execute("DROP VIEW public.cat_vec")
        conn.execute("REVOKE ALL ON llm.embeddings FROM keeper")
        conn.execute("DROP ROLE keeper")
