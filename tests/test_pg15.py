"""llmfdw on a second PostgreSQL major version: 15 (Debian's packages), beside the wheel's 18.

deploy/pg15.py (`make pg15`, run by `make test`) installs postgresql-15 and
postgresql-server-dev-15 and builds pgvector (the vendored 0.8.6 tarball) and llmfdw into them. This
module starts a throwaway PostgreSQL 15 cluster and runs through it what a user does: sql/llm_schema.sql
with PostgreSQL 15's psql, a completion, an embedding (pgvector's type and operators), a join with a
table of their own, the error for a missing prompt, an IMPORT FOREIGN SCHEMA into another schema
and a cancel. The requests go to the session's sidecar (conftest.py), the one the PostgreSQL 18
cluster uses.

The cluster runs as the same OS user as the session's PostgreSQL 18 and sidecar (embedded_postgres
when the tests run as root, else ourselves): the sidecar's socket is that user's alone (mode 0600),
and that user can read the venv the backends import from (llmfdw.python_path).
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest

from backend_cancel import CANCEL_WITHIN_S, cancel_from_another_session, generation_tokens, wait_until_decoding
from deploy import embedded, pg15
from vectors import assert_same_embeddings

DATABASE = "llmfdw_pg15"
FRANCE = "What is the capital of France?"
LONG = "Write a very long story about a dragon and a knight."
DOCS = ["Paris is the capital and largest city of France.",
        "PostgreSQL is an open-source relational database.",
        "Bananas are rich in potassium.",
        "pgvector adds vector similarity search to Postgres."]


def _not_ready() -> str | None:
    """Why PostgreSQL 15 with pgvector and llmfdw is not usable here, or None."""
    if not (pg15.BINDIR / "postgres").exists() or not pg15.PG_CONFIG.exists() or pg15.missing_packages():
        return (f"PostgreSQL {pg15.MAJOR} is not installed ({', '.join(pg15.PACKAGES)}); as root, "
                f"`make pg15` installs it")
    ext = pg15.pg_config("sharedir") / "extension"
    for name in ("vector", "llmfdw"):
        if not (ext / f"{name}.control").exists():
            return f"{name} is not installed into PostgreSQL {pg15.MAJOR}; run `make pg15` (as root)"
    return None


NOT_READY = _not_ready()
pytestmark = pytest.mark.skipif(NOT_READY is not None, reason=str(NOT_READY))


@pytest.fixture(scope="module")
def pg15_server():
    """A PostgreSQL 15 cluster on a free port, configured as deploy/embedded.py configures 18."""
    work = Path(tempfile.mkdtemp(prefix="llmfdw-pg15-", dir="/tmp"))
    work.chmod(0o755)  # the server user must traverse it
    pgdata = embedded.make_server_dir(work / "pgdata", 0o700)
    run_dir = embedded.make_server_dir(work / "run")
    log_file = embedded.make_server_dir(work / "log") / "postgres.log"
    as_server = embedded._as_server_user()
    embedded._run([pg15.BINDIR / "initdb", "-D", pgdata, "-U", embedded.PG_SUPERUSER, "--auth=trust",
                   "--encoding=UTF8", "--no-locale", "--no-instructions"], what="initdb (15)", cwd=pgdata,
                  **as_server)
    port = embedded.free_port()
    embedded.configure(pgdata, port=port, socket_dir=run_dir, python_path=[embedded.site_packages()])
    try:
        embedded._run([pg15.BINDIR / "pg_ctl", "-D", pgdata, "-l", log_file, "-w", "-t", "60", "start"],
                      what="pg_ctl start (15)", cwd=pgdata, **as_server)
    except RuntimeError as err:
        tail = log_file.read_text()[-3000:] if log_file.exists() else ""
        shutil.rmtree(work, ignore_errors=True)
        raise RuntimeError(f"{err}\n--- {log_file} ---\n{tail}") from None
    server = embedded.PgServer(pgdata, port, run_dir)
    try:
        yield server
    finally:
        subprocess.run([str(pg15.BINDIR / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "-t", "60", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=pgdata, **as_server)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def pg15_dsn(pg15_server, sidecar_socket):
    """Database llmfdw_pg15 with sql/llm_schema.sql applied by PostgreSQL 15's own psql."""
    embedded.create_database(pg15_server, DATABASE)
    dsn = pg15_server.dsn(DATABASE)
    proc = subprocess.run([str(pg15.BINDIR / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn,
                           "-v", f"sidecar_address=unix://{sidecar_socket}", "-f", str(embedded.SCHEMA_SQL)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"psql (15) -f sql/llm_schema.sql failed:\n{proc.stdout}"
    return dsn


@pytest.fixture
def conn15(pg15_dsn):
    with psycopg.connect(pg15_dsn, autocommit=True) as connection:
        yield connection


def test_it_is_postgres_15_with_the_extensions(conn15):
    assert conn15.execute("SELECT current_setting('server_version_num')::int / 10000").fetchone() == (15,)
    versions = dict(conn15.execute("SELECT extname, extversion FROM pg_extension").fetchall())
    assert versions["vector"] == pg15.PGVECTOR_VERSION
    assert versions["llmfdw"] == "0.3.0"
    tables = {r[0] for r in conn15.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'llm' AND c.relkind = 'f'")}
    assert {"completions", "embeddings", "models", "usage"} <= tables


def test_completion(conn15):
    (completion, finish, tokens) = conn15.execute(
        "SELECT completion, finish_reason, output_tokens FROM llm.completions WHERE prompt = %s",
        (FRANCE,)).fetchone()
    print(f"\nPostgreSQL 15: {completion!r} ({finish}, {tokens} tokens)")
    assert "Paris" in completion
    assert tokens > 0
    assert conn15.execute("SELECT llm.complete(%s, max_tokens => 4)", (FRANCE,)).fetchone()[0]


def test_embedding(conn15):
    rows = conn15.execute(
        "SELECT input, vector_dims(embedding), embedding <=> llm.embed('kitten') AS d FROM llm.embeddings "
        "WHERE input = ANY(ARRAY['a small cat', 'a tax form']) ORDER BY d").fetchall()
    assert [(r[0], r[1]) for r in rows] == [("a small cat", 384), ("a tax form", 384)]
    assert 0 < rows[0][2] < rows[1][2] < 2


def test_join_with_a_user_table(conn15):
    conn15.execute("DROP TABLE IF EXISTS docs")
    conn15.execute("CREATE TABLE docs (id serial PRIMARY KEY, body text NOT NULL)")
    with conn15.cursor() as cur:
        cur.executemany("INSERT INTO docs (body) VALUES (%s)", [(d,) for d in DOCS])
    conn15.execute("ANALYZE docs")
    join = ("SELECT d.id, vector_dims(e.embedding), (e.embedding <=> llm.embed('Which database can search "
            "vectors?'))::float8 AS distance FROM docs d JOIN llm.embeddings e ON e.input = d.body")
    plan = "\n".join(r[0] for r in conn15.execute("EXPLAIN (COSTS OFF) " + join))
    print(f"\nPostgreSQL 15 plan:\n{plan}")
    rows = conn15.execute(join + " ORDER BY distance").fetchall()
    assert sorted(r[0] for r in rows) == [1, 2, 3, 4]
    assert all(r[1] == 384 for r in rows)
    assert rows[0][0] in (2, 4)  # the two about databases are nearest
    # the same vectors as the bulk form (one request for all of them; another batch, so by cosine)
    joined = dict(conn15.execute("SELECT d.id, e.embedding::text FROM docs d JOIN llm.embeddings e "
                                 "ON e.input = d.body").fetchall())
    bulk = dict(conn15.execute(
        "SELECT d.id, e.embedding::text FROM docs d "
        "JOIN llm.embeddings e ON e.input = d.body AND e.input = ANY(ARRAY(SELECT body FROM docs))").fetchall())
    ids = sorted(joined)
    assert ids == sorted(bulk)
    assert_same_embeddings([joined[i].strip("[]").split(",") for i in ids],
                           [bulk[i].strip("[]").split(",") for i in ids])
    # a left join keeps every outer row
    left = conn15.execute("SELECT count(*), count(e.embedding) FROM docs d LEFT JOIN llm.embeddings e "
                          "ON e.input = d.body").fetchone()
    assert left == (4, 4)


def test_missing_prompt_is_an_error_with_a_hint(conn15):
    with pytest.raises(psycopg.Error) as info:
        conn15.execute("SELECT completion FROM llm.completions")
    assert 'needs a value for "prompt"' in info.value.diag.message_primary
    assert "WHERE prompt =" in (info.value.diag.message_hint or "")
    assert conn15.execute("SELECT 1").fetchone() == (1,)


def test_import_foreign_schema_into_another_schema(conn15):
    conn15.execute("DROP SCHEMA IF EXISTS models_too CASCADE")
    conn15.execute("CREATE SCHEMA models_too")
    conn15.execute("IMPORT FOREIGN SCHEMA llm LIMIT TO (embeddings, models) FROM SERVER llm_sidecar INTO models_too")
    tables = {r[0] for r in conn15.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'models_too' AND c.relkind = 'f'")}
    assert tables == {"embeddings", "models"}
    assert conn15.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                          "WHERE attrelid = 'models_too.embeddings'::regclass AND attname = 'embedding'"
                          ).fetchone() == ("vector(384)",)
    models = dict(conn15.execute("SELECT name, task FROM models_too.models").fetchall())
    assert set(models.values()) >= {"generate", "embed"}
    assert conn15.execute("SELECT vector_dims(embedding) FROM models_too.embeddings WHERE input = 'a puppy'"
                          ).fetchone() == (384,)


def test_cancel_stops_a_long_generation(conn15, pg15_dsn, sidecar_metrics_port):
    """pg_cancel_backend while the sidecar decodes: the query stops at once and the session goes on."""
    conn15.execute("SELECT completion FROM llm.completions WHERE prompt = %s AND max_tokens = 1", (FRANCE,))
    before = generation_tokens(sidecar_metrics_port)
    err, latency = cancel_from_another_session(
        conn15, pg15_dsn, "SELECT completion FROM llm.completions WHERE prompt = %s AND max_tokens = 1500",
        (LONG,), when=lambda: wait_until_decoding(sidecar_metrics_port, before))
    print(f"\nPostgreSQL 15 cancel: the query ended {latency * 1000:.0f} ms after pg_cancel_backend: "
          f"{err and err.sqlstate} {err and err.diag.message_primary}")
    assert isinstance(err, psycopg.errors.QueryCanceled)
    assert latency < CANCEL_WITHIN_S
    assert conn15.execute("SELECT 1").fetchone() == (1,)
