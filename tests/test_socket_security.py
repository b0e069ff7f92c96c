"""Who may reach the sidecar: only the Postgres server's OS user, and the sidecar is never root.

Whoever can connect to the sidecar's socket runs every model and reads usage without any database
role being involved, so the socket must be closed to every other local user from the moment it
exists, and a sidecar that parses untrusted prompts must not hold root. The tests that need a
second OS user (`nobody`, `daemon`) run only as root.
"""
from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from deploy import embedded
from sidecar_process import sidecar_process

AS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not AS_ROOT, reason="switching to a second OS user needs root")
PACKAGED = Path(__file__).resolve().parents[1] / "sidecar" / "llm_sidecar" / "models.yaml"
GEN = "smollm2-135m-instruct"

CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as err:
    sys.exit(f"{type(err).__name__}: {err}")
print("connected")
"""

HEALTH = """
import sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.RpcError as err:
        sys.exit(f"{err.code().name}: {err.details()}")
print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
"""


def server_ids() -> tuple[int, int]:
    """uid and gid the sidecar and Postgres run as: the server user as root, else ourselves."""
    user = embedded.server_os_user()
    entry = pwd.getpwnam(user) if user else pwd.getpwuid(os.geteuid())
    return entry.pw_uid, entry.pw_gid


def run_as(user: str, code: str, *args: str) -> subprocess.CompletedProcess:
    """Run Python `code` as OS user `user`, with the interpreter and packages the sidecar gets."""
    entry = pwd.getpwnam(user)
    python, python_env = embedded.sidecar_interpreter()
    return subprocess.run([python, "-c", code, *args], user=entry.pw_uid, group=entry.pw_gid,
                          extra_groups=[], env={**os.environ, **python_env, "HOME": "/"}, cwd="/",
                          capture_output=True, text=True, timeout=60)


def generation_only_config(path: Path) -> Path:
    """A config with only the small generation model: a sidecar that starts in seconds."""
    model = next(m for m in yaml.safe_load(PACKAGED.read_text())["models"] if m["name"] == GEN)
    path.write_text(yaml.safe_dump({"models": [model]}))
    return path


def modes_until_serving(sock: Path, proc: subprocess.Popen, timeout: float = 60) -> list[tuple[int, int, int]]:
    """(mode, uid, gid) of `sock` from the first moment it exists until the sidecar serves."""
    seen: list[tuple[int, int, int]] = []
    deadline = time.monotonic() + timeout
    while not seen:
        assert proc.poll() is None and time.monotonic() < deadline, "the sidecar never made its socket"
        try:
            st = os.stat(sock)
        except FileNotFoundError:
            time.sleep(0.001)
            continue
        seen.append((stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid))
    embedded.wait_serving(f"unix://{sock}", timeout, alive=lambda: proc.poll() is None)
    st = os.stat(sock)
    return seen + [(stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)]


def test_the_socket_is_owner_only_and_belongs_to_the_server_user(sidecar_socket):
    st = os.stat(sidecar_socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == server_ids()
    directory = os.stat(Path(sidecar_socket).parent)
    assert stat.S_IMODE(directory.st_mode) == 0o700
    assert (directory.st_uid, directory.st_gid) == server_ids()


def test_the_socket_is_never_looser_than_its_final_mode(tmp_path):
    """The first sight of a fresh sidecar's socket already has no group or world bits."""
    sock = tmp_path / "fresh.sock"
    with sidecar_process(str(sock), str(generation_only_config(tmp_path / "c.yaml"))) as proc:
        seen = modes_until_serving(sock, proc)
    assert all(mode & 0o077 == 0 and (uid, gid) == server_ids() for mode, uid, gid in seen), seen
    assert seen[-1][0] == 0o600


def test_the_sidecar_does_not_run_as_root(session_sidecar):
    status = Path(f"/proc/{session_sidecar.pid}/status").read_text()
    uids = [int(u) for u in next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]]
    assert len(uids) == 4 and 0 not in uids  # real, effective, saved, filesystem
    assert set(uids) == {server_ids()[0]}


def test_the_backend_still_queries_through_the_socket(conn):
    rows = conn.execute("SELECT name, state FROM llm.models ORDER BY name").fetchall()
    assert rows == [("all-minilm-l6-v2", "ready"), (GEN, "ready")]


@needs_root
def test_another_os_user_cannot_connect(sidecar_socket, work_dir):
    assert run_as(embedded.SERVER_OS_USER, CONNECT, sidecar_socket).stdout.strip() == "connected"
    raw = run_as("nobody", CONNECT, sidecar_socket)
    assert raw.returncode == 1 and "PermissionError" in raw.stderr, raw.stdout + raw.stderr
    health = run_as("nobody", HEALTH, f"unix://{sidecar_socket}")
    assert health.returncode == 1 and "Permission denied" in health.stderr, health.stdout + health.stderr
    # The socket's own mode refuses too, not only its directory: a hard link in an open directory.
    link = work_dir / "linked-sidecar.sock"
    os.link(sidecar_socket, link)
    try:
        assert run_as(embedded.SERVER_OS_USER, CONNECT, str(link)).stdout.strip() == "connected"
        linked = run_as("nobody", CONNECT, str(link))
        assert linked.returncode == 1 and "PermissionError" in linked.stderr, linked.stdout + linked.stderr
    finally:
        link.unlink()


@needs_root
def test_another_os_user_cannot_reach_the_postgres_socket(pg_server):
    """Postgres trusts its Unix socket (`local ... trust`): only because no other user gets to it."""
    pg_socket = str(pg_server.socket_dir / f".s.PGSQL.{pg_server.port}")
    assert run_as(embedded.SERVER_OS_USER, CONNECT, pg_socket).stdout.strip() == "connected"
    other = run_as("nobody", CONNECT, pg_socket)
    assert other.returncode == 1 and "PermissionError" in other.stderr, other.stdout + other.stderr


@needs_root
def test_socket_group_lets_a_sidecar_of_another_user_serve_the_server_user(work_dir):
    """--socket-group: the sidecar runs as `nobody` in the server user's group; the socket is 0660
    with that group, never wider, and a third user (`daemon`) is refused."""
    sidecar_uid, gid = pwd.getpwnam("nobody").pw_uid, server_ids()[1]
    directory = work_dir / "group-socket"
    directory.mkdir(mode=0o750)
    os.chown(directory, sidecar_uid, gid)
    config = generation_only_config(work_dir / "group-socket.yaml")
    home = directory / "home"
    sock = directory / "s.sock"
    argv, kwargs = embedded.sidecar_process_args(
        f"unix://{sock}", home=home, config=config, extra=("--socket-group", embedded.SERVER_OS_USER))
    os.chown(home, sidecar_uid, -1)
    kwargs.update(user=sidecar_uid, group=pwd.getpwnam("nobody").pw_gid, extra_groups=[gid])
    proc = subprocess.Popen(argv, cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, **kwargs)
    try:
        seen = modes_until_serving(sock, proc)
        assert all(mode & 0o007 == 0 for mode, _, _ in seen), seen
        assert seen[-1] == (0o660, sidecar_uid, gid)
        assert run_as(embedded.SERVER_OS_USER, HEALTH, f"unix://{sock}").stdout.strip() == "SERVING"
        refused = run_as("daemon", CONNECT, str(sock))
        assert refused.returncode == 1 and "PermissionError" in refused.stderr, refused.stdout + refused.stderr
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture
def restore_umask():
    """server.main sets the process umask; put the test process's back."""
    umask = os.umask(0o022)
    os.umask(umask)
    yield
    os.umask(umask)


def test_root_is_refused_unless_allow_root(monkeypatch, caplog, tmp_path, restore_umask):
    from llm_sidecar import server

    monkeypatch.setattr(server.os, "geteuid", lambda: 0)
    sock = tmp_path / "s.sock"
    assert server.main(["--listen", f"unix://{sock}"]) == 2
    assert "refusing to run as root" in caplog.text and "--allow-root" in caplog.text
    assert not sock.exists()
    # With the flag it goes on, here as far as the (deliberately empty) configuration.
    caplog.clear()
    empty = tmp_path / "empty.yaml"
    empty.write_text("models: []\n")
    assert server.main(["--listen", f"unix://{sock}", "--config", str(empty), "--allow-root"]) == 2
    assert "refusing" not in caplog.text and "bad configuration" in caplog.text


@needs_root
def test_a_sidecar_started_by_root_exits_without_a_socket(tmp_path):
    sock = tmp_path / "s.sock"
    proc = subprocess.run([sys.executable, "-m", embedded.SIDECAR_MODULE, "--listen", f"unix://{sock}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "refusing to run as root" in proc.stderr and "--allow-root" in proc.stderr
    assert not sock.exists()
