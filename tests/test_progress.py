"""llm.progress and EXPLAIN ANALYZE's counts, through SQL, as a plain llm_user role.

One session runs a long statement (40 prompts, max_tokens 50); a second session of the same
database (tenant) polls llm.progress and sees the first's backend pid with done of total, tokens,
elapsed time and an estimate of the rest while it runs, each count never going back; a session of
another database (another tenant) does not see it.  Unit tests of the sidecar's book and of the
FDW's statement tracking are in tests/unit/test_progress.py.
"""
from __future__ import annotations

import threading
import time

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.rows import namedtuple_row

from deploy import embedded

PROMPTS = [f"Write one sentence about the number {i}." for i in range(40)]
LONG = ("SELECT count(*) FROM llm.completions WHERE prompt = ANY(%s) AND max_tokens = 50 "
        "AND cache = false")   # not from the cache: every prompt is decoded
GROWING = ("done", "requests", "input_tokens", "output_tokens", "elapsed_ms")
OTHER_DB = "progress_other"


@pytest.fixture(scope="module")
def dsns(pg_server, pg_dsn, sidecar_socket):
    embedded.create_database(pg_server, OTHER_DB)
    embedded.apply_schema(pg_server, OTHER_DB, f"unix://{sidecar_socket}")
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        if not c.execute("SELECT 1 FROM pg_roles WHERE rolname = 'progress_user'").fetchone():
            c.execute("CREATE ROLE progress_user LOGIN IN ROLE llm_user")
    return {"same": make_conninfo(pg_dsn, user="progress_user"),
            "other": make_conninfo(pg_server.dsn(OTHER_DB), user="progress_user")}


def _connect(dsn: str) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True, row_factory=namedtuple_row)


def _progress(conn, pid: int):
    return conn.execute("SELECT * FROM llm.progress WHERE pid = %s", (pid,)).fetchone()


def test_a_second_session_sees_a_long_statement_progress(dsns):
    with _connect(dsns["same"]) as runner, _connect(dsns["same"]) as watcher, _connect(dsns["other"]) as stranger:
        assert runner.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0] is False
        pid = runner.execute("SELECT pg_backend_pid() AS pid").fetchone().pid
        assert _progress(watcher, pid) is None and _progress(stranger, pid) is None   # warm: Python, channel
        result: dict[str, object] = {}

        def run() -> None:
            try:
                result["count"] = runner.execute(LONG, (PROMPTS,)).fetchone()[0]
            except Exception as err:   # reported below
                result["error"] = err

        seen, strangers_saw = [], []
        thread = threading.Thread(target=run)
        started = time.monotonic()
        thread.start()
        while thread.is_alive():
            row = _progress(watcher, pid)
            if row is not None:
                seen.append((time.monotonic() - started, row))
                if len(seen) == 3:
                    strangers_saw.append(_progress(stranger, pid))
            time.sleep(0.05)
        thread.join()
        after = _progress(watcher, pid)

    assert "error" not in result and result["count"] == len(PROMPTS)
    assert seen, "llm.progress never showed the running statement"
    latency, first = seen[0]
    print(f"first seen {latency:.2f} s after the statement started (done {first.done} of {first.total})")
    assert first.total == len(PROMPTS) and first.done < first.total, "seen early, with its total"
    assert first.state == "running" and first.role == "progress_user"
    assert len({row.statement for _, row in seen} | {after.statement}) == 1
    for (_, a), (_, b) in zip(seen, seen[1:]):
        for column in GROWING:
            assert getattr(b, column) >= getattr(a, column), (column, a, b)
    assert any(row.output_tokens > 0 and row.done < row.total for _, row in seen), "tokens show while it runs"
    assert any(row.remaining_ms is not None for _, row in seen if 0 < row.done < row.total)
    assert (after.done, after.total, after.requests, after.state) == (40, 40, 40, "idle")
    assert strangers_saw == [None], "another tenant never sees it"


def test_explain_analyze_shows_what_the_scan_got(dsns):
    sql = ("SELECT completion FROM llm.completions WHERE prompt = ANY(ARRAY['Say yes.', 'Say no.']) "
           "AND max_tokens = 4 AND cache = false")
    with _connect(dsns["same"]) as conn:
        plain = "\n".join(r[0] for r in conn.execute("EXPLAIN (COSTS OFF) " + sql))
        analyzed = "\n".join(r[0] for r in conn.execute("EXPLAIN (ANALYZE, COSTS OFF) " + sql))
        again = "\n".join(r[0] for r in conn.execute("EXPLAIN (COSTS OFF) " + sql))
    assert "sidecar answers" not in plain and "sidecar answers" not in again
    assert "LLM: sidecar answers: 2 rows, tokens: " in analyzed and "model time: " in analyzed, analyzed
