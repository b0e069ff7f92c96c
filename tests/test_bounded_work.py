"""A generation query's work is bounded by what its consumer takes.

- Memory: prompt = ANY(100,000 prompts) builds each request as the client's window reaches it and
  keeps state only for the calls in flight (fdw/llm_tables/client.py, tables.CompletionsTable), so
  the backend grows by the prompt strings, not by a request and a list per prompt.
- An idle cursor: between FETCHes the FDW's generator is suspended; the client's watchdog cancels
  the calls whose row was not returned yet, so the engine's slots go to other sessions, and sends
  them again when the cursor reads on: every row comes back once, with its own prompt.
Everything runs as a plain role (a member of llm_user).
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from deploy import embedded
from roles import llm_user_role
from sidecar_process import sample, scrape

GEN_MODEL = "smollm2-135m-instruct"
ROLE = "bounded_alice"


@pytest.fixture(scope="module")
def alice(pg_dsn):
    """The conninfo of a plain role that may query the llm tables."""
    with llm_user_role(pg_dsn, ROLE) as conninfo:
        yield conninfo


def _peak_kib(pid: int) -> int:
    """The backend's peak resident memory (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_memory_of_a_query_over_many_prompts_does_not_grow_per_prompt(alice):
    """100,000 prompts, stopped by statement_timeout: before, the backend built a GenerateRequest
    and a list per prompt up front (~2 KB each, ~200 MB here); now the peak grows by the prompt
    strings and the qual list (tens of bytes each)."""
    with psycopg.connect(alice, autocommit=True) as c:
        pid = c.info.backend_pid
        c.execute("SELECT completion FROM llm.completions WHERE prompt = 'Say hi.' AND max_tokens = 1").fetchall()
        before = _peak_kib(pid)
        c.execute("SET statement_timeout = '6s'")
        with pytest.raises(psycopg.errors.QueryCanceled):
            c.execute("SELECT count(*) FROM llm.completions WHERE max_tokens = 1 AND prompt = "
                      "ANY(ARRAY(SELECT 'p' || g FROM generate_series(1, 100000) g))")
        grown = _peak_kib(pid) - before
    print(f"VmHWM grew by {grown / 1024:.1f} MiB for 100,000 prompts")
    assert grown < 60 * 1024, f"the backend grew by {grown / 1024:.0f} MiB"


def _generate_counts(port: int) -> tuple[float, float]:
    """(Generate calls in flight, Generate calls ended CANCELLED) on the session sidecar."""
    samples = scrape(port)
    return (sample(samples, "llmfdw_requests_in_flight", rpc="Generate"),
            sample(samples, "llmfdw_requests_total", rpc="Generate", status="CANCELLED"))


def _wait_idle(port: int, timeout: float = 30) -> None:
    """Wait until no Generate call is in flight; fail after `timeout` (generous: the calls the
    cursor left open would run for minutes)."""
    deadline = time.monotonic() + timeout
    while _generate_counts(port)[0] > 0:
        assert time.monotonic() < deadline, "the idle cursor's calls kept running"
        time.sleep(0.1)


def test_idle_cursor_gives_its_calls_back(alice, sidecar_metrics_port):
    """One short prompt among long ones: FETCH 1 returns the first to finish; while the cursor
    idles the others are cancelled (they would decode up to 500 tokens each) and the engine stops."""
    long_ones = [f"Write a very long story about dragon number {i}." for i in range(15)]
    with psycopg.connect(alice) as c:
        _wait_idle(sidecar_metrics_port)
        cancelled_before = _generate_counts(sidecar_metrics_port)[1]
        c.execute("DECLARE k CURSOR FOR SELECT prompt FROM llm.completions "
                  "WHERE prompt = ANY(%s) AND max_tokens = 500", (["Say hi."] + long_ones,))
        (first,), = c.execute("FETCH 1 FROM k").fetchall()   # usually "Say hi.", the quickest
        assert first in ["Say hi."] + long_ones
        _wait_idle(sidecar_metrics_port)
        tokens = sample(scrape(sidecar_metrics_port), "llmfdw_engine_tokens_total", model=GEN_MODEL)
        time.sleep(0.5)
        assert sample(scrape(sidecar_metrics_port), "llmfdw_engine_tokens_total", model=GEN_MODEL) == tokens
        assert _generate_counts(sidecar_metrics_port)[1] > cancelled_before
        c.execute("CLOSE k")
        c.rollback()


@pytest.mark.parametrize("batch_size", [1000, 0], ids=["batched-join", "nested-loop"])
def test_cursor_that_idles_between_fetches_returns_every_row_once(alice, sidecar_metrics_port, batch_size):
    """The join of the issue (generate_series JOIN llm.completions), through the batched join node
    and through a plain nested loop: FETCH 1, idle (the open calls are cancelled), FETCH 2, idle,
    FETCH ALL: each prompt once, each row with its own prompt."""
    with psycopg.connect(alice) as c:
        c.execute(f"SET llmfdw.join_batch_size = {batch_size}")
        plan = "\n".join(r[0] for r in c.execute(
            "EXPLAIN SELECT g FROM generate_series(1, 12) g JOIN llm.completions c "
            "ON c.prompt = 'Count to ' || g AND c.max_tokens = 24").fetchall())
        assert ("LLM Batched Nested Loop" in plan) == (batch_size > 0), plan
        _wait_idle(sidecar_metrics_port)
        cancelled_before = _generate_counts(sidecar_metrics_port)[1]
        c.execute("DECLARE k CURSOR FOR SELECT g, c.prompt, c.output_tokens FROM generate_series(1, 12) g "
                  "JOIN llm.completions c ON c.prompt = 'Count to ' || g AND c.max_tokens = 24")
        rows = c.execute("FETCH 1 FROM k").fetchall()
        time.sleep(1.5)
        rows += c.execute("FETCH 2 FROM k").fetchall()
        time.sleep(1.5)
        rows += c.execute("FETCH ALL FROM k").fetchall()
        c.rollback()
    assert sorted(g for g, _, _ in rows) == list(range(1, 13))
    if batch_size:   # twelve calls were open at the first FETCH: the idle cursor cancelled some
        assert _generate_counts(sidecar_metrics_port)[1] > cancelled_before
    assert all(prompt == f"Count to {g}" and 1 <= out <= 24 for g, prompt, out in rows)


def test_backend_of_a_killed_client_stops_its_query(alice, pg_server, sidecar_metrics_port):
    """client_connection_check_interval (deploy/embedded.py): psql killed during a long
    generation; its backend notices within the interval and ends the query (and its calls)
    instead of decoding until the result would be sent."""
    _wait_idle(sidecar_metrics_port)
    psql = subprocess.Popen([str(embedded.pg_bin("psql")), alice, "-c",
                             "SELECT completion FROM llm.completions WHERE max_tokens = 1500 AND prompt = "
                             "ANY(ARRAY['Write a very long story about a dragon.', 'Write a long poem.'])"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with psycopg.connect(alice, autocommit=True) as c:
            deadline = time.monotonic() + 30
            while not (pid := c.execute("SELECT pid FROM pg_stat_activity WHERE state = 'active' AND "
                                        "query LIKE 'SELECT completion FROM llm.completions%'").fetchone()):
                assert time.monotonic() < deadline, "the query never started"
                time.sleep(0.05)
            start = sample(scrape(sidecar_metrics_port), "llmfdw_engine_tokens_total", model=GEN_MODEL)
            while sample(scrape(sidecar_metrics_port), "llmfdw_engine_tokens_total", model=GEN_MODEL) < start + 3:
                time.sleep(0.05)   # decoding
            psql.kill()
            psql.wait()
            deadline = time.monotonic() + 20   # generous; the query alone would decode for minutes
            while c.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", pid).fetchone():
                assert time.monotonic() < deadline, "the backend of the killed client kept running"
                time.sleep(0.1)
        _wait_idle(sidecar_metrics_port)
    finally:
        psql.kill()
        psql.wait()
