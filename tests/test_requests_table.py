"""llm.requests: the sidecar's window of recent requests, through SQL.

One row per finished request (generate, embed, list_models, usage) of the caller's tenant, from a
window per tenant bounded by count and age (`history` in the sidecar's YAML).  Quals on `at` travel
in the request, so the sidecar ships only the rows in range: checked with EXPLAIN ANALYZE (the
scan's filter removes nothing) and by counting the rows the Requests RPC returns.  A second sidecar
with `auth: required` checks that a tenant never sees another's rows, as tests/test_sql_tenants.py
does for llm.usage.  A third, with small windows and auth off, checks that no tenant can push out
another's rows: neither a dashboard role scanning llm.models in its own database nor a caller that
makes up tenant names.
"""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import grpc
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from llm_sidecar.history import METADATA_ROWS
from llm_inference.v1 import inference_pb2 as pb
from llm_inference.v1 import inference_pb2_grpc as pb_grpc
from deploy import embedded
from sidecar_process import EMBED_ONLY, running_sidecar, smollm2

GEN = "smollm2-135m-instruct"
EMB = "all-minilm-l6-v2"
COLUMNS = ["at", "tenant", "model", "kind", "status", "queue_ms", "first_token_ms", "total_ms",
           "input_tokens", "output_tokens", "embedded_inputs", "compute_ms", "request_id"]


def traffic(conn) -> None:
    """One request of each kind, through SQL."""
    conn.execute("SELECT completion FROM llm.completions WHERE prompt = 'Say hi.' AND max_tokens = 8").fetchall()
    conn.execute("SELECT dimensions FROM llm.embeddings WHERE input = ANY(ARRAY['a cat', 'a dog'])").fetchall()
    conn.execute("SELECT name FROM llm.models").fetchall()
    conn.execute("SELECT model FROM llm.usage").fetchall()


def scan_node(conn, sql: str, params=()) -> dict:
    """The Foreign Scan node of EXPLAIN (ANALYZE, FORMAT JSON)."""
    plan = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", params).fetchone()[0][0]["Plan"]
    while plan["Node Type"] != "Foreign Scan":
        (plan,) = plan["Plans"]
    return plan


# ---- the table, from its declaration ----------------------------------------------------------

def test_import_foreign_schema_created_the_table(conn):
    rows = conn.execute("""
        SELECT a.attname, format_type(a.atttypid, a.atttypmod)
          FROM pg_attribute a WHERE a.attrelid = 'llm.requests'::regclass AND a.attnum > 0
         ORDER BY a.attnum""").fetchall()
    assert [r[0] for r in rows] == COLUMNS
    assert dict(rows)["at"] == "timestamp with time zone"
    options = conn.execute("SELECT ftoptions FROM pg_foreign_table "
                           "WHERE ftrelid = 'llm.requests'::regclass").fetchone()[0]
    assert "table=requests" in options


def test_one_row_per_request_with_its_timings(conn):
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    traffic(conn)
    rows = conn.execute("SELECT * FROM llm.requests WHERE at >= %s ORDER BY at", (before,)).fetchall()
    by_kind = {}
    for row in rows:
        by_kind.setdefault(row[3], []).append(dict(zip(COLUMNS, row)))
    assert set(by_kind) >= {"generate", "embed", "list_models", "usage"}, by_kind.keys()
    gen = by_kind["generate"][-1]
    assert gen["tenant"] == "llmfdw_test" and gen["model"] == GEN and gen["status"] == "OK"
    assert before <= gen["at"] <= datetime.now(timezone.utc)
    assert 0 < gen["first_token_ms"] <= gen["total_ms"] and gen["queue_ms"] >= 0
    assert gen["input_tokens"] > 0 and 0 < gen["output_tokens"] <= 8 and gen["compute_ms"] > 0
    emb = by_kind["embed"][-1]
    assert emb["model"] == EMB and emb["embedded_inputs"] == 2 and emb["first_token_ms"] is None
    assert emb["input_tokens"] > 0 and emb["output_tokens"] == 0
    listing = by_kind["list_models"][-1]
    assert listing["model"] is None and listing["status"] == "OK" and listing["total_ms"] >= 0
    assert all(len(r["request_id"]) > 0 for rs in by_kind.values() for r in rs)


def test_a_failed_request_is_recorded_with_its_status(conn):
    before = datetime.now(timezone.utc)
    with pytest.raises(psycopg.Error):
        conn.execute("SELECT completion FROM llm.completions WHERE prompt = 'x' AND model = 'no-such-model'")
    rows = conn.execute("SELECT kind, model, status FROM llm.requests WHERE at >= %s", (before,)).fetchall()
    assert ("generate", "unknown", "NOT_FOUND") in rows


# ---- time quals are pushed down ---------------------------------------------------------------

def test_time_range_travels_in_the_request(conn):
    traffic(conn)
    split = conn.execute("SELECT clock_timestamp()").fetchone()[0]
    time.sleep(0.01)
    conn.execute("SELECT name FROM llm.models").fetchall()
    conn.execute("SELECT model FROM llm.usage").fetchall()
    everything = conn.execute("SELECT count(*) FROM llm.requests").fetchone()[0]
    recent = conn.execute("SELECT count(*) FROM llm.requests WHERE at > %s", (split,)).fetchone()[0]
    assert recent == 2 and everything > recent

    # The sidecar sent only the rows in range: the scan's recheck removes none.  The same bound
    # written so that it cannot be sent (an expression on the column) makes it remove the rest:
    # that is what a scan without the pushdown would ship.
    for sql in ("SELECT * FROM llm.requests WHERE at > %s",
                "SELECT * FROM llm.requests WHERE at > %s::timestamptz - interval '0 minutes'",  # stable expr
                "SELECT * FROM llm.requests WHERE at BETWEEN %s AND now() + interval '1 hour'"):
        node = scan_node(conn, sql, (split,))
        assert node["Actual Rows"] == 2 and node.get("Rows Removed by Filter", 0) == 0, (sql, node)
    node = scan_node(conn, "SELECT * FROM llm.requests WHERE at + interval '0 s' > %s", (split,))
    assert node["Actual Rows"] == 2 and node["Rows Removed by Filter"] == everything - 2

    upper = scan_node(conn, "SELECT * FROM llm.requests WHERE at <= %s", (split,))
    assert upper["Actual Rows"] == everything - 2 and upper.get("Rows Removed by Filter", 0) == 0

    text = "\n".join(r[0] for r in conn.execute(
        "EXPLAIN SELECT * FROM llm.requests WHERE at > now() - interval '15 minutes'").fetchall())
    assert "time range sent" in text and "at" in text, text


def test_the_sidecar_returns_only_the_rows_in_range(conn, sidecar_socket):
    """The Requests RPC itself, counted: bounds are applied by the sidecar, inclusive or not."""
    traffic(conn)
    with grpc.insecure_channel(f"unix://{sidecar_socket}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        ctx = pb.RequestContext(tenant="llmfdw_test")
        rows = stub.Requests(pb.RequestsRequest(context=ctx)).rows
        assert len(rows) >= 4 and [r.at_unix_ns for r in rows] == sorted(r.at_unix_ns for r in rows)
        assert all(r.tenant == "llmfdw_test" for r in rows)
        third = rows[-3].at_unix_ns
        after = stub.Requests(pb.RequestsRequest(context=ctx, after_unix_ns=third)).rows
        assert [r.request_id for r in after] == [r.request_id for r in rows if r.at_unix_ns > third]
        at_or_after = stub.Requests(pb.RequestsRequest(context=ctx, after_unix_ns=third, after_inclusive=True)).rows
        assert len(at_or_after) == len(after) + sum(r.at_unix_ns == third for r in rows)
        only = stub.Requests(pb.RequestsRequest(context=ctx, after_unix_ns=third, after_inclusive=True,
                                                before_unix_ns=third, before_inclusive=True)).rows
        assert {r.at_unix_ns for r in only} == {third}
        assert not stub.Requests(pb.RequestsRequest(context=pb.RequestContext(tenant="nobody"))).rows


# ---- the dashboard role -----------------------------------------------------------------------

def test_the_dashboard_role_reads_measurements_and_calls_no_model(pg_dsn):
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("CREATE ROLE dash_reader LOGIN IN ROLE llm_dashboard")
    try:
        with psycopg.connect(make_conninfo(pg_dsn, user="dash_reader"), autocommit=True) as c:
            for table in ("llm.requests", "llm.usage", "llm.models"):
                c.execute(f"SELECT count(*) FROM {table}").fetchone()
            for sql in ("SELECT * FROM llm.completions WHERE prompt = 'hi'",
                        "SELECT * FROM llm.embeddings WHERE input = 'hi'",
                        "SELECT llm.embed('hi')"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    c.execute(sql)
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as c:
            c.execute("DROP ROLE dash_reader")


# ---- tenants ----------------------------------------------------------------------------------

CONFIG = """
auth: required
history: {max_rows: 100, max_age_seconds: 600}
tenants:
  - {name: acme, token: acme-token}
  - {name: globex, token: globex-token}
models:
""" + smollm2(max_tokens=8)
ROLES = {"hist_alice": ("acme", "acme-token"), "hist_bob": ("globex", "globex-token")}


@pytest.fixture(scope="module")
def tenancy(pg_dsn, run_dir, work_dir):
    config = work_dir / "history-auth.yaml"
    config.write_text(CONFIG)
    sock = run_dir / "history-auth.sock"
    with running_sidecar(str(sock), config_path=str(config),
                         log_path=str(work_dir / "log" / "history-auth-sidecar.log")):
        with psycopg.connect(pg_dsn, autocommit=True) as c:
            c.execute(f"CREATE SERVER llm_hist FOREIGN DATA WRAPPER llmfdw OPTIONS (address 'unix://{sock}')")
            c.execute("CREATE SCHEMA hist")
            c.execute("CREATE FOREIGN TABLE hist.completions (prompt text, completion text) "
                      f"SERVER llm_hist OPTIONS (table 'completions', model '{GEN}')")
            c.execute("CREATE FOREIGN TABLE hist.requests (at timestamptz, tenant text, model text, kind text, "
                      "status text, request_id text) SERVER llm_hist OPTIONS (table 'requests')")
            for role, (tenant, token) in ROLES.items():
                c.execute(f"CREATE ROLE {role} LOGIN")
                c.execute(f"CREATE USER MAPPING FOR {role} SERVER llm_hist "
                          f"OPTIONS (tenant '{tenant}', token '{token}')")
            c.execute("GRANT USAGE ON SCHEMA hist TO hist_alice, hist_bob")
            c.execute("GRANT SELECT ON ALL TABLES IN SCHEMA hist TO hist_alice, hist_bob")
        yield {role: make_conninfo(pg_dsn, user=role) for role in ROLES}
        with psycopg.connect(pg_dsn, autocommit=True) as c:
            c.execute("DROP SCHEMA hist CASCADE")
            c.execute("DROP SERVER llm_hist CASCADE")
            for role in ROLES:
                c.execute(f"DROP ROLE {role}")


def test_each_tenant_sees_only_its_own_requests(tenancy):
    with psycopg.connect(tenancy["hist_alice"], autocommit=True) as c:
        for prompt in ("Say hi.", "Say bye."):
            c.execute("SELECT completion FROM hist.completions WHERE prompt = %s", (prompt,)).fetchone()
    with psycopg.connect(tenancy["hist_bob"], autocommit=True) as c:
        c.execute("SELECT completion FROM hist.completions WHERE prompt = 'Say yes.'").fetchone()
    seen = {}
    for role in ROLES:
        with psycopg.connect(tenancy[role], autocommit=True) as c:
            seen[role] = c.execute("SELECT tenant, kind, status, request_id FROM hist.requests "
                                   "WHERE at > now() - interval '15 minutes'").fetchall()
    alice, bob = seen["hist_alice"], seen["hist_bob"]
    assert {r[0] for r in alice} == {"acme"} and {r[0] for r in bob} == {"globex"}
    assert sum(r[1] == "generate" and r[2] == "OK" for r in alice) == 2
    assert sum(r[1] == "generate" and r[2] == "OK" for r in bob) == 1
    assert not {r[3] for r in alice} & {r[3] for r in bob}


def test_a_wrong_token_reads_no_rows(tenancy, pg_dsn):
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("CREATE ROLE hist_mallory LOGIN")
        c.execute("CREATE USER MAPPING FOR hist_mallory SERVER llm_hist OPTIONS (tenant 'acme', token 'guess')")
        c.execute("GRANT USAGE ON SCHEMA hist TO hist_mallory")
        c.execute("GRANT SELECT ON hist.requests TO hist_mallory")
    try:
        with psycopg.connect(make_conninfo(pg_dsn, user="hist_mallory"), autocommit=True) as c:
            with pytest.raises(psycopg.Error) as exc:
                c.execute("SELECT * FROM hist.requests")
            assert exc.value.sqlstate == "28000"
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as c:
            c.execute("DROP OWNED BY hist_mallory")
            c.execute("DROP ROLE hist_mallory")


# ---- one tenant cannot erase another's history ------------------------------------------------

VICTIM, FLOOD = "llmfdw_hist_victim", "llmfdw_hist_flood"   # databases, and so tenants (auth off)
# Small windows, so a few thousand scans are many times the window; the victim is a configured
# tenant (limits left to the defaults), which a made-up tenant name never pushes out.
WINDOW_CONFIG = EMBED_ONLY + f"""
history: {{max_rows: 50, max_tenants: 4}}
tenants:
  - {{name: {VICTIM}}}
"""
SCANS = 2_000


def victim_rows(pg_server) -> set[tuple]:
    with psycopg.connect(pg_server.dsn(VICTIM), autocommit=True) as c:
        return set(c.execute("SELECT request_id, kind, status FROM llm.requests").fetchall())


@pytest.fixture(scope="module")
def windows(pg_server, run_dir, work_dir):
    """A sidecar with auth off and small windows, two databases pointing at it, and a victim's
    requests recorded: (the socket, the victim's rows)."""
    config = work_dir / "history-window.yaml"
    config.write_text(WINDOW_CONFIG)
    sock = run_dir / "history-window.sock"
    with running_sidecar(str(sock), config_path=str(config),
                         log_path=str(work_dir / "log" / "history-window-sidecar.log")):
        for database in (VICTIM, FLOOD):
            embedded.create_database(pg_server, database)
            embedded.apply_schema(pg_server, database, f"unix://{sock}")
        with psycopg.connect(pg_server.dsn(VICTIM), autocommit=True) as c:
            c.execute(f"REVOKE CONNECT ON DATABASE {VICTIM} FROM PUBLIC")
            for i in range(10):
                c.execute("SELECT llm.embed(%s)", (f"text number {i}",)).fetchone()
        with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as c:
            c.execute("CREATE ROLE hist_dashboard LOGIN IN ROLE llm_dashboard")
        try:
            rows = victim_rows(pg_server)
            assert sum(kind == "embed" for _, kind, _ in rows) == 10
            yield str(sock), rows
        finally:
            with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as c:
                for database in (VICTIM, FLOOD):
                    c.execute(f"DROP DATABASE {database} WITH (FORCE)")
                c.execute("DROP ROLE hist_dashboard")


def test_a_dashboard_role_scanning_models_leaves_another_tenants_rows(windows, pg_server):
    """A role with only llm_dashboard, in its own database, scans llm.models many times the
    window's size: each scan is a ListModels call recorded for its tenant (its database), which
    once emptied the window that all tenants shared."""
    _, before = windows
    with psycopg.connect(make_conninfo(pg_server.dsn(FLOOD), user="hist_dashboard"), autocommit=True) as c:
        for _ in range(SCANS):
            assert c.execute("SELECT count(*) FROM llm.models").fetchone() == (1,)
        own = dict(c.execute("SELECT kind, count(*) FROM llm.requests GROUP BY kind").fetchall())
    assert victim_rows(pg_server) == before
    assert own == {"list_models": METADATA_ROWS}   # its own window is bounded too


def test_made_up_tenant_names_leave_a_configured_tenants_rows(windows, pg_server):
    """With auth off a caller that reaches the socket names any tenant: many names take the
    windows of unconfigured tenants (FLOOD's here), never a configured tenant's."""
    sock, before = windows
    with grpc.insecure_channel(f"unix://{sock}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        flood = pb.RequestContext(tenant=FLOOD)
        stub.ListModels(pb.ListModelsRequest(context=flood))
        assert stub.Requests(pb.RequestsRequest(context=flood)).rows
        for i in range(20):
            stub.ListModels(pb.ListModelsRequest(context=pb.RequestContext(tenant=f"made-up-{i}")))
        assert not stub.Requests(pb.RequestsRequest(context=flood)).rows
        response = stub.Requests(pb.RequestsRequest(context=pb.RequestContext(tenant=VICTIM)))
        assert response.max_rows == 50
    assert victim_rows(pg_server) == before
