"""Multicorn2's own regression suite, run against our host.

Multicorn2 3.2 ships pg_regress files (test-3.9/sql/*.sql with expected/*.out) and the FDW class
they drive (python/multicorn/testfdw.py).  This test runs the eleven read-side files with our host,
the way pg_regress runs them, and compares with Multicorn2's expected output:

  - the tarball (deploy/multicorn2.py's find_tarball; the test skips without it) is extracted to a
    temporary directory; nothing of it is copied into the repository;
  - testfdw.py goes into <backend_test_modules>/multicorn/: our package extends its __path__ over
    every `multicorn/` directory on sys.path (pkgutil.extend_path), so the backend imports it as
    `multicorn.testfdw`, the module path the files name, and its relative `from .utils import` works;
  - each file runs in a fresh database as `psql -X -a -q -d db < file` (pg_regress's command), from
    the extracted tree (for `\\i test-common/...`), with pg_regress's settings: PGDATESTYLE
    'Postgres, MDY', PGTZ PST8PDT, and lc_messages/lc_monetary/lc_numeric/lc_time 'C' on the database;
  - `vector` (llmfdw requires it) is created in the database beforehand, so that
    CREATE EXTENSION llmfdw CASCADE prints nothing more than CREATE EXTENSION multicorn does.

Substitutions, applied to the .sql file and to the expected output alike (SUBSTITUTIONS):
  CREATE EXTENSION multicorn;          -> CREATE EXTENSION llmfdw CASCADE;
  foreign data wrapper multicorn       -> foreign data wrapper llmfdw
  DROP EXTENSION multicorn cascade;    -> DROP EXTENSION llmfdw cascade;
Nothing else: the wrapper option still names `multicorn.testfdw.TestForeignDataWrapper`.

Like pg_regress, a file passes when its output equals one of its expected variants (name.out,
name_1.out, ...).  Where our host differs on purpose, tests/multicorn_regress/<name>.diff holds the
accepted unified diff from the closest variant to our output (docs/multicorn2.md,
says why each one stays); the test then requires exactly that diff, so any new difference fails.
LLMFDW_REGRESS_UPDATE=1 rewrites the .diff files from the current output (review them!);
LLMFDW_REGRESS_OUT=<dir> keeps each file's output and diff there.
"""
from __future__ import annotations

import difflib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

from deploy import embedded, multicorn2

FILES = [
    "multicorn_regression_test",
    "multicorn_planner_test",
    "multicorn_column_options_test",
    "multicorn_cache_invalidation",
    "multicorn_error_test",
    "multicorn_logger_test",
    "multicorn_test_date",
    "multicorn_test_dict",
    "multicorn_test_list",
    "multicorn_test_sort",
    "multicorn_test_limit",
]
SUBSTITUTIONS = [
    ("CREATE EXTENSION multicorn;", "CREATE EXTENSION llmfdw CASCADE;"),
    ("foreign data wrapper multicorn", "foreign data wrapper llmfdw"),
    ("DROP EXTENSION multicorn cascade;", "DROP EXTENSION llmfdw cascade;"),
]
TEST_DIR = "test-3.9"
ACCEPTED = Path(__file__).resolve().parent / "multicorn_regress"
PG_REGRESS_ENV = {"PGDATESTYLE": "Postgres, MDY", "PGTZ": "PST8PDT"}
PG_REGRESS_DB_SETTINGS = {"lc_messages": "C", "lc_monetary": "C", "lc_numeric": "C", "lc_time": "C",
                          "bytea_output": "hex", "timezone_abbreviations": "Default"}

TARBALL = multicorn2.find_tarball(None)
pytestmark = pytest.mark.skipif(TARBALL is None, reason=f"{multicorn2.TARBALL_NAME} not found")


def substitute(text: str) -> str:
    for old, new in SUBSTITUTIONS:
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def regress_tree(backend_test_modules):
    """The tarball's test files, extracted; testfdw.py where the backend imports multicorn.testfdw."""
    tmp = Path(tempfile.mkdtemp(prefix="llmfdw-mc2-regress-"))
    with tarfile.open(TARBALL) as tar:
        members = [m for m in tar.getmembers()
                   if f"/{TEST_DIR}/" in m.name or "/test-common/" in m.name
                   or m.name.endswith("/python/multicorn/testfdw.py")]
        tar.extractall(tmp, members=members, filter="data")
    root = next(tmp.iterdir())
    target = Path(backend_test_modules) / "multicorn"
    target.mkdir(exist_ok=True)
    shutil.copy(root / "python" / "multicorn" / "testfdw.py", target / "testfdw.py")
    for path in (target, target / "testfdw.py"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield root
    shutil.rmtree(tmp, ignore_errors=True)


def run_file(server: embedded.PgServer, root: Path, name: str) -> str:
    database = f"mc2_regress_{name}"
    server.psql("postgres", "-c", f"DROP DATABASE IF EXISTS {database}")
    server.psql("postgres", "-c", f"CREATE DATABASE {database} TEMPLATE template0 ENCODING 'UTF8'")
    settings = "; ".join(f"ALTER DATABASE {database} SET {k} = '{v}'" for k, v in PG_REGRESS_DB_SETTINGS.items())
    server.psql(database, "-c", "CREATE EXTENSION vector", "-c", settings)
    sql = substitute((root / TEST_DIR / "sql" / f"{name}.sql").read_text())
    env = {**os.environ, **PG_REGRESS_ENV}
    env.pop("PGOPTIONS", None)
    proc = subprocess.run([str(embedded.pg_bin("psql")), "-X", "-a", "-q", "-d", server.dsn(database)],
                          input=sql, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          cwd=root, env=env, timeout=300)
    server.psql("postgres", "-c", f"DROP DATABASE IF EXISTS {database}")
    return proc.stdout


def expected_variants(root: Path, name: str) -> list[tuple[str, str]]:
    found = sorted((root / TEST_DIR / "expected").glob(f"{name}*.out"))
    variants = [p for p in found if p.stem == name or
                (p.stem.startswith(name + "_") and p.stem[len(name) + 1:].isdigit())]
    return [(p.name, substitute(p.read_text())) for p in variants]


def diff_text(expected_name: str, expected: str, actual: str, name: str) -> str:
    return "".join(difflib.unified_diff(expected.splitlines(keepends=True), actual.splitlines(keepends=True),
                                        fromfile=f"expected/{expected_name}", tofile=f"results/{name}.out"))


@pytest.mark.parametrize("name", FILES)
def test_multicorn2_regression_file(pg_server, regress_tree, name):
    actual = run_file(pg_server, regress_tree, name)
    variants = expected_variants(regress_tree, name)
    assert variants, f"no expected output for {name} in the tarball"
    diffs = sorted(((len(d.splitlines()), vname, d) for vname, text in variants
                    for d in [diff_text(vname, text, actual, name)]))
    _, best_name, best = diffs[0]
    if os.environ.get("LLMFDW_REGRESS_OUT"):  # keep the output and the diff for a look
        out = Path(os.environ["LLMFDW_REGRESS_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.out").write_text(actual)
        (out / f"{name}.diff").write_text(best)
    accepted_file = ACCEPTED / f"{name}.diff"
    if os.environ.get("LLMFDW_REGRESS_UPDATE"):
        if best:
            ACCEPTED.mkdir(exist_ok=True)
            accepted_file.write_text(best)
        elif accepted_file.exists():
            accepted_file.unlink()
    accepted = accepted_file.read_text() if accepted_file.exists() else ""
    if not accepted:
        assert best == "", f"{name}: output differs from Multicorn2's expected output:\n{best}"
    else:
        assert best == accepted, (
            f"{name}: the differences from Multicorn2's expected output changed.\n"
            f"--- accepted ({accepted_file}):\n{accepted}\n--- now:\n{best}")


# ---- Sort/LIMIT pushdown in our own tables (they need the sidecar) ----

PROMPTS = ["Say one word.", "Say two words.", "Say three words."]
LIMITED = "SELECT prompt FROM llm.completions WHERE prompt = ANY(%s) AND max_tokens = 2 LIMIT 1 OFFSET 1"


def _generate_calls(port: int) -> float:
    from sidecar_process import sample, scrape

    return sample(scrape(port), "llmfdw_requests_total", rpc="Generate")


def test_limit_over_prompt_any_starts_only_the_rows_it_keeps(conn, sidecar_metrics_port):
    import time

    plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + LIMITED, [PROMPTS]).fetchall())
    assert "Limit" not in plan and "limit: 1, offset: 1" in plan, plan
    before = _generate_calls(sidecar_metrics_port)
    rows = conn.execute(LIMITED, [PROMPTS]).fetchall()
    assert rows == [(PROMPTS[1],)]
    deadline = time.monotonic() + 5
    while _generate_calls(sidecar_metrics_port) - before < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert _generate_calls(sidecar_metrics_port) - before == 1


def test_limit_is_not_pushed_past_a_condition_the_class_does_not_echo(conn):
    plan = "\n".join(r[0] for r in conn.execute(
        "EXPLAIN SELECT prompt FROM llm.completions WHERE prompt = ANY(%s) "
        "AND finish_reason = 'stop' LIMIT 1", [PROMPTS]).fetchall())
    assert "Limit" in plan and "limit:" not in plan, plan


def test_write_api_is_refused_with_a_clear_error(conn):
    import psycopg

    with pytest.raises(psycopg.errors.FeatureNotSupported, match="read side of Multicorn2's API"):
        conn.execute("INSERT INTO llm.completions (prompt) VALUES ('x')")


def test_testfdw_write_api_and_verbose_pushdown(pg_server, regress_tree):
    """testfdw defines insert(): the error says that the write API is not supported; EXPLAIN
    VERBOSE shows what was pushed down."""
    database = "mc2_regress_extra"
    pg_server.psql("postgres", "-c", f"DROP DATABASE IF EXISTS {database}")
    pg_server.psql("postgres", "-c", f"CREATE DATABASE {database}")
    try:
        pg_server.psql(database, "-c", "CREATE EXTENSION llmfdw CASCADE", "-c",
                       "CREATE SERVER s FOREIGN DATA WRAPPER llmfdw "
                       "OPTIONS (wrapper 'multicorn.testfdw.TestForeignDataWrapper')", "-c",
                       "CREATE FOREIGN TABLE t (test1 date, test2 timestamp) SERVER s "
                       "OPTIONS (test_type 'date', canlimit 'true')")
        out = pg_server.psql(database, "-c", "SET client_min_messages = warning", "-c",
                             "EXPLAIN (VERBOSE, COSTS OFF) SELECT * FROM t ORDER BY test1 DESC LIMIT 2 OFFSET 3")
        assert "Pushed Down Sort Key: test1 DESC" in out and "Pushed Down Limit: 2" in out \
            and "Pushed Down Offset: 3" in out and "Limit" not in out.replace("Pushed Down Limit", ""), out
        with pytest.raises(RuntimeError) as err:
            pg_server.psql(database, "-c", "SET client_min_messages = warning", "-c",
                           "INSERT INTO t VALUES (now(), now())")
        assert 'cannot insert into foreign table "t"' in str(err.value)
        assert "defines insert(), but the write API" in str(err.value)
    finally:
        pg_server.psql("postgres", "-c", f"DROP DATABASE IF EXISTS {database}")
