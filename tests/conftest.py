"""Fixtures for the whole suite: a real embedded Postgres with the llmfdw extension, a real sidecar.

Independent of `make up`: everything lives in one temporary directory under /tmp (short enough for
Unix sockets, traversable by the Postgres server user), on a port the kernel picks, and is torn
down at the end of the session. The C extension and the Python package must already be installed
into the venv (`make test` does that first). Postgres is driven by the same functions as `make up`
(deploy/embedded.py).

    session_sidecar (session)  the running, SERVING sidecar (subprocess.Popen), run as the server
                               OS user when the tests run as root, as `make up` runs it
    sidecar_socket  (session)  path of its socket (mode 0600 in a 0700 directory, both the
                               server user's)
    sidecar_metrics_port (session) its Prometheus port (tests/sidecar_process.scrape reads it)
    pg_server       (session)  a running cluster (embedded.PgServer: .dsn(db), .tcp_uri(db), .port)
    pg_dsn          (session)  DSN of database llmfdw_test with sql/llm_schema.sql applied, pointing
                               at the sidecar
    conn            (function) autocommit psycopg connection to pg_dsn, pgvector types registered
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from deploy import embedded  # noqa: E402

TEST_DATABASE = "llmfdw_test"
# The models ship inside PyPI packages: nothing may try the hub (inherited by the sidecar).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def work_dir():
    """Root of everything the session starts: pgdata, sockets, logs."""
    path = Path(tempfile.mkdtemp(prefix="llmfdw-test-", dir="/tmp"))
    path.chmod(0o755)  # mkdtemp makes it 0700; the server user must traverse it
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def run_dir(work_dir):
    """Socket directory shared by Postgres and the sidecar (owned by the server user)."""
    return embedded.make_server_dir(work_dir / "run")


@pytest.fixture(scope="session")
def backend_test_modules(work_dir):
    """A copy of the helper modules in tests/ (FDW classes written for tests, such as
    echo_fdw.py) that the backend can import: tests/ itself may sit in a directory the server
    user cannot enter (a clone under /root)."""
    target = work_dir / "pylib"
    shutil.copytree(TESTS, target, ignore=shutil.ignore_patterns(
        "__pycache__", "conftest.py", "test_*.py"))
    return target


@pytest.fixture(scope="session")
def pg_server(work_dir, run_dir, backend_test_modules):
    server = embedded.start_cluster(
        work_dir / "pgdata", socket_dir=run_dir, log_file=work_dir / "log" / "postgres.log",
        port=embedded.free_port(), python_path=[embedded.site_packages(), backend_test_modules])
    yield server
    embedded.stop_cluster(server.pgdata)


@pytest.fixture(scope="session")
def sidecar_log(work_dir):
    path = work_dir / "log" / "sidecar.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def sidecar_metrics_port():
    return embedded.free_port()


@pytest.fixture(scope="session")
def sidecar_socket_path(run_dir):
    """Where the session's sidecar listens: a directory of its own, as in `make up`."""
    return embedded.make_server_dir(run_dir / "sidecar", 0o700) / "sidecar.sock"


@pytest.fixture(scope="session")
def session_models_file(work_dir):
    """The session sidecar's models file: the packaged default (its embedding model runs `dtype:
    auto`: bfloat16 on a CPU with AVX512-BF16/AMX, float32 elsewhere) with the result cache off, so
    that a test that asks what an earlier test asked still reaches the engine (it checks compute
    time, cancels, timeouts); tests/test_result_cache.py runs a sidecar of its own with the cache.
    LLMFDW_TEST_EMBED_DTYPE (`make test EMBED_DTYPE=float32`) sets every embedding model's dtype:
    the same suite on the other numeric path."""
    import yaml
    from llm_sidecar.config import DEFAULT_CONFIG

    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["cache"] = {"max_bytes": 0}
    dtype = os.environ.get("LLMFDW_TEST_EMBED_DTYPE")
    for model in config["models"]:
        if dtype and model.get("task") == "embed":
            model["dtype"] = dtype
    path = work_dir / "session-models.yaml"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o644)   # read by the sidecar, which runs as the server user
    return path


@pytest.fixture(scope="session")
def session_sidecar(sidecar_socket_path, sidecar_log, sidecar_metrics_port, session_models_file):
    from sidecar_process import running_sidecar  # tests/sidecar_process.py

    with running_sidecar(str(sidecar_socket_path), str(session_models_file), log_path=str(sidecar_log),
                         metrics_port=sidecar_metrics_port) as proc:
        yield proc


@pytest.fixture(scope="session")
def sidecar_socket(session_sidecar, sidecar_socket_path):
    return str(sidecar_socket_path)


@pytest.fixture(scope="session")
def pg_dsn(pg_server, sidecar_socket):
    embedded.create_database(pg_server, TEST_DATABASE)
    embedded.apply_schema(pg_server, TEST_DATABASE, f"unix://{sidecar_socket}")
    return pg_server.dsn(TEST_DATABASE)


@pytest.fixture
def conn(pg_dsn):
    from pgvector.psycopg import register_vector

    with psycopg.connect(pg_dsn, autocommit=True) as connection:
        register_vector(connection)
        yield connection
