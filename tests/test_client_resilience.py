"""The FDW's client under faults: a restarted sidecar, a tenant with little room.

Each test runs its own sidecar (a small config) so that stopping it or filling its queue
touches no other test.
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import psycopg
import pytest

from sidecar_process import EMBED_ONLY, running_sidecar, smollm2

TIGHT_TENANT = "default_limits: {max_in_flight: 2, max_queued: 2}\nmodels:\n" + smollm2(max_tokens=4)


def _server(conn, name: str, sock, table_ddl: str) -> None:
    conn.execute(f"CREATE SERVER {name} FOREIGN DATA WRAPPER llmfdw OPTIONS (address 'unix://{sock}')")
    conn.execute(f"CREATE SCHEMA {name}")
    conn.execute(table_ddl.format(schema=name, server=name))


def _drop(pg_dsn: str, name: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        c.execute(f"DROP SERVER IF EXISTS {name} CASCADE")


def test_backend_recovers_within_a_second_of_a_restarted_sidecar_serving(conn, pg_dsn, run_dir, work_dir):
    config = work_dir / "recover.yaml"
    config.write_text(EMBED_ONLY)
    config.chmod(0o644)
    sock = run_dir / "recover.sock"
    log = str(work_dir / "log" / "recover-sidecar.log")
    query = "SELECT vector_dims(embedding) FROM recover.embeddings WHERE input = 'hello'"
    try:
        with running_sidecar(str(sock), config_path=str(config), log_path=log):
            _server(conn, "recover", sock, "CREATE FOREIGN TABLE {schema}.embeddings (input text, embedding vector) "
                                           "SERVER {server} OPTIONS (table 'embeddings', model 'all-minilm-l6-v2')")
            assert conn.execute(query).fetchone() == (384,)
        # down: every try fails with "not reachable", as gRPC's backoff would grow
        for _ in range(6):
            with pytest.raises(psycopg.errors.FdwUnableToEstablishConnection, match="not reachable"):
                conn.execute(query)
            time.sleep(0.3)
        with running_sidecar(str(sock), config_path=str(config), log_path=log):
            serving = time.monotonic()
            while True:
                try:
                    assert conn.execute(query).fetchone() == (384,)
                    break
                except psycopg.errors.FdwUnableToEstablishConnection:
                    assert time.monotonic() - serving < 10, "the backend never reconnected"
                    time.sleep(0.05)
            recovered = time.monotonic() - serving
            print(f"recovered {recovered * 1000:.0f} ms after SERVING")
            assert recovered < 1.5
    finally:
        _drop(pg_dsn, "recover")


def test_tenant_with_two_slots_and_two_queued_runs_five_prompts(conn, pg_dsn, run_dir, work_dir):
    config = work_dir / "tight.yaml"
    config.write_text(TIGHT_TENANT)
    config.chmod(0o644)
    sock = run_dir / "tight.sock"
    try:
        with running_sidecar(str(sock), config_path=str(config), log_path=str(work_dir / "log" / "tight.log")):
            _server(conn, "tight", sock, "CREATE FOREIGN TABLE {schema}.completions (prompt text, completion text) "
                                         "SERVER {server} OPTIONS (table 'completions', model 'smollm2-135m-instruct')")
            rows = conn.execute("SELECT prompt, completion FROM tight.completions WHERE prompt = "
                                "ANY(ARRAY['Say a.', 'Say b.', 'Say c.', 'Say d.', 'Say e.'])").fetchall()
            assert sorted(r[0] for r in rows) == ["Say a.", "Say b.", "Say c.", "Say d.", "Say e."]
            assert all(r[1] is not None for r in rows)
    finally:
        _drop(pg_dsn, "tight")


@contextlib.contextmanager
def _slow_to_answer(path: Path, target: str, delay: float) -> Iterator[None]:
    """A Unix socket at `path` forwarding to the sidecar at `target`, which holds each new
    connection `delay` seconds before the sidecar's first bytes (its HTTP/2 SETTINGS) pass: a
    sidecar too busy to answer a new connection at once."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    path.chmod(0o777)   # the backend runs as the server OS user
    server.listen(16)

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def handle(client: socket.socket) -> None:
        time.sleep(delay)
        upstream = socket.socket(socket.AF_UNIX)
        with contextlib.suppress(OSError):   # the test is over and the sidecar gone
            upstream.connect(target)
            threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
            pipe(upstream, client)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                threading.Thread(target=handle, args=(server.accept()[0],), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield
    finally:
        server.close()
        path.unlink(missing_ok=True)


def test_sidecar_slow_to_answer_a_new_connection_is_not_unreachable(pg_dsn, run_dir, sidecar_socket):
    """gRPC core takes min_reconnect_backoff_ms as the least time a connection attempt may take
    until the server's SETTINGS frame; at 100 ms a busy sidecar failed new sessions' first query
    (HV00N "timed out before receiving SETTINGS frame").  A second's wait now only delays it."""
    sock = run_dir / "slow.sock"
    try:
        with _slow_to_answer(sock, sidecar_socket, delay=1.0), psycopg.connect(pg_dsn, autocommit=True) as conn:
            _server(conn, "slow", sock, "CREATE FOREIGN TABLE {schema}.embeddings (input text, embedding vector) "
                                        "SERVER {server} OPTIONS (table 'embeddings', model 'all-minilm-l6-v2')")
            for _ in range(2):   # each a new session: a new channel, a new connection
                with psycopg.connect(pg_dsn, autocommit=True) as fresh:
                    assert fresh.execute("SELECT vector_dims(embedding) FROM slow.embeddings "
                                         "WHERE input = 'hello'").fetchone() == (384,)
    finally:
        _drop(pg_dsn, "slow")


@pytest.mark.parametrize("left_behind", [True, False], ids=["socket-file-no-process", "no-socket-file"])
def test_dead_sidecar_is_reported_at_once(conn, pg_dsn, run_dir, left_behind):
    """The longer connect timeout does not delay the error for a sidecar that is gone: connect()
    is refused at once (a socket file with nobody listening, or none at all)."""
    sock = run_dir / "dead.sock"
    if left_behind:
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(str(sock))
        dead.close()   # the file stays, no process listens
    try:
        _server(conn, "dead", sock, "CREATE FOREIGN TABLE {schema}.embeddings (input text, embedding vector) "
                                    "SERVER {server} OPTIONS (table 'embeddings', model 'all-minilm-l6-v2')")
        started = time.monotonic()
        with pytest.raises(psycopg.errors.FdwUnableToEstablishConnection, match="not reachable"):
            conn.execute("SELECT embedding FROM dead.embeddings WHERE input = 'hello'")
        assert time.monotonic() - started < 3, "a dead sidecar took seconds to be reported"
    finally:
        sock.unlink(missing_ok=True)
        _drop(pg_dsn, "dead")
