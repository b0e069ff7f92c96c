"""The vectorizer (issue 19): declared once, kept in sync by triggers, drained in batches.

Everything runs as a plain role `alice` that owns her table, in a cluster of this module's own
(it preloads llmfdw, so the background worker runs, with a short naptime and this module's
database to serve), against the session's real sidecar.  Vectors are compared by cosine.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from deploy import embedded
from vectors import assert_same_embeddings  # tests/vectors.py

DB = "vec"
ROLE = "alice"
MODEL = "all-minilm-l6-v2"


DB = "vec"          # drained by the tests themselves (CALL llm.run_vectorizer)
WORKER_DB = "vecw"  # drained by the background worker
LOG_FILE = None     # the cluster's log, quoted when a wait times out


@pytest.fixture(scope="module")
def cluster(request, work_dir, backend_test_modules, sidecar_socket):
    """A cluster of the module's own (modules that import this fixture get theirs), llmfdw
    preloaded (embedded.configure), whose worker serves WORKER_DB only, every 200 ms."""
    global LOG_FILE
    name = request.module.__name__.rsplit(".", 1)[-1]
    pgdata, LOG_FILE = work_dir / f"{name}-pgdata", work_dir / "log" / f"{name}-postgres.log"
    server = embedded.start_cluster(
        pgdata, socket_dir=work_dir / f"{name}-run", log_file=LOG_FILE,
        port=embedded.free_port(), python_path=[embedded.site_packages(), backend_test_modules])
    try:
        with psycopg.connect(server.dsn("postgres"), autocommit=True) as c:
            c.execute(f"ALTER SYSTEM SET llmfdw.vectorizer_databases = '{WORKER_DB}'")
            c.execute("ALTER SYSTEM SET llmfdw.vectorizer_naptime = '200ms'")
            c.execute("SELECT pg_reload_conf()")
            c.execute(f"CREATE ROLE {ROLE} LOGIN")
            c.execute("CREATE ROLE bob LOGIN")
        for db in (DB, WORKER_DB):
            embedded.create_database(server, db)
            embedded.apply_schema(server, db, f"unix://{sidecar_socket}")
            with psycopg.connect(server.dsn(db), autocommit=True) as c:
                c.execute(f"GRANT llm_user TO {ROLE}, bob")
                c.execute(f"CREATE SCHEMA {ROLE} AUTHORIZATION {ROLE}")
        yield server
    finally:
        embedded.stop_cluster(pgdata)


def connect(server, db: str = DB, role: str = ROLE) -> psycopg.Connection:
    c = psycopg.connect(server.dsn(db).replace(f"{embedded.PG_SUPERUSER}@", f"{role}@"), autocommit=True)
    register_vector(c)
    c.execute(f"SET search_path = {ROLE}, public")
    return c


@pytest.fixture
def alice(cluster):
    """Alice's session in DB (no worker there: each test drains when it means to)."""
    with connect(cluster) as c:
        yield c


@contextmanager
def table(conn, name: str, rows: list[tuple[int, str]], extra: str = ""):
    conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, body text, note text{extra})")
    if rows:
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {name} (id, body) VALUES (%s, %s)", rows)
    try:
        yield name
    finally:
        if conn.execute("SELECT 1 FROM llm.vectorizers WHERE name = %s", (name,)).fetchone():
            conn.execute("SELECT llm.drop_vectorizer(%s, drop_data => true)", (name,))
        conn.execute(f"DROP TABLE {name}")


def drain(conn, name: str) -> None:
    conn.execute("CALL llm.run_vectorizer(%s)", (name,))


def status(conn, name: str) -> tuple:
    return conn.execute("SELECT pending, failed FROM llm.vectorizers WHERE name = %s", (name,)).fetchone()


def chunks(conn, name: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for key, chunk in conn.execute(f"SELECT id, chunk FROM {name}_chunks ORDER BY id, chunk_seq"):
        out.setdefault(key, []).append(chunk)
    return out


def embedding_of(conn, text: str) -> np.ndarray:
    return conn.execute("SELECT embedding FROM llm.embeddings WHERE input = %s", (text,)).fetchone()[0]


def test_declare_backfills_and_drain_embeds_every_row(alice):
    with table(alice, "docs", [(i, f"document number {i} about cats") for i in range(1, 21)]):
        view = alice.execute("SELECT llm.create_vectorizer('docs', 'body', chunking => 'none', hnsw => false)"
                             ).fetchone()[0]
        assert view == "docs_embeddings"
        assert status(alice, "docs") == (20, 0)
        drain(alice, "docs")
        assert status(alice, "docs") == (0, 0)
        got = alice.execute("SELECT id, body, chunk_seq, chunk, embedding FROM docs_embeddings ORDER BY id").fetchall()
        assert [r[0] for r in got] == list(range(1, 21))
        assert all(r[1] == r[3] and r[2] == 0 for r in got)
        assert_same_embeddings([got[4][4]], [embedding_of(alice, "document number 5 about cats")])


LONG = " ".join(f"Paragraph {i} tells how the lighthouse keeper counted {i} ships in the fog." for i in range(60))


def test_chunks_table_splits_by_the_models_tokens_into_exact_substrings(alice):
    rows = alice.execute("SELECT chunk_seq, chunk, tokens FROM llm.chunks WHERE input = %s AND max_tokens = 40 "
                         "AND overlap_tokens = 8 ORDER BY chunk_seq", (LONG,)).fetchall()
    assert len(rows) > 5 and [r[0] for r in rows] == list(range(len(rows)))
    assert all(chunk in LONG and 0 < tokens <= 40 for _, chunk, tokens in rows)
    embedded_whole = alice.execute("SELECT bool_or(truncated) FROM llm.embeddings WHERE input = ANY(%s)",
                                   ([r[1] for r in rows],)).fetchone()
    assert embedded_whole == (False,)
    # the default size is all the model reads: the long text is cut, none of its chunks is truncated
    default = alice.execute("SELECT max(tokens), count(*) FROM llm.chunks WHERE input = %s", (LONG,)).fetchone()
    assert default[0] <= 254 and default[1] >= 4
    by_chars = alice.execute("SELECT chunk FROM llm.chunks WHERE input = ANY(%s) AND mode = 'characters' "
                             "AND max_chars = 100 AND overlap_chars = 0", ([LONG, "short"],)).fetchall()
    assert all(len(c) <= 100 and c in LONG + "short" for (c,) in by_chars)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="max_tokens must be between 1 and 254"):
        alice.execute("SELECT * FROM llm.chunks WHERE input = 'x' AND max_tokens = 1000").fetchall()


def test_changes_are_queued_in_their_transaction(alice):
    with table(alice, "notes", [(1, "the first note"), (2, "the second note")]):
        alice.execute("SELECT llm.create_vectorizer('notes', 'body', max_tokens => 16, overlap_tokens => 4)")
        drain(alice, "notes")
        assert status(alice, "notes") == (0, 0)
        # a rollback queues nothing
        with alice.transaction():
            alice.execute("INSERT INTO notes (id, body) VALUES (3, 'rolled back')")
            alice.execute("UPDATE notes SET body = 'changed' WHERE id = 1")
            assert status(alice, "notes") == (2, 0)
            raise psycopg.Rollback()
        assert status(alice, "notes") == (0, 0)
        # a change of another column queues nothing
        alice.execute("UPDATE notes SET note = 'a remark' WHERE id = 1")
        assert status(alice, "notes") == (0, 0)
        # insert, update, delete
        alice.execute("INSERT INTO notes (id, body) VALUES (3, %s)", (LONG,))
        alice.execute("UPDATE notes SET body = 'the first note, rewritten' WHERE id = 1")
        alice.execute("DELETE FROM notes WHERE id = 2")
        assert status(alice, "notes") == (3, 0)
        drain(alice, "notes")
        got = chunks(alice, "notes")
        assert set(got) == {1, 3}
        assert got[1] == ["the first note, rewritten"]
        assert len(got[3]) > 10 and all(c in LONG for c in got[3])
        # truncate empties the chunks and the queue
        alice.execute("INSERT INTO notes (id, body) VALUES (4, 'queued, then truncated')")
        alice.execute("TRUNCATE notes")
        assert status(alice, "notes") == (0, 0) and chunks(alice, "notes") == {}


def test_repeated_updates_embed_the_latest_text_once(alice):
    with table(alice, "drafts", [(1, "draft zero")]):
        alice.execute("SELECT llm.create_vectorizer('drafts', 'body', chunking => 'none')")
        drain(alice, "drafts")
        before = embedded_inputs(alice)
        for i in range(1, 6):
            alice.execute("UPDATE drafts SET body = %s WHERE id = 1", (f"draft number {i}",))
        assert status(alice, "drafts") == (1, 0)
        drain(alice, "drafts")
        assert embedded_inputs(alice) - before == 1
        (chunk, vector), = alice.execute("SELECT chunk, embedding FROM drafts_chunks").fetchall()
        assert chunk == "draft number 5"
        assert_same_embeddings([vector], [embedding_of(alice, "draft number 5")])


def embedded_inputs(conn) -> int:
    return conn.execute("SELECT coalesce(sum(embedded_inputs), 0) FROM llm.usage").fetchone()[0]


def test_a_poisoned_row_fails_alone_with_its_error(alice):
    rows = [(i, f"ordinary row {i}") for i in range(1, 1001)]
    rows[500] = (501, "word " * 250_000)   # 1.25 MB: over the sidecar's max_input_bytes (1 MiB)
    with table(alice, "many", rows), table(alice, "other", [(1, "another vectorizer's row")]):
        alice.execute("SELECT llm.create_vectorizer('many', 'body')")
        alice.execute("SELECT llm.create_vectorizer('other', 'body')")
        alice.execute("CALL llm.run_vectorizer(batch => 200)")
        pending, failed, errors = alice.execute(
            "SELECT pending, failed, errors FROM llm.vectorizers WHERE name = 'many'").fetchone()
        assert (pending, failed) == (0, 1)
        assert "max_input_bytes" in errors[0]
        assert alice.execute("SELECT id, attempts, next_try > now() FROM many_queue").fetchall() == [(501, 1, True)]
        assert alice.execute("SELECT count(DISTINCT id) FROM many_chunks").fetchone() == (999,)
        assert status(alice, "other") == (0, 0) and chunks(alice, "other") == {1: ["another vectorizer's row"]}
        # fixing the row retries it at once
        alice.execute("UPDATE many SET body = 'fixed' WHERE id = 501")
        drain(alice, "many")
        assert status(alice, "many") == (0, 0)


def test_a_sidecar_that_cannot_serve_leaves_the_queue_as_it_was(alice, cluster, sidecar_socket):
    """Not a row's fault: nothing is marked failed, the error shows, the next drain resumes."""
    with table(alice, "waits", [(i, f"waiting row {i}") for i in range(1, 6)]):
        alice.execute("SELECT llm.create_vectorizer('waits', 'body')")
        with psycopg.connect(cluster.dsn(DB), autocommit=True) as su:
            su.execute("ALTER SERVER llm_sidecar OPTIONS (SET address 'unix:///tmp/no-sidecar-here.sock')")
            try:
                drain(alice, "waits")
                pending, failed, error = alice.execute(
                    "SELECT pending, failed, last_error FROM llm.vectorizers WHERE name = 'waits'").fetchone()
                assert (pending, failed) == (5, 0) and "not reachable" in error
            finally:
                su.execute(f"ALTER SERVER llm_sidecar OPTIONS (SET address 'unix://{sidecar_socket}')")
        alice.execute("UPDATE llm.vectorizer_config SET model = 'no-such-model' WHERE name = 'waits'")
        drain(alice, "waits")
        pending, failed, error = alice.execute(
            "SELECT pending, failed, last_error FROM llm.vectorizers WHERE name = 'waits'").fetchone()
        assert (pending, failed) == (5, 0) and "no-such-model" in error
        alice.execute("UPDATE llm.vectorizer_config SET model = %s WHERE name = 'waits'", (MODEL,))
        drain(alice, "waits")
        assert alice.execute("SELECT pending, failed, last_error FROM llm.vectorizers WHERE name = 'waits'"
                             ).fetchone() == (0, 0, None)
        assert len(chunks(alice, "waits")) == 5


def test_only_a_readable_table_and_only_ones_own_vectorizer(alice, cluster):
    with psycopg.connect(cluster.dsn(DB), autocommit=True) as su:
        su.execute("CREATE TABLE public.secret (id int PRIMARY KEY, body text)")
        su.execute("GRANT CREATE ON SCHEMA public TO alice")
    try:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for table"):
            alice.execute("SELECT llm.create_vectorizer('public.secret', 'body')")
        with table(alice, "mine", [(1, "alice's row")]):
            with pytest.raises(psycopg.errors.InvalidTableDefinition, match="no primary key"):
                alice.execute("CREATE TABLE nokey (body text)")
                try:
                    alice.execute("SELECT llm.create_vectorizer('nokey', 'body')")
                finally:
                    alice.execute("DROP TABLE nokey")
            alice.execute("SELECT llm.create_vectorizer('mine', 'body')")
            with connect(cluster, role="bob") as bob:
                assert bob.execute("SELECT count(*) FROM llm.vectorizers").fetchone() == (0,)
                assert bob.execute("SELECT count(*) FROM llm.vectorizer_config").fetchone() == (0,)
                with pytest.raises(psycopg.errors.UndefinedObject, match="that role bob owns"):
                    bob.execute("SELECT llm.run_vectorizer_batch('mine')")
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    bob.execute("UPDATE llm.vectorizer_config SET owner = 'bob'::regrole")
                    assert bob.execute("SELECT 1").fetchone()   # RLS: no row was visible to update
                    raise psycopg.errors.InsufficientPrivilege("no row changed")
            assert alice.execute("SELECT owner::text FROM llm.vectorizer_config").fetchone() == ("alice",)
    finally:
        with psycopg.connect(cluster.dsn(DB), autocommit=True) as su:
            su.execute("DROP TABLE public.secret")
            su.execute("REVOKE CREATE ON SCHEMA public FROM alice")


def test_changing_the_chunking_re_embeds_with_no_gap(alice):
    rows = [(i, LONG[: 200 + 40 * i]) for i in range(1, 9)]
    with table(alice, "books", rows):
        alice.execute("SELECT llm.create_vectorizer('books', 'body', max_tokens => 64, overlap_tokens => 8)")
        drain(alice, "books")
        old = chunks(alice, "books")
        assert alice.execute("SELECT llm.alter_vectorizer('books', max_tokens => 16, overlap_tokens => 2)"
                             ).fetchone() == (8,)
        assert status(alice, "books") == (8, 0)
        while status(alice, "books")[0]:
            assert set(chunks(alice, "books")) == set(old)   # every row keeps vectors all along
            alice.execute("SELECT llm.run_vectorizer_batch('books', 3)")
        new = chunks(alice, "books")
        assert set(new) == set(old) and all(len(new[k]) > len(old[k]) for k in old)
        assert alice.execute("SELECT max(tokens) FROM books_chunks b, llm.chunks c WHERE c.input = b.chunk"
                             ).fetchone()[0] <= 16


# A labelled set written for this test: 40 short documents, 12 queries with one relevant document
# each.  Some queries share no word with their document (found by meaning), some are a bare code
# among many codes of the same shape (found by the exact term), some need both.
CODES = ["XJ-4471", "XJ-4417", "QZ-9120", "QZ-9102", "KV-3381", "KV-3318", "MB-2290", "MB-2209"]
MEANINGS = ["the disk quota of the tenant is exhausted", "the disk of the tenant is nearly full",
            "the TLS certificate has expired", "the TLS certificate is not yet valid",
            "the cooling fan of the server stopped", "the power supply of the server failed",
            "the backup did not finish before the window closed", "the backup could not reach its storage"]
CORPUS = [(i + 1, f"Error {code} means {meaning}.", "support") for i, (code, meaning) in enumerate(zip(CODES, MEANINGS))]
CORPUS += [(i + 9, text, note) for i, (text, note) in enumerate([
    ("How to reset a forgotten password on your account", "support"),
    ("Our office dogs: a golden retriever and two beagles", "blog"),
    ("Quarterly revenue grew thanks to the new subscription plans", "finance"),
    ("Recipe: slow-cooked tomato soup with basil", "blog"),
    ("The board approved the budget for next year", "finance"),
    ("Hiking trails near the lake, with maps", "blog"),
    ("Invoices are sent on the first working day of each month", "finance"),
    ("Tips for sleeping better: darkness, quiet and a cool room", "blog"),
    ("Parental leave policy: sixteen weeks, paid in full", "finance"),
    ("Two-factor authentication can be turned on in the security settings", "support"),
    ("The cafeteria serves vegetarian lunches on Fridays", "blog"),
    ("Travel expenses are reimbursed within ten days", "finance"),
    ("Our cat Miso likes to sleep on the warm server rack", "blog"),
    ("The annual audit found no material weaknesses", "finance"),
    ("Exporting your data as CSV from the reports page", "support"),
    ("A short history of the company's first office", "blog"),
    ("Salaries are reviewed every April", "finance"),
    ("Changing the language of the user interface", "support"),
    ("The marathon team trained all winter", "blog"),
    ("Pricing of the enterprise plan depends on the number of seats", "finance"),
    ("Deleting an account removes its data after thirty days", "support"),
    ("Photos from the summer party by the river", "blog"),
    ("Pension contributions are matched up to five percent", "finance"),
    ("Keyboard shortcuts for the editor", "support"),
    ("Book club: this month we read a novel about lighthouses", "blog"),
    ("How refunds are calculated for cancelled subscriptions", "finance"),
    ("Printing a report in landscape orientation", "support"),
    ("The garden on the roof now grows tomatoes and beans", "blog"),
    ("Fixed assets are depreciated over five years", "finance"),
    ("Connecting the mobile app to your account", "support"),
    ("The office will be closed on public holidays", "blog"),
    ("Exchange rates are taken from the central bank each morning", "finance"),
    ("Meeting notes: we discussed the move to the new building, parking, the canteen menu, the coffee "
     "machine, who waters the plants, and ticket 88213 about the broken door of the second floor.", "blog"),
    ("Weekly digest: the football team won twice, the choir needs tenors, the library got new chairs, "
     "and order 55107 of printer paper arrived late again.", "blog"),
])]
QUERIES = [
    ("I cannot log in, I lost my credentials", 9),
    ("puppies at work", 10),
    ("how much money did we earn this quarter", 11),
    ("insomnia advice", 16),
    ("when do customers get billed", 15),
    ("XJ-4471", 1),
    ("QZ-9102", 4),
    ("KV-3318", 6),
    ("MB-2209", 8),
    ("what does XJ-4417 mean", 2),
    ("error KV-3381", 5),
    ("MB-2290 backup", 7),
    ("88213", 41),
    ("55107", 42),
]


def test_chunking_settings_the_sidecar_refuses_are_refused_when_set(alice):
    """Checked by a probe of llm.chunks when they are set, not by every row failing at the next drain."""
    with table(alice, "probe", [(1, "one two three")]):
        alice.execute("SELECT llm.create_vectorizer('probe', 'body', max_tokens => 20, hnsw => false)")
        for settings in ("max_tokens => 0", "max_tokens => 100000", "max_tokens => 20, overlap_tokens => 30",
                         "chunking => 'characters', max_chars => 0"):
            with pytest.raises(psycopg.errors.InvalidParameterValue):
                alice.execute(f"SELECT llm.alter_vectorizer('probe', {settings})")
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            alice.execute("SELECT llm.create_vectorizer('probe', 'body', name => 'probe2', max_tokens => -1)")
        config = alice.execute("SELECT chunking, max_tokens FROM llm.vectorizer_config WHERE name = 'probe'").fetchone()
        assert config == ("tokens", 20)   # unchanged by the refused calls


def test_altering_while_a_batch_holds_its_rows_waits_instead_of_deadlocking(alice, cluster):
    """A batch locks its queue rows, embeds, then updates the catalog row; an alter that updated
    the catalog row first and then queued every row would deadlock with it."""
    with table(alice, "busy", [(i, f"row {i}") for i in range(1, 6)]):
        alice.execute("SELECT llm.create_vectorizer('busy', 'body', chunking => 'none', hnsw => false)")
        with connect(cluster) as batch:
            batch.execute("BEGIN")
            batch.execute("SELECT * FROM busy_queue FOR UPDATE")            # as a batch claims its rows
            done: dict = {}

            def alter() -> None:
                with connect(cluster) as other:
                    try:
                        done["queued"] = other.execute(
                            "SELECT llm.alter_vectorizer('busy', chunking => 'tokens')").fetchone()[0]
                    except psycopg.Error as err:
                        done["error"] = err

            thread = threading.Thread(target=alter)
            thread.start()
            time.sleep(1.5)                                                 # the alter is waiting now
            batch.execute("UPDATE llm.vectorizer_config SET last_run_at = now() WHERE name = 'busy'")
            batch.execute("COMMIT")
            thread.join(60)
        assert "error" not in done, done.get("error")
        assert done["queued"] == 5


def test_search_fuses_vector_and_keyword_retrieval(alice):
    with table(alice, "kb", []):
        with alice.cursor() as cur:
            cur.executemany("INSERT INTO kb (id, body, note) VALUES (%s, %s, %s)", CORPUS)
        alice.execute("SELECT llm.create_vectorizer('kb', 'body', chunking => 'none')")
        drain(alice, "kb")
        recall = {(name, at): 0.0 for name in ("hybrid", "vector", "keyword") for at in (1, 5)}
        for query, relevant in QUERIES:
            hits = alice.execute("SELECT (source_key->>'id')::int, vector_rank, keyword_rank "
                                 "FROM llm.search(%s, 'kb', 20)", (query,)).fetchall()
            for at in (1, 5):
                recall["hybrid", at] += relevant in [h[0] for h in hits[:at]]
                recall["vector", at] += relevant in [h[0] for h in hits if h[1] is not None and h[1] <= at]
                recall["keyword", at] += relevant in [h[0] for h in hits if h[2] is not None and h[2] <= at]
        recall = {key: hits / len(QUERIES) for key, hits in recall.items()}
        print(f"\nover {len(QUERIES)} queries, {len(CORPUS)} documents: " + ", ".join(
            f"{name} recall@{at} {value:.2f}" for (name, at), value in recall.items()))
        assert recall["hybrid", 5] == 1.0 >= max(recall["vector", 5], recall["keyword", 5])
        filtered = alice.execute("""SELECT DISTINCT (source_key->>'id')::int FROM llm.search('error', 'kb', 10,
                                    '{"note": "support"}')""").fetchall()
        assert len(filtered) == 10 and {r[0] for r in filtered} <= {key for key, _, note in CORPUS if note == "support"}
        answer, sources = alice.execute("SELECT answer, sources FROM llm.rag('What does error XJ-4471 mean?', "
                                        "'kb', k => 2, max_tokens => 24)").fetchone()
        assert answer and any(s.startswith('{"id": 1}') for s in sources)


def test_upgrade_from_0_2_0(cluster, sidecar_socket):
    """ALTER EXTENSION llmfdw UPDATE from 0.2.0 (through the setup script) brings the vectorizer."""
    embedded.create_database(cluster, "vec_upgrade")
    with psycopg.connect(cluster.dsn("vec_upgrade"), autocommit=True) as c:
        c.execute("CREATE EXTENSION vector")
        c.execute("CREATE EXTENSION llmfdw VERSION '0.2.0'")
    embedded.apply_schema(cluster, "vec_upgrade", f"unix://{sidecar_socket}")
    with psycopg.connect(cluster.dsn("vec_upgrade"), autocommit=True) as c:
        assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'llmfdw'").fetchone() == ("0.3.0",)
        assert c.execute("SELECT has_table_privilege('llm_user', 'llm.vectorizers', 'SELECT')").fetchone() == (True,)
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as c:
        c.execute("DROP DATABASE vec_upgrade WITH (FORCE)")


# ---- the background worker (WORKER_DB) ----

def wait_for(predicate, what: str, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    log = LOG_FILE.read_text()[-4000:] if LOG_FILE and LOG_FILE.exists() else ""
    raise AssertionError(f"timed out waiting for {what}; the cluster's log ends:\n{log}")


def test_worker_runs_as_the_owner_and_shows_in_pg_stat_activity(cluster):
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as c:
        wait_for(lambda: {r[0] for r in c.execute("SELECT backend_type FROM pg_stat_activity WHERE backend_type "
                                                  "LIKE '%vectorizer%'")} == {"llmfdw vectorizer launcher",
                                                                              "llmfdw vectorizer"},
                 "the launcher and the worker of the served database", timeout=60)
    with connect(cluster, WORKER_DB) as a, table(a, "live", [(i, f"live row {i}") for i in range(1, 51)]):
        a.execute("CREATE TABLE writers (who text, tenant_db text)")
        a.execute("CREATE FUNCTION note_writer() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                  "INSERT INTO alice.writers VALUES (current_user, current_database()); RETURN NULL; END $$")
        a.execute("SELECT llm.create_vectorizer('live', 'body')")
        a.execute("CREATE TRIGGER w AFTER INSERT ON live_chunks FOR EACH STATEMENT EXECUTE FUNCTION note_writer()")
        before = embedded_inputs(a)
        wait_for(lambda: status(a, "live") == (0, 0) and len(chunks(a, "live")) == 50, "the worker's backfill")
        a.execute("INSERT INTO live (id, body) VALUES (51, 'inserted later')")
        wait_for(lambda: chunks(a, "live").get(51) == ["inserted later"], "the worker to embed a new row")
        assert {r[0] for r in a.execute("SELECT who FROM writers")} == {"alice"}
        assert embedded_inputs(a) - before >= 51   # metered to this database's tenant
        a.execute("DROP TABLE writers CASCADE")


CRASH_ROWS = [(i, f"row {i}: " + LONG[: 300 + i]) for i in range(1, 401)]


def assert_embedded_once_from_current_text(conn, name: str) -> None:
    """Every row's chunks are its current text's, each once (0 lost, 0 duplicated, 0 stale), and
    their vectors are those texts' embeddings."""
    bodies = dict(conn.execute(f"SELECT id, body FROM {name}").fetchall())
    stored = chunks(conn, name)
    expected: dict[int, list[str]] = {}
    for key, _, chunk in conn.execute(f"SELECT b.id, c.chunk_seq, c.chunk FROM {name} b, llm.chunks c "
                                      "WHERE c.input = b.body AND c.max_tokens = 32 AND c.overlap_tokens = 4 "
                                      "ORDER BY 1, 2"):
        expected.setdefault(key, []).append(chunk)
    assert set(stored) == set(bodies) and stored == expected
    sample = conn.execute(f"SELECT chunk, embedding FROM {name}_chunks WHERE id IN (1, 200, 400) "
                          "ORDER BY id, chunk_seq").fetchall()
    fresh = conn.execute("SELECT embedding FROM llm.embed_batch(%s)", ([s[0] for s in sample],)).fetchall()
    assert_same_embeddings([s[1] for s in sample], [f[0] for f in fresh])


def crash_table(conn, name: str) -> None:
    conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, body text, note text)")
    conn.execute(f"SELECT llm.create_vectorizer('{name}', 'body', max_tokens => 32, overlap_tokens => 4)")
    with conn.cursor() as cur:
        cur.executemany(f"INSERT INTO {name} (id, body) VALUES (%s, %s)", CRASH_ROWS)


def kill_9_when(server, db: str, condition: str, what: str) -> None:
    """kill -9 the backend that pg_stat_activity shows matching `condition` (the postmaster then
    restarts every backend: crash recovery), and wait until the database takes connections again."""
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as c:
        pid = wait_for(lambda: c.execute(f"SELECT pid FROM pg_stat_activity WHERE datname = %s AND state = 'active' "
                                         f"AND {condition}", (db,)).fetchone(), what)[0]
    restarts = _restarts()
    os.kill(pid, signal.SIGKILL)
    # A connection made before the postmaster has reacted would be killed by its restart: wait for
    # the restart itself (its log line), then for the database.
    wait_for(lambda: _restarts() > restarts, "the postmaster to restart its processes", timeout=120)
    wait_for(lambda: _try_connect(server, db), "Postgres to come back", timeout=120).close()


def _restarts() -> int:
    """How often the module's cluster has restarted its processes after one of them died."""
    return LOG_FILE.read_text(errors="replace").count("all server processes terminated; reinitializing")


def test_kill_9_of_the_worker_mid_batch_loses_nothing(cluster):
    with connect(cluster, WORKER_DB) as a:
        crash_table(a, "crash")
    kill_9_when(cluster, WORKER_DB, "backend_type = 'llmfdw vectorizer' AND query = 'llmfdw vectorizer: crash'",
                "the worker to start a batch")
    with connect(cluster, WORKER_DB) as a:
        a.execute("UPDATE crash SET body = 'rewritten after the crash' WHERE id <= 10")
        wait_for(lambda: status(a, "crash") == (0, 0), "the worker to finish the queue after the crash", timeout=300)
        assert_embedded_once_from_current_text(a, "crash")
        a.execute("SELECT llm.drop_vectorizer('crash', drop_data => true)")
        a.execute("DROP TABLE crash")


def test_kill_9_of_a_backend_mid_drain_loses_nothing(cluster):
    """The same drain called from a session (CALL llm.run_vectorizer), its backend killed mid-batch."""
    with connect(cluster) as a:
        crash_table(a, "crash2")
        a.execute("UPDATE crash2 SET body = body || ' (edited)' WHERE id % 7 = 0")

    def drain_in_background() -> None:
        try:
            with connect(cluster) as d:
                d.execute("CALL llm.run_vectorizer('crash2', 64)")
        except psycopg.OperationalError:
            pass   # killed, as meant

    import threading
    drainer = threading.Thread(target=drain_in_background)
    drainer.start()
    try:
        kill_9_when(cluster, DB, "query LIKE 'CALL llm.run_vectorizer%%'", "the drain to start")
    finally:
        drainer.join()
    with connect(cluster) as a:
        assert status(a, "crash2")[0] > 0    # the killed batch's rows are still queued
        drain(a, "crash2")
        assert status(a, "crash2") == (0, 0)
        assert_embedded_once_from_current_text(a, "crash2")
        a.execute("SELECT llm.drop_vectorizer('crash2', drop_data => true)")
        a.execute("DROP TABLE crash2")


def test_kill_9_of_postgres_mid_batch_loses_nothing(cluster):
    """The postmaster itself killed while the worker embeds; every process of the cluster ends
    (they notice their postmaster is gone), Postgres starts again (crash recovery), the worker
    finishes the queue."""
    with connect(cluster, WORKER_DB) as a:
        crash_table(a, "crash3")
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as c:
        wait_for(lambda: c.execute("SELECT 1 FROM pg_stat_activity WHERE state = 'active' AND "
                                   "query = 'llmfdw vectorizer: crash3'").fetchone(), "the worker to start a batch")
        pids = [r[0] for r in c.execute("SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()")]
    postmaster = int((cluster.pgdata / "postmaster.pid").read_text().split()[0])
    os.kill(postmaster, signal.SIGKILL)
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids),
             "the cluster's processes to end after their postmaster", timeout=120)
    server = embedded.start_cluster(cluster.pgdata, socket_dir=cluster.socket_dir, log_file=LOG_FILE,
                                    port=cluster.port)
    assert server.port == cluster.port
    with wait_for(lambda: _try_connect(cluster), "Postgres to take connections after the restart", timeout=120) as a:
        wait_for(lambda: status(a, "crash3") == (0, 0), "the worker to finish the queue after the restart",
                 timeout=300)
        assert_embedded_once_from_current_text(a, "crash3")
        a.execute("SELECT llm.drop_vectorizer('crash3', drop_data => true)")
        a.execute("DROP TABLE crash3")


def _try_connect(server, db: str = WORKER_DB):
    try:
        c = connect(server, db)
    except psycopg.OperationalError:
        return None
    return c
