"""sql/monitor_role.sql, which the chart's DDL Job runs for its postgres_exporter (helm:
postgres.exporter): the role it makes logs in with the Secret's password over TCP, reads the
vectorizer metrics and nothing else, follows a rotated password, and the script refuses a short
password or a superuser's name instead of weakening anything."""
from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest

from deploy import embedded

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "sql" / "monitor_role.sql"
DATABASE = "llmfdw_test"   # conftest's, with sql/llm_schema.sql applied (the pg_dsn fixture)


def run_script(pg_server, database: str, user: str, password_file: Path) -> subprocess.CompletedProcess:
    """The script as the Job runs it: psql as the superuser, the password in a file."""
    return subprocess.run([str(embedded.pg_bin("psql")), "-X", "-q", "-d", pg_server.dsn(database),
                           "-v", f"monitor_user={user}", "-f", str(SCRIPT)],
                          env={**os.environ, "LLMFDW_MONITOR_PASSWORD_FILE": str(password_file)},
                          capture_output=True, text=True)


def login(pg_server, database: str, user: str, password: str) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=pg_server.port, dbname=database, user=user,
                           password=password, autocommit=True)


@pytest.fixture
def monitor(pg_server, pg_dsn, tmp_path):
    user = f"llm_monitor_{uuid.uuid4().hex[:8]}"
    yield user, tmp_path / "password"
    pg_server.psql("postgres", "-q", "-c", f'DROP ROLE IF EXISTS "{user}"')


def test_the_role_logs_in_reads_the_vectorizer_metrics_and_nothing_more(pg_server, monitor):
    user, secret = monitor
    secret.write_text("first-password-0123\n")   # a Secret's file may end in a newline
    done = run_script(pg_server, DATABASE, user, secret)
    assert done.returncode == 0, done.stderr
    assert "first-password" not in done.stdout + done.stderr
    with login(pg_server, DATABASE, user, "first-password-0123") as c:
        assert c.execute("SELECT count(*) >= 0 FROM llm.vectorizer_status()").fetchone() == (True,)
        role = c.execute("SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls "
                         "FROM pg_roles WHERE rolname = current_user").fetchone()
        assert role == (False, False, False, False, False)
        granted = c.execute("SELECT array_agg(b.rolname ORDER BY b.rolname) FROM pg_auth_members m "
                            "JOIN pg_roles b ON b.oid = m.roleid WHERE m.member = current_user::regrole").fetchone()
        assert granted == (["llm_dashboard"],)
        for denied in ("SELECT * FROM llm.vectorizer_config", "SELECT * FROM llm.completions LIMIT 1"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(denied)

    # a rotated Secret: run again, the new password works and the old one no longer does
    secret.write_text("second-password-4567")
    assert run_script(pg_server, DATABASE, user, secret).returncode == 0
    login(pg_server, DATABASE, user, "second-password-4567").close()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        login(pg_server, DATABASE, user, "first-password-0123")


def test_a_short_password_or_a_superusers_name_is_refused(pg_server, monitor):
    user, secret = monitor
    secret.write_text("short")
    done = run_script(pg_server, DATABASE, user, secret)
    assert done.returncode != 0 and "at least 12 characters" in done.stderr
    assert pg_server.psql("postgres", "-tAc", f"SELECT count(*) FROM pg_roles WHERE rolname = '{user}'").strip() == "0"

    secret.write_text("a-long-enough-password")
    done = run_script(pg_server, DATABASE, embedded.PG_SUPERUSER, secret)
    assert done.returncode != 0 and "is a superuser" in done.stderr
    assert pg_server.psql("postgres", "-tAc", f"SELECT rolsuper FROM pg_roles WHERE rolname = "
                                              f"'{embedded.PG_SUPERUSER}'").strip() == "t"

    secret.unlink()
    done = run_script(pg_server, DATABASE, user, secret)   # no file: nothing made
    assert done.returncode != 0 and "at least 12 characters" in done.stderr
