"""A backend waiting on the sidecar sleeps in Postgres's own wait instead of polling.

Inside the llmfdw host the client waits with _llmfdw_host.wait_readable (WaitLatchOrSocket on an
eventfd its gRPC threads signal): a message or a signal wakes it.  It used to wake every 5 ms to
ask whether to stop: 200 wake-ups a second per waiting backend, CPU that 16-64 one-row clients
took from the engines on a small machine.  Counted here: the backend's main thread's voluntary
context switches while its query waits for a long completion (each streamed token still wakes
it), and a cancel in that wait still ends the query at once with Postgres's own error.
Runs as a plain role (a member of llm_user).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest

from roles import llm_user_role

ROLE = "wait_walt"
LONG = ("SELECT completion FROM llm.completions WHERE prompt = 'Write a very long story about a lighthouse.' "
        "AND max_tokens = 1500")


@pytest.fixture(scope="module")
def walt(pg_dsn):
    with llm_user_role(pg_dsn, ROLE) as conninfo:
        yield conninfo


def wakeups(pid: int) -> int:
    status = Path(f"/proc/{pid}/task/{pid}/status").read_text()
    return int(next(l for l in status.splitlines() if l.startswith("voluntary_ctxt_switches")).split()[1])


def test_a_waiting_backend_wakes_for_messages_and_signals_not_a_timer(walt, pg_dsn):
    with psycopg.connect(walt, autocommit=True) as victim, psycopg.connect(pg_dsn, autocommit=True) as admin:
        pid = victim.info.backend_pid
        victim.execute("SELECT 1 FROM llm.models LIMIT 1")
        outcome: dict[str, object] = {}

        def run() -> None:
            try:
                victim.execute(LONG)
                outcome["finished"] = True
            except psycopg.errors.QueryCanceled as err:
                outcome["canceled"] = err

        thread = threading.Thread(target=run)
        thread.start()
        time.sleep(1.0)                       # generating by now
        before, started = wakeups(pid), time.monotonic()
        time.sleep(2.0)
        rate = (wakeups(pid) - before) / (time.monotonic() - started)
        admin.execute("SELECT pg_cancel_backend(%s)", (pid,))
        thread.join(30)
    assert "canceled" in outcome, outcome      # the wait let the cancel through
    # polling alone woke it 200 times a second; a token of SmolLM2 on 2 CPUs comes every 20-100 ms
    assert rate < 120, rate
