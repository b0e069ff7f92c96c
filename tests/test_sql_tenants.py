"""Tenants through SQL: tokens in user mappings, limits and usage per tenant.

A second sidecar runs with auth required; three roles map to two tenants
(one with a wrong token).  Each role sees only its tenant's usage.
"""
from __future__ import annotations

import threading
import time

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from sidecar_process import running_sidecar, smollm2

CONFIG = """
auth: required
tenants:
  - {name: acme, token: acme-token, max_in_flight: 1, max_queued: 0}
  - {name: globex, token: globex-token}
models:
""" + smollm2(max_tokens=16)
ROLES = {"alice": ("acme", "acme-token"), "bob": ("globex", "globex-token"), "carol": ("globex", "wrong")}


@pytest.fixture(scope="module")
def tenancy(pg_dsn, run_dir, work_dir):
    config = work_dir / "auth.yaml"
    config.write_text(CONFIG)
    sock = run_dir / "auth.sock"
    with running_sidecar(str(sock), config_path=str(config), log_path=str(work_dir / "log" / "auth-sidecar.log")):
        with psycopg.connect(pg_dsn, autocommit=True) as c:
            c.execute(f"CREATE SERVER llm_auth FOREIGN DATA WRAPPER llmfdw "
                      f"OPTIONS (wrapper 'llm_tables.tables.SidecarTables', address 'unix://{sock}')")
            c.execute("CREATE SCHEMA tenancy")
            c.execute("CREATE FOREIGN TABLE tenancy.completions (prompt text, max_tokens int, completion text) "
                      "SERVER llm_auth OPTIONS (table 'completions', model 'smollm2-135m-instruct')")
            c.execute("CREATE FOREIGN TABLE tenancy.usage (tenant text, model text, requests bigint, "
                      "output_tokens bigint, compute_ms float8) SERVER llm_auth OPTIONS (table 'usage')")
            for role, (tenant, token) in ROLES.items():
                c.execute(f"CREATE ROLE {role} LOGIN")
                c.execute(f"CREATE USER MAPPING FOR {role} SERVER llm_auth "
                          f"OPTIONS (tenant '{tenant}', token '{token}')")
            c.execute("GRANT USAGE ON SCHEMA tenancy TO alice, bob, carol")
            c.execute("GRANT USAGE ON FOREIGN SERVER llm_auth TO alice, bob, carol")
            c.execute("GRANT SELECT ON ALL TABLES IN SCHEMA tenancy TO alice, bob, carol")
        yield {role: make_conninfo(pg_dsn, user=role) for role in ROLES}
        with psycopg.connect(pg_dsn, autocommit=True) as c:
            c.execute("DROP SCHEMA tenancy CASCADE")
            c.execute("DROP SERVER llm_auth CASCADE")
            for role in ROLES:
                c.execute(f"DROP ROLE {role}")


def usage(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute("SELECT tenant, model, requests, output_tokens FROM tenancy.usage").fetchall()


def test_each_role_sees_only_its_tenants_usage(tenancy):
    with psycopg.connect(tenancy["alice"], autocommit=True) as c:
        for prompt in ("Say hi.", "Say bye."):
            c.execute("SELECT completion FROM tenancy.completions WHERE prompt = %s", (prompt,)).fetchone()
    with psycopg.connect(tenancy["bob"], autocommit=True) as c:
        c.execute("SELECT completion FROM tenancy.completions WHERE prompt = 'Say yes.'").fetchone()
    alice = usage(tenancy["alice"])
    assert alice and {r[0] for r in alice} == {"acme"}
    assert sum(r[2] for r in alice) >= 2
    bob = usage(tenancy["bob"])
    assert bob and {r[0] for r in bob} == {"globex"}
    assert sum(r[2] for r in bob) >= 1


def test_a_wrong_token_is_a_clear_sql_error(tenancy):
    with psycopg.connect(tenancy["carol"], autocommit=True) as c:
        with pytest.raises(psycopg.Error) as exc:
            c.execute("SELECT completion FROM tenancy.completions WHERE prompt = 'hi'")
        assert "refused the credentials" in str(exc.value)
        assert "USER MAPPING" in exc.value.diag.message_hint
        assert exc.value.sqlstate == "28000"
        assert "globex-token" not in str(exc.value)
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_tokens_are_not_visible_to_other_roles(tenancy):
    with psycopg.connect(tenancy["bob"], autocommit=True) as c:
        rows = c.execute("SELECT usename, umoptions FROM pg_user_mappings WHERE srvname = 'llm_auth'").fetchall()
    options = {user: opts for user, opts in rows}
    assert options["alice"] is None
    assert any("globex-token" in o for o in options["bob"])


def test_a_tenant_over_its_limit_gets_a_clear_error(tenancy):
    errors: list = []

    def long_generation() -> None:
        with psycopg.connect(tenancy["alice"], autocommit=True) as c:
            c.execute("SET statement_timeout = '4s'")
            try:
                c.execute("SELECT completion FROM tenancy.completions "
                          "WHERE prompt = 'Write a long story.' AND max_tokens = 1500").fetchone()
            except psycopg.Error as err:
                errors.append(err)

    holder = threading.Thread(target=long_generation)
    holder.start()
    time.sleep(1.0)
    with psycopg.connect(tenancy["alice"], autocommit=True) as c:
        with pytest.raises(psycopg.Error) as exc:
            c.execute("SELECT completion FROM tenancy.completions WHERE prompt = 'hi'")
        assert "limit" in str(exc.value) and "acme" in str(exc.value)
        assert exc.value.sqlstate == "53300"
    # another tenant is not affected
    with psycopg.connect(tenancy["bob"], autocommit=True) as c:
        assert c.execute("SELECT completion FROM tenancy.completions WHERE prompt = 'hi'").fetchone()[0]
    holder.join(10)
    # the holder ran into its statement_timeout, and nothing else
    assert len(errors) == 1 and isinstance(errors[0], psycopg.errors.QueryCanceled), errors
