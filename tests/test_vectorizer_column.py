"""A vectorizer whose destination is a column of the source table (issue 19, item 1).

`destination => 'column'` keeps one vector per row in a vector(N) column of the table itself (no
chunk table, chunking 'none').  Everything runs as the plain role `alice` that owns her table (and
`bob`, a role with rights granted on it), in a cluster of this module's own, drained by the tests
(CALL llm.run_vectorizer), against the session's real sidecar.  Vectors are compared by cosine.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import psycopg
import pytest
from pgvector.psycopg import register_vector

from deploy import embedded
from test_vectorizer import CORPUS, LONG, QUERIES, drain, embedding_of, status, table, wait_for
from vectors import assert_same_embeddings  # tests/vectors.py

DB = "veccol"
ROLE = "alice"
LOG_FILE: Path | None = None   # the cluster's log (its restarts are counted there)


@pytest.fixture(scope="module")
def cluster(work_dir, backend_test_modules, sidecar_socket):
    """A cluster of this module's own with the roles alice (owns schema alice) and bob."""
    global LOG_FILE
    pgdata, LOG_FILE = work_dir / "veccol-pgdata", work_dir / "log" / "veccol-postgres.log"
    server = embedded.start_cluster(
        pgdata, socket_dir=work_dir / "veccol-run", log_file=LOG_FILE,
        port=embedded.free_port(), python_path=[embedded.site_packages(), backend_test_modules])
    try:
        with psycopg.connect(server.dsn("postgres"), autocommit=True) as c:
            c.execute(f"CREATE ROLE {ROLE} LOGIN")
            c.execute("CREATE ROLE bob LOGIN")
        embedded.create_database(server, DB)
        embedded.apply_schema(server, DB, f"unix://{sidecar_socket}")
        with psycopg.connect(server.dsn(DB), autocommit=True) as c:
            c.execute(f"GRANT llm_user TO {ROLE}, bob")
            c.execute(f"CREATE SCHEMA {ROLE} AUTHORIZATION {ROLE}")
        yield server
    finally:
        embedded.stop_cluster(pgdata)


def connect(server, role: str = ROLE) -> psycopg.Connection:
    c = psycopg.connect(server.dsn(DB).replace(f"{embedded.PG_SUPERUSER}@", f"{role}@"), autocommit=True)
    register_vector(c)
    c.execute(f"SET search_path = {ROLE}, public")
    return c


@pytest.fixture
def alice(cluster):
    with connect(cluster) as c:
        yield c


def vectors(conn, name: str) -> dict[int, object]:
    """id -> the row's embedding column (None where it has none)."""
    return dict(conn.execute(f"SELECT id, embedding FROM {name} ORDER BY id").fetchall())


def test_the_vector_lands_in_the_sources_column_and_follows_its_text(alice):
    rows = [(i, f"column document {i} about owls") for i in range(1, 11)]
    with table(alice, "owls", rows):
        view = alice.execute("SELECT llm.create_vectorizer('owls', 'body', destination => 'column')").fetchone()[0]
        assert view == "owls_embeddings"
        assert alice.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'owls'::regclass "
                             "AND attname = 'embedding'").fetchone() == ("vector(384)",)
        assert alice.execute("SELECT chunking, destination, chunk_table FROM llm.vectorizer_config "
                             "WHERE name = 'owls'").fetchone() == ("none", "column", None)
        assert alice.execute("SELECT count(*) FROM pg_indexes WHERE tablename = 'owls' AND indexdef LIKE '%hnsw%'"
                             ).fetchone() == (1,)
        assert status(alice, "owls") == (10, 0)
        drain(alice, "owls")
        assert status(alice, "owls") == (0, 0)   # the drain's own UPDATE queued nothing
        got = vectors(alice, "owls")
        assert_same_embeddings([got[3]], [embedding_of(alice, "column document 3 about owls")])
        # the view: every source column, then chunk_seq, chunk (the text) and embedding
        cols = [r[0] for r in alice.execute("SELECT attname FROM pg_attribute WHERE attrelid = 'owls_embeddings'::regclass "
                                            "AND attnum > 0 ORDER BY attnum")]
        assert cols == ["id", "body", "note", "chunk_seq", "chunk", "embedding"]
        assert alice.execute("SELECT count(*), bool_and(chunk = body AND chunk_seq = 0) FROM owls_embeddings"
                             ).fetchone() == (10, True)
        # another column changes: nothing queued; the text changes: embedded again
        alice.execute("UPDATE owls SET note = 'a remark' WHERE id = 1")
        assert status(alice, "owls") == (0, 0)
        alice.execute("UPDATE owls SET body = 'a barn owl hunts mice at night' WHERE id = 2")
        alice.execute("INSERT INTO owls (id, body) VALUES (11, 'a new owl')")
        alice.execute("DELETE FROM owls WHERE id = 4")
        # no text: no vector (NULL and empty alike)
        alice.execute("UPDATE owls SET body = NULL WHERE id = 5")
        alice.execute("UPDATE owls SET body = '' WHERE id = 6")
        assert status(alice, "owls") == (5, 0)
        drain(alice, "owls")
        assert status(alice, "owls") == (0, 0)
        got = vectors(alice, "owls")
        assert_same_embeddings([got[2], got[11]], [embedding_of(alice, "a barn owl hunts mice at night"),
                                                   embedding_of(alice, "a new owl")])
        assert 4 not in got and got[5] is None and got[6] is None
        assert alice.execute("SELECT count(*) FROM owls_embeddings").fetchone() == (8,)
        # a rollback of a batch rolls back its writes: the vector and the queue entry are as before
        alice.execute("UPDATE owls SET body = 'rolled back owl' WHERE id = 7")
        with alice.transaction():
            assert alice.execute("SELECT llm.run_vectorizer_batch('owls')").fetchone() == (1,)
            raise psycopg.Rollback()
        assert status(alice, "owls") == (1, 0)
        assert_same_embeddings([vectors(alice, "owls")[7]], [embedding_of(alice, "column document 7 about owls")])
        alice.execute("TRUNCATE owls")
        assert status(alice, "owls") == (0, 0)


def test_what_a_column_destination_refuses(alice):
    with table(alice, "refused", [(1, "one")], extra=", small vector(3), words text"):
        for call, error, message in [
            ("chunking => 'tokens'", psycopg.errors.InvalidParameterValue, "chunking must be none"),
            ("embedding_column => 'small'", psycopg.errors.DatatypeMismatch, r"is vector\(3\), not .*vector\(384\)"),
            ("embedding_column => 'words'", psycopg.errors.DatatypeMismatch, "is text, not"),
            ("embedding_column => 'body'", psycopg.errors.InvalidParameterValue, "column of the text or the key"),
            ("embedding_column => NULL", psycopg.errors.InvalidParameterValue, "needs an embedding_column"),
        ]:
            with pytest.raises(error, match=message):
                alice.execute(f"SELECT llm.create_vectorizer('refused', 'body', destination => 'column', {call})")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="destination must be table or column"):
            alice.execute("SELECT llm.create_vectorizer('refused', 'body', destination => 'row')")
        assert alice.execute("SELECT count(*) FROM llm.vectorizers").fetchone() == (0,)
        alice.execute("SELECT llm.create_vectorizer('refused', 'body', destination => 'column', hnsw => false)")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="chunking must be none"):
            alice.execute("SELECT llm.alter_vectorizer('refused', chunking => 'tokens')")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="column of the text or the key"):
            alice.execute("SELECT llm.alter_vectorizer('refused', column_name => 'embedding')")


def test_rights_a_role_needs_on_anothers_table(alice, cluster):
    """bob, with SELECT and TRIGGER on alice's table, needs UPDATE on the column, and its owner
    to add the column and the index; the drain then writes with bob's rights."""
    alice.execute("CREATE TABLE shared (id int PRIMARY KEY, body text)")
    alice.execute("INSERT INTO shared SELECT i, 'shared row ' || i FROM generate_series(1, 3) i")
    alice.execute("GRANT CREATE, USAGE ON SCHEMA alice TO bob")
    alice.execute("GRANT SELECT, TRIGGER ON shared TO bob")
    try:
        with connect(cluster, "bob") as bob:
            create = "SELECT llm.create_vectorizer('shared', 'body', destination => 'column')"
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="only its owner can add it") as err:
                bob.execute(create)
            assert "ADD COLUMN embedding" in err.value.diag.message_hint
            alice.execute("ALTER TABLE shared ADD COLUMN embedding vector(384)")
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied to update column"):
                bob.execute(create)
            alice.execute("GRANT UPDATE (embedding) ON shared TO bob")
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="only the owner of table .* can index"):
                bob.execute(create)
            bob.execute("SELECT llm.create_vectorizer('shared', 'body', destination => 'column', hnsw => false)")
            drain(bob, "shared")
            assert status(bob, "shared") == (0, 0)
            assert all(v is not None for v in vectors(alice, "shared").values())
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="only the owner of table .* can drop"):
                bob.execute("SELECT llm.drop_vectorizer('shared', drop_data => true)")
            # his triggers on her table: re-made by an alter, removed by his drop (DROP TRIGGER
            # would need the table's ownership; his trigger function's suffices)
            bob.execute("SELECT llm.alter_vectorizer('shared', format => 'note: {body}')")
            bob.execute("SELECT llm.drop_vectorizer('shared')")
            assert alice.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'shared'::regclass "
                                 "AND NOT tgisinternal").fetchone() == (0,)
            alice.execute("INSERT INTO shared (id, body) VALUES (4, 'after the drop')")   # no trigger left
    finally:
        with psycopg.connect(cluster.dsn(DB), autocommit=True) as su:   # bob's objects on alice's table
            su.execute("DROP TABLE alice.shared CASCADE")
            su.execute("DROP TABLE IF EXISTS alice.shared_queue")
            su.execute("DROP FUNCTION IF EXISTS alice.shared_enqueue()")
            su.execute("DELETE FROM llm.vectorizer_config WHERE name = 'shared'")
            su.execute("REVOKE ALL ON SCHEMA alice FROM bob")


def test_a_model_change_keeps_each_old_vector_until_its_new_one(alice):
    with table(alice, "kept", [(i, f"kept row {i}") for i in range(1, 9)]):
        alice.execute("SELECT llm.create_vectorizer('kept', 'body', destination => 'column')")
        drain(alice, "kept")
        model = alice.execute("SELECT model FROM llm.vectorizer_config WHERE name = 'kept'").fetchone()[0]
        assert alice.execute("SELECT llm.alter_vectorizer('kept', model => %s)", (model,)).fetchone() == (8,)
        while status(alice, "kept")[0]:
            assert all(v is not None for v in vectors(alice, "kept").values())   # no window without vectors
            alice.execute("SELECT llm.run_vectorizer_batch('kept', 3)")
        # a new format: queued again, and the view's chunk is the new text
        alice.execute("UPDATE kept SET note = 'n' || id")
        assert alice.execute("SELECT llm.alter_vectorizer('kept', format => '{note}: {body}')").fetchone() == (8,)
        drain(alice, "kept")
        chunk, vector = alice.execute("SELECT chunk, embedding FROM kept_embeddings WHERE id = 2").fetchone()
        assert chunk == "n2: kept row 2"
        assert_same_embeddings([vector], [embedding_of(alice, "n2: kept row 2")])


def test_drop_keeps_the_column_unless_asked(alice):
    with table(alice, "dropped", [(1, "a row to keep")]):
        alice.execute("SELECT llm.create_vectorizer('dropped', 'body', destination => 'column')")
        assert alice.execute("SELECT to_regclass('dropped_tsv') IS NOT NULL").fetchone() == (True,)
        drain(alice, "dropped")
        alice.execute("SELECT llm.drop_vectorizer('dropped')")
        assert vectors(alice, "dropped")[1] is not None
        assert alice.execute("SELECT to_regclass('dropped_embeddings') IS NOT NULL, to_regclass('dropped_queue'), "
                             "to_regclass('dropped_tsv')").fetchone() == (True, None, None)
        alice.execute("UPDATE dropped SET body = 'no trigger queues this'")
        # made again, it finds its column (and its HNSW index) and uses them
        alice.execute("DROP VIEW dropped_embeddings")
        alice.execute("SELECT llm.create_vectorizer('dropped', 'body', destination => 'column')")
        assert alice.execute("SELECT count(*) FROM pg_indexes WHERE tablename = 'dropped' AND indexdef LIKE '%hnsw%'"
                             ).fetchone() == (1,)
        alice.execute("SELECT llm.drop_vectorizer('dropped', drop_data => true)")
        assert alice.execute("SELECT count(*) FROM pg_attribute WHERE attrelid = 'dropped'::regclass "
                             "AND attname = 'embedding' AND NOT attisdropped").fetchone() == (0,)
        assert alice.execute("SELECT to_regclass('dropped_embeddings'), to_regclass('dropped_tsv')").fetchone() == (
            None, None)


def test_the_drain_neither_waits_for_a_writer_nor_wakes_text_triggers(alice, cluster):
    """A row a writer holds is skipped (it keeps its queue entry) instead of waited for: the writer's
    own trigger waits for the batch's queue entry, so waiting would deadlock.  A user's trigger
    on UPDATE OF the text does not fire for the drain's write of the vector column."""
    with table(alice, "held", [(i, f"held row {i}") for i in range(1, 6)]):
        alice.execute("CREATE TABLE held_audit (id int)")
        alice.execute("CREATE FUNCTION held_audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                      "INSERT INTO alice.held_audit VALUES (NEW.id); RETURN NULL; END $$")
        alice.execute("CREATE TRIGGER audit AFTER UPDATE OF body ON held FOR EACH ROW EXECUTE FUNCTION held_audit()")
        alice.execute("SELECT llm.create_vectorizer('held', 'body', destination => 'column')")
        try:
            with connect(cluster) as writer:
                writer.execute("BEGIN")
                writer.execute("UPDATE held SET note = 'held by a writer' WHERE id = 1")   # its row lock
                alice.execute("SET statement_timeout = '120s'")   # a drain that waited would fail, not hang
                drain(alice, "held")
                assert status(alice, "held") == (1, 0)
                assert [k for k, v in vectors(alice, "held").items() if v is None] == [1]
                writer.execute("UPDATE held SET body = 'rewritten while held' WHERE id = 1")
                writer.execute("COMMIT")
            alice.execute("SELECT pg_sleep(1.1)")   # the skipped entry is due again a second later
            drain(alice, "held")
            assert status(alice, "held") == (0, 0)
            assert_same_embeddings([vectors(alice, "held")[1]], [embedding_of(alice, "rewritten while held")])
            assert alice.execute("SELECT array_agg(id) FROM held_audit").fetchone() == ([1],)   # the writer's alone
        finally:
            alice.execute("RESET statement_timeout")
            alice.execute("DROP TABLE held_audit")
            alice.execute("SELECT llm.drop_vectorizer('held', drop_data => true)")
            alice.execute("DROP FUNCTION held_audit() CASCADE")


def test_search_and_rag_over_a_column(alice):
    with table(alice, "kbc", []):
        with alice.cursor() as cur:
            cur.executemany("INSERT INTO kbc (id, body, note) VALUES (%s, %s, %s)", CORPUS)
        alice.execute("SELECT llm.create_vectorizer('kbc', 'body', destination => 'column')")
        drain(alice, "kbc")
        found = 0
        for query, relevant in QUERIES:
            hits = alice.execute("SELECT (source_key->>'id')::int, chunk_seq, chunk FROM llm.search(%s, 'kbc', 5)",
                                 (query,)).fetchall()
            found += relevant in [h[0] for h in hits]
            assert all(seq == 0 and chunk == CORPUS[key - 1][1] for key, seq, chunk in hits)
        assert found == len(QUERIES)   # hybrid recall@5 1.00, as over a chunk table
        # the keyword side's expression is the one the vectorizer indexed
        with alice.transaction():
            alice.execute("SET LOCAL enable_seqscan = off")
            plan = "\n".join(r[0] for r in alice.execute(
                "EXPLAIN SELECT 1 FROM kbc s WHERE to_tsvector('english'::regconfig, s.body::text) "
                "@@ websearch_to_tsquery('english'::regconfig, 'backup')"))
        assert "kbc_tsv" in plan, plan
        filtered = alice.execute("""SELECT DISTINCT (source_key->>'id')::int FROM llm.search('error', 'kbc', 10,
                                    '{"note": "support"}')""").fetchall()
        assert len(filtered) == 10 and {r[0] for r in filtered} <= {k for k, _, note in CORPUS if note == "support"}
        # a row with no vector yet is not a candidate
        alice.execute("INSERT INTO kbc (id, body) VALUES (100, 'Error XJ-4471 again, not embedded yet')")
        assert 100 not in [r[0] for r in alice.execute(
            "SELECT (source_key->>'id')::int FROM llm.search('XJ-4471', 'kbc', 5)")]
        answer, sources = alice.execute("SELECT answer, sources FROM llm.rag('What does error XJ-4471 mean?', "
                                        "'kbc', k => 2, max_tokens => 24)").fetchone()
        assert answer and any(s.startswith('{"id": 1}') for s in sources)


def _restarts() -> int:
    """How often the module's cluster has restarted its processes after one of them died."""
    return LOG_FILE.read_text(errors="replace").count("all server processes terminated; reinitializing")


def _try_connect(server):
    try:
        return connect(server)
    except psycopg.OperationalError:
        return None


def test_kill_9_of_a_backend_mid_drain_loses_nothing(cluster):
    """The drain's writes to the column are in its batch's transaction: a backend killed mid-batch
    leaves its rows queued with their old vectors (or none), and the next drain finishes them."""
    rows = [(i, f"row {i}: " + LONG[: 200 + i % 300]) for i in range(1, 2001)]
    with connect(cluster) as a:
        a.execute("CREATE TABLE crashc (id int PRIMARY KEY, body text)")
        with a.cursor() as cur:
            cur.executemany("INSERT INTO crashc VALUES (%s, %s)", rows)
        a.execute("SELECT llm.create_vectorizer('crashc', 'body', destination => 'column')")

    def drain_in_background() -> None:
        try:
            with connect(cluster) as d:
                d.execute("CALL llm.run_vectorizer('crashc', 64)")
        except psycopg.OperationalError:
            pass   # killed, as meant

    drainer = threading.Thread(target=drain_in_background)
    drainer.start()
    try:
        with psycopg.connect(cluster.dsn(DB), autocommit=True) as c:
            pid = wait_for(lambda: c.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND state = 'active' "
                                             "AND query LIKE 'CALL llm.run_vectorizer%%'", (DB,)).fetchone(),
                           "the drain to start")[0]
            wait_for(lambda: c.execute("SELECT 1 FROM alice.crashc WHERE embedding IS NOT NULL LIMIT 1").fetchone(),
                     "a first batch to commit")
        restarts = _restarts()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: _restarts() > restarts, "the postmaster to restart its processes", timeout=120)
    finally:
        drainer.join()
    with wait_for(lambda: _try_connect(cluster), "Postgres to come back", timeout=120) as a:
        pending = status(a, "crashc")[0]
        unembedded = a.execute("SELECT count(*) FROM crashc WHERE embedding IS NULL").fetchone()[0]
        assert 0 < pending and unembedded <= pending   # the killed batch's rows are still queued
        drain(a, "crashc")
        assert status(a, "crashc") == (0, 0)
        assert a.execute("SELECT count(*) FROM crashc WHERE embedding IS NULL").fetchone() == (0,)
        sample = a.execute("SELECT body, embedding FROM crashc WHERE id % 97 = 0 ORDER BY id").fetchall()
        fresh = a.execute("SELECT embedding FROM llm.embed_batch(%s)", ([s[0] for s in sample],)).fetchall()
        assert_same_embeddings([s[1] for s in sample], [f[0] for f in fresh])
        a.execute("SELECT llm.drop_vectorizer('crashc', drop_data => true)")
        a.execute("DROP TABLE crashc")
