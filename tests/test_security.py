"""Who may do what, tried as plain roles (never the superuser, except to set the stage).

- No role but a superuser makes a backend import Python code by naming it (the `wrapper` option,
  or calling the validator directly).
- Options are accepted only where they belong: address/timeout on the server, token on user
  mappings, tenant on the server or a user mapping (superuser only at both), table on tables; the
  TLS file options (tls_ca_file, tls_cert_file, tls_key_file) only from a superuser.
- A role with no grants reaches nothing; `llm_user` gives the tables and functions, and still no
  USAGE on the server (so no user mapping of its own, no address or tenant of its choosing).
"""
from __future__ import annotations

import os

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

CANARY = "/tmp/llmfdw-import-canary"


@pytest.fixture(scope="module")
def roles(pg_dsn):
    """sec_mallory: LOGIN and nothing else.  sec_alice: member of llm_user.  sec_dora: a delegated admin
    with USAGE on the foreign-data wrapper (she may create servers, not choose Python code)."""
    names = ("sec_mallory", "sec_alice", "sec_dora")
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        for name in names:
            c.execute(f"CREATE ROLE {name} LOGIN")
        c.execute("GRANT llm_user TO sec_alice")
        c.execute("GRANT USAGE ON FOREIGN DATA WRAPPER llmfdw TO sec_dora")
        c.execute("GRANT CREATE ON DATABASE llmfdw_test TO sec_dora")
    yield {name: make_conninfo(pg_dsn, user=name) for name in names}
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("DROP SCHEMA IF EXISTS dora_s CASCADE")
        c.execute("DROP SERVER IF EXISTS dora_srv CASCADE")
        c.execute("REVOKE ALL ON FOREIGN DATA WRAPPER llmfdw FROM sec_dora")
        c.execute("REVOKE ALL ON DATABASE llmfdw_test FROM sec_dora")
        for name in names:
            c.execute(f"DROP OWNED BY {name}")
            c.execute(f"DROP ROLE {name}")


def run_as(dsn: str, sql: str, params=None):
    with psycopg.connect(dsn, autocommit=True) as c:
        cur = c.execute(sql, params)
        return cur.fetchall() if cur.description else None


def test_no_plain_role_causes_an_import(conn, roles):
    if os.path.exists(CANARY):
        os.unlink(CANARY)
    fdw_oid = conn.execute("SELECT oid FROM pg_foreign_data_wrapper WHERE fdwname = 'llmfdw'").fetchone()[0]
    # the review's attack: call the validator directly
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
        run_as(roles["sec_mallory"], "SELECT llm.llmfdw_validator(ARRAY['wrapper=import_canary.Canary'], %s)",
               (fdw_oid,))
    # even with USAGE on the schema (llm_user has it), the function itself is not executable
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for function"):
        run_as(roles["sec_alice"], "SELECT llm.llmfdw_validator(ARRAY['wrapper=import_canary.Canary'], %s)",
               (fdw_oid,))
    # even a role allowed to create servers cannot name a class
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match='only a superuser may set option "wrapper"'):
        run_as(roles["sec_dora"], "CREATE SERVER dora_srv FOREIGN DATA WRAPPER llmfdw "
                              "OPTIONS (wrapper 'import_canary.Canary', address 'unix:///tmp/x.sock')")
    run_as(roles["sec_dora"], "CREATE SERVER dora_srv FOREIGN DATA WRAPPER llmfdw OPTIONS (address 'unix:///tmp/x.sock')")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="only a superuser"):
        run_as(roles["sec_dora"], "ALTER SERVER dora_srv OPTIONS (ADD wrapper 'import_canary.Canary')")
    assert not os.path.exists(CANARY), "a plain role made a backend import a module"
    # the canary works: a superuser naming it imports it (and the check catches typos at once)
    conn.execute("CREATE SERVER canary_srv FOREIGN DATA WRAPPER llmfdw OPTIONS (wrapper 'import_canary.Canary')")
    try:
        assert os.path.exists(CANARY)
    finally:
        conn.execute("DROP SERVER canary_srv")
        os.unlink(CANARY)


@pytest.mark.parametrize("option", ["tls_ca_file", "tls_cert_file", "tls_key_file"])
def test_only_a_superuser_names_a_file_every_backend_reads(conn, roles, option):
    """The TLS file options name files every backend reads as the server's OS user (a key, say,
    sent along as a client certificate): a role allowed to create servers may not set them, so
    TLS to a sidecar is an administrator's setting."""
    run_as(roles["sec_dora"], "CREATE SERVER dora_tls FOREIGN DATA WRAPPER llmfdw OPTIONS (address '10.0.0.5:50051')")
    try:
        with pytest.raises(psycopg.errors.InsufficientPrivilege,
                           match=f'only a superuser may set option "{option}" on a foreign server'):
            run_as(roles["sec_dora"], f"ALTER SERVER dora_tls OPTIONS (ADD {option} '/etc/passwd')")
    finally:
        conn.execute("DROP SERVER dora_tls")


@pytest.mark.parametrize("ddl, message", [
    ("CREATE USER MAPPING FOR {role} SERVER llm_sidecar OPTIONS (address 'unix:///elsewhere.sock')",
     'option "address" belongs on a foreign server, not on a user mapping'),
    ("CREATE USER MAPPING FOR {role} SERVER llm_sidecar OPTIONS (timeout '1')",
     'option "timeout" belongs on a foreign server'),
    ("CREATE USER MAPPING FOR {role} SERVER llm_sidecar OPTIONS (table 'usage')",
     'option "table" belongs on a foreign table'),
    ("ALTER FOREIGN TABLE llm.embeddings OPTIONS (ADD address 'unix:///elsewhere.sock')",
     'option "address" belongs on a foreign server, not on a foreign table'),
    ("ALTER FOREIGN TABLE llm.embeddings OPTIONS (ADD token 'x')",
     'option "token" belongs on a user mapping'),
    ("ALTER SERVER llm_sidecar OPTIONS (ADD token 'x')", 'option "token" belongs on a user mapping'),
    ("ALTER SERVER llm_sidecar OPTIONS (ADD table 'usage')", 'option "table" belongs on a foreign table'),
])
def test_options_only_where_they_belong(conn, roles, ddl, message):
    with pytest.raises(psycopg.errors.FdwInvalidOptionName, match=message):
        conn.execute(ddl.format(role="sec_alice"))


def test_role_without_grants_reaches_nothing(roles):
    for sql in ("SELECT * FROM llm.models",
                "SELECT embedding FROM llm.embeddings WHERE input = 'x'",
                "SELECT llm.embed('x')",
                "SELECT * FROM llm.usage"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            run_as(roles["sec_mallory"], sql)
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for foreign server"):
        run_as(roles["sec_mallory"], "CREATE USER MAPPING FOR sec_mallory SERVER llm_sidecar OPTIONS (token 'x')")


def test_llm_user_queries_but_chooses_no_address_or_tenant(roles):
    rows = run_as(roles["sec_alice"], "SELECT name FROM llm.models ORDER BY name")
    assert ("all-minilm-l6-v2",) in rows
    assert run_as(roles["sec_alice"], "SELECT vector_dims(llm.embed('a small cat'))") == [(384,)]
    # no USAGE on the server: no user mapping of her own, so no tenant or token of her choosing
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for foreign server"):
        run_as(roles["sec_alice"], "CREATE USER MAPPING FOR sec_alice SERVER llm_sidecar OPTIONS (tenant 'acme')")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        run_as(roles["sec_alice"], "ALTER SERVER llm_sidecar OPTIONS (SET address 'unix:///elsewhere.sock')")


def test_tenant_in_a_user_mapping_is_for_superusers(conn, roles):
    conn.execute("GRANT USAGE ON FOREIGN SERVER llm_sidecar TO sec_alice")
    try:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match='only a superuser may set option "tenant"'):
            run_as(roles["sec_alice"], "CREATE USER MAPPING FOR sec_alice SERVER llm_sidecar OPTIONS (tenant 'acme')")
        run_as(roles["sec_alice"], "CREATE USER MAPPING FOR sec_alice SERVER llm_sidecar OPTIONS (token 'mine')")
        run_as(roles["sec_alice"], "DROP USER MAPPING FOR sec_alice SERVER llm_sidecar")
        conn.execute("CREATE USER MAPPING FOR sec_alice SERVER llm_sidecar OPTIONS (tenant 'acme')")
        conn.execute("DROP USER MAPPING FOR sec_alice SERVER llm_sidecar")
    finally:
        conn.execute("REVOKE USAGE ON FOREIGN SERVER llm_sidecar FROM sec_alice")


def test_handler_and_validator_are_not_callable(roles):
    for role in ("sec_mallory", "sec_alice"):
        for sql in ("SELECT llm.llmfdw_handler()", "SELECT llm.llmfdw_validator('{}'::text[], 0)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                run_as(roles[role], sql)


def test_a_server_with_tls_files_is_a_superusers_to_change(conn, roles):
    """The validator sees the whole option list: once a superuser gave a server TLS files, its
    owner can change nothing on it (not even timeout) without a superuser, so the files stay."""
    run_as(roles["sec_dora"], "CREATE SERVER dora_tls FOREIGN DATA WRAPPER llmfdw OPTIONS (address '10.0.0.5:50051')")
    try:
        conn.execute("ALTER SERVER dora_tls OPTIONS (ADD tls_ca_file '/etc/llmfdw/ca.pem')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match='"tls_ca_file"'):
            run_as(roles["sec_dora"], "ALTER SERVER dora_tls OPTIONS (ADD timeout '30')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match='"tls_ca_file"'):
            run_as(roles["sec_dora"], "ALTER SERVER dora_tls OPTIONS (SET tls_ca_file '/etc/passwd')")
    finally:
        conn.execute("DROP SERVER dora_tls")


def test_a_delegated_admin_picks_no_tenant(conn, roles, sidecar_socket):
    """With auth off the sidecar believes the tenant a request names: a role allowed to create
    servers may not name one on its own server (it would read that tenant's llm.requests and bill
    it), neither at CREATE SERVER nor later; its server's requests are metered to the database."""
    dora = roles["sec_dora"]
    address = f"unix://{sidecar_socket}"
    with pytest.raises(psycopg.errors.InsufficientPrivilege,
                       match='only a superuser may set option "tenant" on a foreign server') as exc:
        run_as(dora, f"CREATE SERVER dora_tenant FOREIGN DATA WRAPPER llmfdw OPTIONS (address '{address}', "
                     "tenant 'tenantb')")
    assert "act as any tenant" in exc.value.diag.message_detail
    run_as(dora, f"CREATE SERVER dora_tenant FOREIGN DATA WRAPPER llmfdw OPTIONS (address '{address}')")
    try:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match='only a superuser may set option "tenant"'):
            run_as(dora, "ALTER SERVER dora_tenant OPTIONS (ADD tenant 'tenantb')")
        run_as(dora, "CREATE SCHEMA dora_t")
        run_as(dora, "CREATE FOREIGN TABLE dora_t.embeddings (input text, embedding vector) SERVER dora_tenant "
                     "OPTIONS (table 'embeddings', model 'all-minilm-l6-v2')")
        run_as(dora, "CREATE FOREIGN TABLE dora_t.requests (at timestamptz, tenant text, kind text, "
                     "request_id text) SERVER dora_tenant OPTIONS (table 'requests')")
        run_as(dora, "SELECT embedding FROM dora_t.embeddings WHERE input = 'metered to whom?'")
        tenants = run_as(dora, "SELECT DISTINCT tenant FROM dora_t.requests WHERE kind = 'embed'")
        assert tenants == [("llmfdw_test",)]
        # a superuser may; the server is then a superuser's to change
        conn.execute("ALTER SERVER dora_tenant OPTIONS (ADD tenant 'tenantb')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match='"tenant"'):
            run_as(dora, "ALTER SERVER dora_tenant OPTIONS (ADD timeout '30')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match='"tenant"'):
            run_as(dora, "ALTER SERVER dora_tenant OPTIONS (SET tenant 'tenantc')")
    finally:
        conn.execute("DROP SCHEMA IF EXISTS dora_t CASCADE")
        conn.execute("DROP SERVER IF EXISTS dora_tenant CASCADE")
