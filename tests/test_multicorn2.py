"""llmfdw's FDW classes under the real Multicorn2 (3.2, the vendored tarball), unchanged.

The design names Multicorn2 as the API the FDW classes are written against; llmfdw runs them in
its own C host (fdw/src).  This test runs the installed classes (wrapper
`llm_tables.tables.SidecarTables`) through the real Multicorn2 extension built by
deploy/multicorn2.py (`make multicorn2`), against the session's sidecar, and compares with what
our host returns for the same queries.  The same results: the models, a greedy completion, one at
temperature = 0, the embeddings (same vectors).  The differences between the hosts:

  - values: our host passes Python numbers and booleans in quals and takes pgvector's binary
    form; Multicorn2 hands float8/int8/int4/bool qual values over as text and passes every result
    through the type's text input.  The classes check `_llmfdw_host` and adapt (tables.py);
  - errors: the same message and hint, but Multicorn2 ignores LlmError's SQLSTATE (XX000);
  - cancel: our host checks for interrupts while it waits and cancels the gRPC call (the query
    stops at once, the sidecar stops decoding).  Under Multicorn2 the classes never check:
    its check_interrupts() longjmps out through the live Python frames (the gRPC call was never
    cancelled and the backend's next statement crashed), so a pg_cancel_backend takes effect
    only when the call ends, at the latest at its deadline: the server's `timeout` option.

The name collision: the venv's site-packages holds *our* `multicorn` (fdw/multicorn).  Multicorn2
imports `multicorn` with whatever sys.path the interpreter starts with (it never sets sys.path),
so a second cluster (same embedded Postgres binaries, same sidecar) is started with
PYTHONPATH=<venv>/multicorn2/python:<venv site-packages>: the real package first, then the venv for
grpc and llmfdw.  Our host starts its interpreter isolated (PYTHONPATH ignored, sys.path from
llmfdw.python_path), so the last test checks that llmfdw still works in that cluster.
"""
from __future__ import annotations

import os
import time

import psycopg
import pytest

from backend_cancel import (CANCEL_WITHIN_S, assert_generation_stops, cancel_from_another_session,
                            generation_tokens, wait_until_decoding)
from deploy import embedded, multicorn2
from vectors import assert_same_embeddings

MC2_DB, SCHEMA, SERVER = "llmfdw_mc2", "mc2", "mc2_sidecar"
WRAPPER = "llm_tables.tables.SidecarTables"
MC2_TIMEOUT = 3  # the Multicorn2 server's `timeout` option (s): how long a cancelled call runs on
FRANCE = "What is the capital of France?"
LONG = "Write a very long story about a dragon and a knight."  # seconds of decoding at 1500 tokens
LONG_SQL = "SELECT completion FROM {}.completions WHERE prompt = %s AND max_tokens = 1500"
INPUTS = ["a small cat", "a tax form", "a puppy"]  # = ANY(...): one Embed request for the array


def _not_built() -> str | None:
    """Why the real Multicorn2 is not usable here, or None."""
    pgc, tarball = multicorn2.default_pg_config(), multicorn2.find_tarball(None)
    if not pgc.exists():
        return f"{pgc} is missing"
    if tarball is None:
        return f"{multicorn2.TARBALL_NAME} not found: Multicorn2 is not built here"
    gone = multicorn2.missing(pgc, tarball)
    return f"Multicorn2 is not built (missing: {', '.join(gone)}); run `make multicorn2`" if gone else None


pytestmark = pytest.mark.skipif(_not_built() is not None, reason=str(_not_built()))


@pytest.fixture(scope="module")
def mc2_server(work_dir, run_dir, pg_server):
    """A second cluster whose backends find the real `multicorn` first (PYTHONPATH)."""
    pgdata = work_dir / "mc2-pgdata"
    embedded.init_cluster(pgdata)
    embedded.configure(pgdata, port=embedded.free_port(), socket_dir=run_dir,
                       python_path=[embedded.site_packages()])
    with (pgdata / "llmfdw.conf").open("a") as conf:
        # Multicorn2's backends must start their own interpreter, with PYTHONPATH's multicorn
        # first; a preloaded one would have llmfdw's (multicorn.get_class says so)
        conf.write("llmfdw.preload_python = off\n")
    python_path = [multicorn2.python_dir(), embedded.site_packages()]
    for directory in python_path:
        embedded.check_server_can_reach(directory)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
    env["PYTHONPATH"] = ":".join(map(str, python_path))
    embedded._run([embedded.pg_bin("pg_ctl"), "-D", pgdata, "-l", work_dir / "log" / "postgres-mc2.log",
                   "-w", "-t", "60", "start"],
                  what="pg_ctl start (Multicorn2 cluster)", cwd=pgdata, env=env, **embedded._as_server_user())
    server = embedded.running_server(pgdata)
    assert server is not None, "the Multicorn2 cluster did not start: see postgres-mc2.log"
    yield server
    embedded.stop_cluster(pgdata)


@pytest.fixture(scope="module")
def mc2_dsn(mc2_server, pg_dsn, sidecar_socket):
    """Database llmfdw_mc2: server mc2_sidecar (Multicorn2, our wrapper) and schema mc2 with
    our llm.completions/embeddings/models, same columns and table options."""
    embedded.create_database(mc2_server, MC2_DB)
    dsn = mc2_server.dsn(MC2_DB)
    with psycopg.connect(pg_dsn, autocommit=True) as host, psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS vector")
        c.execute("CREATE EXTENSION IF NOT EXISTS multicorn")
        c.execute(psycopg.sql.SQL("CREATE SERVER {} FOREIGN DATA WRAPPER multicorn OPTIONS "
                                  "(wrapper {}, address {}, timeout {})").format(
            psycopg.sql.Identifier(SERVER), psycopg.sql.Literal(WRAPPER),
            psycopg.sql.Literal(f"unix://{sidecar_socket}"), psycopg.sql.Literal(str(MC2_TIMEOUT))))
        c.execute(f"CREATE SCHEMA {SCHEMA}")
        for table in ("completions", "embeddings", "models"):
            cols = host.execute(
                "SELECT quote_ident(attname) || ' ' || format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                (f"llm.{table}",)).fetchall()
            (options,) = host.execute("SELECT ftoptions FROM pg_foreign_table WHERE ftrelid = %s::regclass",
                                      (f"llm.{table}",)).fetchone()
            opts = ", ".join(f"{k} '{v}'" for k, v in (o.split("=", 1) for o in options))
            c.execute(f"CREATE FOREIGN TABLE {SCHEMA}.{table} ({', '.join(col for (col,) in cols)}) "
                      f"SERVER {SERVER} OPTIONS ({opts})")
    return dsn


@pytest.fixture
def mc2(mc2_dsn):
    from pgvector.psycopg import register_vector

    with psycopg.connect(mc2_dsn, autocommit=True) as connection:
        register_vector(connection)
        yield connection


def test_backend_runs_the_real_multicorn2(mc2):
    """What serves schema mc2 is Multicorn2's extension and library, not llmfdw's."""
    (version,) = mc2.execute("SELECT extversion FROM pg_extension WHERE extname = 'multicorn'").fetchone()
    (probin,) = mc2.execute("SELECT p.probin FROM pg_foreign_data_wrapper w JOIN pg_proc p ON p.oid = w.fdwhandler "
                            "WHERE w.fdwname = 'multicorn'").fetchone()
    assert (version, probin) == (multicorn2.VERSION, "$libdir/multicorn")
    assert mc2.execute("SELECT count(*) FROM pg_extension WHERE extname = 'llmfdw'").fetchone() == (0,)


def test_models_lists_both(mc2, conn):
    sql = "SELECT name, task, engine, dimensions, state FROM {}.models ORDER BY name"
    rows = mc2.execute(sql.format(SCHEMA)).fetchall()
    assert rows == conn.execute(sql.format("llm")).fetchall()
    assert {name for name, *_ in rows} >= {"smollm2-135m-instruct", "all-minilm-l6-v2"}


@pytest.mark.parametrize("extra", ["", " AND temperature = 0 AND max_tokens = 24"],
                         ids=["greedy", "temperature_0"])
def test_completion_matches_host(mc2, conn, extra):
    """temperature = 0 (float8) and max_tokens (int4) arrive from Multicorn2 as text."""
    sql = "SELECT completion, finish_reason, output_tokens FROM {}.completions WHERE prompt = %s" + extra
    rows = mc2.execute(sql.format(SCHEMA), (FRANCE,)).fetchall()
    assert rows == conn.execute(sql.format("llm"), (FRANCE,)).fetchall()
    assert rows and rows[0][0]


def test_embeddings_equal_host(mc2, conn):
    """The same vectors, though Multicorn2 gets them as text and our host as binary (two runs of
    the model: by cosine, tests/vectors.py; the text form itself is exact, see tables._vector)."""
    sql = "SELECT input, dimensions, input_tokens, embedding FROM {}.embeddings WHERE input = ANY(%s) ORDER BY input"
    rows = mc2.execute(sql.format(SCHEMA), (INPUTS,)).fetchall()
    host = conn.execute(sql.format("llm"), (INPUTS,)).fetchall()
    assert [r[:3] for r in rows] == [r[:3] for r in host] and len(rows) == len(INPUTS)
    assert_same_embeddings([r[-1] for r in rows], [r[-1] for r in host])


def test_missing_prompt_is_a_clean_error(mc2, conn):
    """Message and hint as our host's, no traceback; Multicorn2 reports every error as XX000."""
    with pytest.raises(psycopg.Error) as host:
        conn.execute("SELECT completion FROM llm.completions")
    with pytest.raises(psycopg.Error) as mine:
        mc2.execute(f"SELECT completion FROM {SCHEMA}.completions")
    err, host = mine.value, host.value
    print(f"\nmissing prompt: Multicorn2 {err.sqlstate}, our host {host.sqlstate}: {err.diag.message_primary}")
    assert (err.diag.message_primary, err.diag.message_hint) == (host.diag.message_primary, host.diag.message_hint)
    assert err.sqlstate == "XX000" and host.sqlstate == "22023"
    assert "Traceback" not in (err.diag.message_detail or "")
    assert mc2.execute("SELECT 1").fetchone() == (1,)


def _cancel_while_decoding(c: psycopg.Connection, dsn: str, schema: str, port: int) -> tuple:
    """pg_cancel_backend of a long generation once the engine decodes: (error, seconds from
    the query's start to the cancel, seconds from the cancel to the error)."""
    start, tokens = time.monotonic(), generation_tokens(port)
    err, latency = cancel_from_another_session(c, dsn, LONG_SQL.format(schema), (LONG,),
                                               when=lambda: wait_until_decoding(port, tokens))
    return err, time.monotonic() - latency - start, latency


def test_cancel_under_our_host_stops_the_call(conn, pg_dsn, sidecar_metrics_port):
    """Our host: the query stops at once (backend_cancel.CANCEL_WITHIN_S) and the gRPC call is cancelled."""
    err, sent, latency = _cancel_while_decoding(conn, pg_dsn, "llm", sidecar_metrics_port)
    print(f"\ncancel, our host: the query ended {latency * 1000:.0f} ms after pg_cancel_backend: "
          f"{err and err.sqlstate} {err and err.diag.message_primary}")
    assert isinstance(err, psycopg.errors.QueryCanceled)
    assert latency < CANCEL_WITHIN_S
    assert_generation_stops(sidecar_metrics_port)
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_cancel_under_multicorn2_waits_for_the_deadline(mc2, mc2_dsn, mc2_server, sidecar_metrics_port):
    """Multicorn2: the cancel does not cut the call short; the query ends when the call reaches
    its deadline (timeout 3 s), and the session (same backend) goes on: no crash."""
    log_file = mc2_server.pgdata.parent / "log" / "postgres-mc2.log"
    log_size = log_file.stat().st_size
    (pid,) = mc2.execute("SELECT pg_backend_pid()").fetchone()
    # warm up (imports, the channel): the timing below is then the call's own
    mc2.execute(f"SELECT completion FROM {SCHEMA}.completions WHERE prompt = %s AND max_tokens = 1", (FRANCE,))
    err, sent, latency = _cancel_while_decoding(mc2, mc2_dsn, SCHEMA, sidecar_metrics_port)
    total = sent + latency
    print(f"\ncancel, Multicorn2: sent {sent:.2f} s into the query, the query ended {latency:.2f} s later "
          f"(total {total:.2f} s, deadline {MC2_TIMEOUT} s, remaining at the cancel {MC2_TIMEOUT - sent:.2f} s): "
          f"{err and err.sqlstate} {err and err.diag.message_primary}")
    assert err is not None, "the query was neither cancelled nor stopped at its deadline"
    assert total > MC2_TIMEOUT - 0.25, "the cancel interrupted the call before its deadline"
    assert latency < MC2_TIMEOUT + 1
    assert_generation_stops(sidecar_metrics_port)
    assert mc2.execute("SELECT pg_backend_pid()").fetchone() == (pid,)
    assert mc2.execute("SELECT 1").fetchone() == (1,)
    assert mc2.execute(f"SELECT count(*) FROM {SCHEMA}.models").fetchone()[0] >= 2
    crashes = [line for line in log_file.read_text(errors="replace")[log_size:].splitlines()
               if "terminated by signal" in line]
    assert not crashes, crashes


def test_our_host_unaffected_in_the_multicorn2_cluster(mc2_server, sidecar_socket, conn):
    """The Multicorn2 cluster's PYTHONPATH puts the real `multicorn` first; our host ignores it
    (isolated interpreter, sys.path from llmfdw.python_path), so llmfdw works there unchanged,
    in another database (a backend should load only one of the two extensions)."""
    embedded.create_database(mc2_server, "llmfdw_host")
    mc2_server.psql("llmfdw_host", "-q", "-c", "CREATE EXTENSION IF NOT EXISTS vector")
    embedded.apply_schema(mc2_server, "llmfdw_host", f"unix://{sidecar_socket}")
    sql = "SELECT completion FROM llm.completions WHERE prompt = %s AND temperature = 0"
    with psycopg.connect(mc2_server.dsn("llmfdw_host"), autocommit=True) as c:
        rows = c.execute("SELECT name, task FROM llm.models ORDER BY name").fetchall()
        answer = c.execute(sql, (FRANCE,)).fetchone()
    assert rows == conn.execute("SELECT name, task FROM llm.models ORDER BY name").fetchall()
    assert answer == conn.execute(sql, (FRANCE,)).fetchone()
