"""The tables come from their declarations through IMPORT FOREIGN SCHEMA, and setting up again
keeps what users built on them."""
from __future__ import annotations

import psycopg
import pytest

from deploy import embedded
from llm_tables.declarations import SPECS


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


FIXTURES = __import__("pathlib").Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
def scratch_db(pg_server):
    name = "llmfdw_scratch"
    embedded.create_database(pg_server, name)
    yield name
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as c:
        c.execute(f"DROP DATABASE {name} WITH (FORCE)")


def test_plain_ddl_install_without_our_script(pg_server, scratch_db, sidecar_socket):
    """A user with their own Postgres: CREATE EXTENSION, CREATE SERVER, IMPORT FOREIGN SCHEMA."""
    with psycopg.connect(pg_server.dsn(scratch_db), autocommit=True) as c:
        c.execute("CREATE EXTENSION vector")
        c.execute("CREATE EXTENSION llmfdw")
        c.execute(f"CREATE SERVER models FOREIGN DATA WRAPPER llmfdw OPTIONS (address 'unix://{sidecar_socket}')")
        c.execute("IMPORT FOREIGN SCHEMA llm FROM SERVER models INTO llm")
        assert c.execute("SELECT llm.complete('What is the capital of France?')").fetchone()[0]
        assert c.execute("SELECT vector_dims(llm.embed('hi'))").fetchone() == (384,)
        members = c.execute("SELECT p.proname::text FROM pg_depend d JOIN pg_proc p ON p.oid = d.objid "
                            "WHERE d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'llmfdw') "
                            "AND p.pronamespace = 'llm'::regnamespace ORDER BY 1").fetchall()
        assert {"complete", "embed", "embed_batch", "rag"} <= {m[0] for m in members}
        assert c.execute("SELECT has_function_privilege('public', 'llm.embed(text, text)', 'EXECUTE')"
                         ).fetchone() == (False,)


def test_upgrade_from_0_1_0_keeps_views_grants_and_data(pg_server, scratch_db, sidecar_socket):
    """A database set up by 0.1.0's script, with a user's views on the tables and functions,
    then the current setup (extension update included): everything the user made survives."""
    address = f"unix://{sidecar_socket}"
    with psycopg.connect(pg_server.dsn(scratch_db), autocommit=True) as c:
        c.execute("CREATE EXTENSION vector")
        c.execute("CREATE EXTENSION llmfdw VERSION '0.1.0'")
    pg_server.psql(scratch_db, "-q", "-v", f"sidecar_address={address}", "-f",
                   str(FIXTURES / "setup-0.1.0.sql"))
    with psycopg.connect(pg_server.dsn(scratch_db), autocommit=True) as c:
        c.execute("CREATE TABLE docs (id int, body text)")
        c.execute("INSERT INTO docs VALUES (1, 'a cat'), (2, 'a tax form')")
        c.execute("CREATE MATERIALIZED VIEW doc_vecs AS SELECT d.id, e.embedding FROM docs d "
                  "JOIN llm.embeddings e ON e.input = d.body")
        c.execute("CREATE VIEW kitten AS SELECT llm.embed('kitten') AS v")
        c.execute("CREATE ROLE upgrader")
        c.execute("GRANT SELECT ON llm.embeddings TO upgrader")
    try:
        embedded.apply_schema(pg_server, scratch_db, address)
        with psycopg.connect(pg_server.dsn(scratch_db), autocommit=True) as c:
            assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'llmfdw'").fetchone() == ("0.3.0",)
            assert c.execute("SELECT count(*) FROM doc_vecs").fetchone() == (2,)
            c.execute("REFRESH MATERIALIZED VIEW doc_vecs")
            assert c.execute("SELECT vector_dims(v) FROM kitten").fetchone() == (384,)
            assert c.execute("SELECT has_table_privilege('upgrader', 'llm.embeddings', 'SELECT')").fetchone() == (True,)
            # the server no longer names the (now default) class: plain roles could not alter it otherwise
            options = c.execute("SELECT srvoptions FROM pg_foreign_server WHERE srvname = 'llm_sidecar'").fetchone()[0]
            assert not any(o.startswith("wrapper=") for o in options)
            # the functions now belong to the extension, and the grants follow llm_user
            assert c.execute("SELECT has_function_privilege('llm_user', 'llm.embed(text, text)', 'EXECUTE')"
                             ).fetchone() == (True,)
    finally:
        with psycopg.connect(pg_server.dsn(scratch_db), autocommit=True) as c:
            c.execute("DROP OWNED BY upgrader")
            c.execute("DROP ROLE upgrader")


def test_setup_applies_declaration_changes_and_names_a_blocking_view(conn, pg_server, sidecar_socket):
    """What a declaration change looks like to an existing database, simulated by changing the
    table instead: a column the declaration has and the table lacks is added back; a column whose
    type differs is altered back, unless a view uses it: then the setup stops, naming the view."""
    address = f"unix://{sidecar_socket}"
    conn.execute("ALTER FOREIGN TABLE llm.usage DROP COLUMN since")
    conn.execute("ALTER FOREIGN TABLE llm.models ALTER COLUMN dimensions TYPE bigint")
    try:
        embedded.apply_schema(pg_server, "llmfdw_test", address)
        assert ("since", "timestamp with time zone") in columns(conn, "llm.usage")
        assert ("dimensions", "integer") in columns(conn, "llm.models")
        conn.execute("ALTER FOREIGN TABLE llm.models ALTER COLUMN dimensions TYPE bigint")
        conn.execute("CREATE VIEW public.model_dims AS SELECT name, dimensions FROM llm.models")
        with pytest.raises(RuntimeError) as err:
            embedded.apply_schema(pg_server, "llmfdw_test", address)
        text = str(err.value)
        assert "column llm.models.dimensions must change from bigint to integer" in text
        assert "model_dims" in text and "pg_get_viewdef" in text
    finally:
        conn.execute("DROP VIEW IF EXISTS public.model_dims")
        conn.execute("ALTER FOREIGN TABLE llm.models ALTER COLUMN dimensions TYPE integer")
        embedded.apply_schema(pg_server, "llmfdw_test", address)
