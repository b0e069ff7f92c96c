"""Vectorizer lag as a Prometheus metric (issue 19): a real postgres_exporter scrapes a real cluster.

The queue of a vectorizer lives in its database, which the sidecar never sees, so Prometheus's own
postgres_exporter (Debian's package) reads it with dashboards/postgres_exporter_queries.yaml,
logged in over TCP as a monitoring role that has llm_dashboard and nothing else.  The cluster is
tests/test_vectorizer.py's (llmfdw preloaded, the plain role `alice` owns her table); its
database DB has no background worker, so the queue stays until the test drains it.
"""
from __future__ import annotations

import time

import psycopg
import pytest

from deploy import embedded
from postgres_exporter import running, samples  # tests/postgres_exporter.py
from test_vectorizer import DB, ROLE, WORKER_DB, alice, cluster, connect, drain, table  # noqa: F401 (fixtures)

MONITOR = "llm_monitor"
PASSWORD = "monitor-secret"
POISON = "word " * 250_000   # 1.25 MB: over the sidecar's max_input_bytes (1 MiB), fails alone


@pytest.fixture(scope="module")
def monitor(cluster):
    """The exporter's login: a password over TCP, llm_dashboard only (no superuser, no pg_monitor)."""
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as c:
        c.execute(f"CREATE ROLE {MONITOR} LOGIN PASSWORD '{PASSWORD}' IN ROLE llm_dashboard")
    return f"postgresql://{MONITOR}:{PASSWORD}@127.0.0.1:{cluster.port}/{DB}?sslmode=disable"


@pytest.fixture(scope="module")
def exporter(cluster, monitor, work_dir):
    with running(monitor, [DB, WORKER_DB], embedded.free_port(), work_dir / "log" / "vec-exporter.log") as url:
        yield url


def wait_for_sample(url: str, name: str, key: tuple[str, str], predicate, timeout: float = 120) -> float:
    """Scrape until the sample `name` of `key` satisfies `predicate`; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = samples(url, name).get(key)
        if value is not None and predicate(value):
            return value
        assert time.monotonic() < deadline, f"{name}{key} is {value}"
        time.sleep(0.5)


def test_lag_is_exported_while_rows_wait_and_is_zero_once_drained(alice, exporter):
    rows = [(i, f"watched row {i}") for i in range(1, 41)] + [(41, POISON)]
    with table(alice, "watched", rows):
        alice.execute("SELECT llm.create_vectorizer('watched', 'body', chunking => 'none', hnsw => false)")
        key = (DB, "watched")
        assert wait_for_sample(exporter, "llmfdw_vectorizer_lag_seconds", key, lambda v: v > 0) > 0
        assert samples(exporter, "llmfdw_vectorizer_pending")[key] == 41
        assert samples(exporter, "llmfdw_vectorizer_failed")[key] == 0
        drain(alice, "watched")
        assert wait_for_sample(exporter, "llmfdw_vectorizer_lag_seconds", key, lambda v: v == 0) == 0
        assert samples(exporter, "llmfdw_vectorizer_pending")[key] == 0
        assert samples(exporter, "llmfdw_vectorizer_failed")[key] == 1      # the poisoned row, retried later
        assert samples(exporter, "llmfdw_vectorizer_rows_embedded_total")[key] == 40
        assert samples(exporter, "llmfdw_vectorizer_last_success_age_seconds")[key] >= 0
        assert samples(exporter, "llmfdw_vectorizer_last_run_failed")[key] == 0
    assert key not in samples(exporter, "llmfdw_vectorizer_lag_seconds")     # dropped with its table


def test_the_monitoring_role_reads_numbers_and_no_texts(alice, cluster, monitor):
    with table(alice, "private", [(1, "alice's secret text")]):
        alice.execute("SELECT llm.create_vectorizer('private', 'body', chunking => 'none', hnsw => false)")
        drain(alice, "private")
        alice.execute("UPDATE private SET body = %s WHERE id = 1", (POISON,))
        drain(alice, "private")     # fails: the error (which may quote the text) stays in the queue
        with psycopg.connect(monitor, autocommit=True) as m:
            assert m.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (False,)
            assert m.execute("SELECT pg_has_role(current_user, 'pg_read_all_data', 'USAGE')").fetchone() == (False,)
            cur = m.execute("SELECT * FROM llm.vectorizer_status() WHERE vectorizer = 'private'")
            columns = [d.name for d in cur.description]
            assert cur.fetchall() and not {"errors", "last_error", "chunk", "body", "source"} & set(columns)
            for sql in (f"SELECT chunk FROM {ROLE}.private_chunks", f"SELECT error FROM {ROLE}.private_queue",
                        f"SELECT body FROM {ROLE}.private", "SELECT last_error FROM llm.vectorizer_config",
                        "SELECT errors FROM llm.vectorizers",
                        "SELECT embedding FROM llm.embeddings WHERE input = 'x'"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    m.execute(sql).fetchall()


def test_an_owner_cannot_point_the_count_at_a_table_of_someone_else(alice, cluster, monitor):
    """An owner may edit its own catalog row (row-level security lets it): the status function,
    which runs as the extension's owner, counts only a queue that the vectorizer's owner owns."""
    with psycopg.connect(cluster.dsn(DB), autocommit=True) as su:
        su.execute("CREATE TABLE public.not_alices (queued_at timestamptz DEFAULT now(), error text)")
        su.execute("INSERT INTO public.not_alices SELECT FROM generate_series(1, 7)")
    try:
        with table(alice, "pointed", [(1, "a row")]):
            alice.execute("SELECT llm.create_vectorizer('pointed', 'body', chunking => 'none', hnsw => false)")
            alice.execute("UPDATE llm.vectorizer_config SET queue_table = 'public.not_alices' WHERE name = 'pointed'")
            with psycopg.connect(monitor, autocommit=True) as m:
                got = m.execute("SELECT pending FROM llm.vectorizer_status() WHERE vectorizer = 'pointed'").fetchall()
            assert got == []
            alice.execute("UPDATE llm.vectorizer_config SET queue_table = %s WHERE name = 'pointed'",
                          (f"{ROLE}.pointed_queue",))
    finally:
        with psycopg.connect(cluster.dsn(DB), autocommit=True) as su:
            su.execute("DROP TABLE public.not_alices")


def test_an_owner_cannot_make_the_status_function_run_its_code(alice, cluster, monitor):
    """A view of the owner's as its "queue" would run the owner's functions with the rights of
    whoever reads it: the status function's (the extension owner, a superuser), or a superuser's
    reading llm.vectorizers (row security does not confine a superuser to its own rows): only a
    plain table with the queue's column types and no child tables is counted."""
    alice.execute("CREATE FUNCTION alice.escalate() RETURNS timestamptz LANGUAGE plpgsql AS "
                  "$$ BEGIN RAISE EXCEPTION 'ran as %', current_user; END $$")
    alice.execute("CREATE VIEW alice.fake_queue AS SELECT alice.escalate() AS queued_at, NULL::text AS error")
    alice.execute("CREATE TABLE alice.typed_queue (queued_at text, error text)")
    alice.execute("CREATE TABLE alice.parent_queue (queued_at timestamptz, error text)")
    alice.execute("CREATE TABLE alice.child_queue () INHERITS (alice.parent_queue)")
    try:
        with table(alice, "sneaky", [(1, "a row")]):
            alice.execute("SELECT llm.create_vectorizer('sneaky', 'body', chunking => 'none', hnsw => false)")
            for fake in ("alice.fake_queue", "alice.typed_queue", "alice.parent_queue"):
                alice.execute("UPDATE llm.vectorizer_config SET queue_table = %s WHERE name = 'sneaky'", (fake,))
                with psycopg.connect(monitor, autocommit=True) as m:
                    assert m.execute("SELECT * FROM llm.vectorizer_status() WHERE vectorizer = 'sneaky'"
                                     ).fetchall() == []
                with psycopg.connect(cluster.dsn(DB), autocommit=True) as su:
                    pending, errors = su.execute("SELECT pending, errors FROM llm.vectorizers "
                                                 "WHERE name = 'sneaky'").fetchone()
                    assert pending is None and "no queue table" in errors[0]
            alice.execute("UPDATE llm.vectorizer_config SET queue_table = 'alice.sneaky_queue' WHERE name = 'sneaky'")
    finally:
        alice.execute("DROP VIEW alice.fake_queue")
        alice.execute("DROP TABLE alice.typed_queue, alice.child_queue, alice.parent_queue")
        alice.execute("DROP FUNCTION alice.escalate()")


def test_a_plain_user_cannot_call_the_status_function(cluster):
    with connect(cluster, role="bob") as bob:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            bob.execute("SELECT * FROM llm.vectorizer_status()")
