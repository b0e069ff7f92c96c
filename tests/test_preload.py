"""Python preloaded in the postmaster (llmfdw.preload_python, fdw/src/python.c): every backend
inherits the interpreter and llm_tables through fork, and still gets a process of its own.

The session's cluster preloads (deploy/embedded.py puts llmfdw in shared_preload_libraries and
the GUC is on by default), so the rest of the suite runs on inherited interpreters; these tests
check what forking must not share, that the postmaster stays one thread, and a cluster with
preloading off or failing.
"""
from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from deploy import embedded

SCHEMA_SQL = (
    "CREATE EXTENSION IF NOT EXISTS llmfdw CASCADE",
    "DROP SERVER IF EXISTS preload_process CASCADE",
    "CREATE SERVER preload_process FOREIGN DATA WRAPPER llmfdw OPTIONS (wrapper 'process_fdw.ProcessFdw')",
    "CREATE FOREIGN TABLE process (pid int, session text, draw float8, inherited bool) SERVER preload_process",
)


def _make_table(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        for sql in SCHEMA_SQL:
            c.execute(sql)


def _first_queries(dsn: str, n: int) -> list[tuple]:
    """The process row from `n` new connections, each asking once (its first llm query)."""
    rows = []
    for _ in range(n):
        with psycopg.connect(dsn, autocommit=True) as c:
            rows.append(c.execute("SELECT pid, session, draw, inherited FROM process").fetchone())
    return rows


def _threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def _postmaster_pid(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        backend = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        status = Path(f"/proc/{backend}/status").read_text()   # while the backend lives
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))


@pytest.fixture(scope="module")
def process_dsn(pg_dsn):
    _make_table(pg_dsn)
    return pg_dsn


def test_backends_inherit_the_interpreter_but_not_its_identity(process_dsn):
    rows = _first_queries(process_dsn, 4)
    assert all(inherited for *_, inherited in rows), rows          # llm_tables came with the fork
    assert len({pid for pid, *_ in rows}) == 4
    assert len({session for _, session, *_ in rows}) == 4, rows     # the sidecar's fairness key
    assert len({draw for _, _, draw, _ in rows}) == 4, rows         # `random` reseeded per backend


def test_postmaster_stays_one_thread_while_backends_run_grpc(process_dsn, conn):
    # a real llm query makes gRPC's channel (and its threads) in this backend only
    assert conn.execute("SELECT count(*) FROM llm.models").fetchone()[0] >= 1
    backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    assert _threads(backend) > 1
    assert _threads(_postmaster_pid(process_dsn)) == 1


@pytest.fixture(scope="module")
def second_cluster(work_dir, run_dir, backend_test_modules, pg_server):
    """Another cluster on its own data directory, stopped at the end."""
    pgdata = work_dir / "preload-pgdata"
    log = work_dir / "log" / "postgres-preload.log"

    def start(python_path: list[Path]) -> embedded.PgServer:
        return embedded.start_cluster(pgdata, socket_dir=run_dir, log_file=log, port=embedded.free_port(),
                                      python_path=python_path)
    yield start, log
    embedded.stop_cluster(pgdata)


def test_after_a_backend_crash_the_postmaster_forks_inherited_interpreters_again(second_cluster, site_and_tests):
    import os
    import signal
    import time

    start, _ = second_cluster
    server = start(site_and_tests)
    dsn = server.dsn("postgres")
    _make_table(dsn)
    victim = psycopg.connect(dsn, autocommit=True)
    pid = victim.execute("SELECT pid FROM process").fetchone()[0]
    os.kill(pid, signal.SIGKILL)   # the postmaster resets every backend and restarts them
    deadline = time.monotonic() + 60
    while True:
        try:
            rows = _first_queries(dsn, 2)
            break
        except psycopg.OperationalError:
            assert time.monotonic() < deadline, "the cluster did not come back after the crash"
            time.sleep(0.5)
    victim.close()
    assert [inherited for *_, inherited in rows] == [True, True]
    assert _threads(_postmaster_pid(dsn)) == 1
    embedded.stop_cluster(server.pgdata)


def test_preloading_off_starts_python_in_each_backend(second_cluster, site_and_tests):
    start, _ = second_cluster
    server = start(site_and_tests)
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as c:
        c.execute("ALTER SYSTEM SET llmfdw.preload_python = off")
    embedded.stop_cluster(server.pgdata)
    server = start(site_and_tests)
    dsn = server.dsn("postgres")
    _make_table(dsn)
    rows = _first_queries(dsn, 2)
    assert [inherited for *_, inherited in rows] == [False, False]
    assert len({session for _, session, *_ in rows}) == 2
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("ALTER SYSTEM RESET llmfdw.preload_python")
    embedded.stop_cluster(server.pgdata)


def test_a_failed_preload_is_a_warning_and_the_query_says_why(second_cluster, backend_test_modules):
    start, log = second_cluster
    # llm_tables and the multicorn package are missing from this path: the postmaster cannot
    # import them, says so in the log, and starts anyway
    server = start([backend_test_modules])
    assert "could not preload Python module" in log.read_text()
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as c:
        with pytest.raises(psycopg.Error, match="multicorn|llm_tables"):
            c.execute("SELECT * FROM process").fetchall()
        assert c.execute("SELECT 1").fetchone() == (1,)
    embedded.stop_cluster(server.pgdata)


@pytest.fixture(scope="module")
def site_and_tests(backend_test_modules):
    return [embedded.site_packages(), backend_test_modules]
