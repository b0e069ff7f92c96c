"""Cancel a running query from another session, as a user's Ctrl-C or pg_cancel_backend does."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import psycopg

from sidecar_process import sample, scrape

GEN_MODEL = "smollm2-135m-instruct"
# How long a cancel (or statement_timeout) may take to end the query, and how long the engine may
# go on decoding after it, in a test.  Generous, so that it holds on a loaded 2-core machine
# (load average 4): the generations cancelled here would run for tens of seconds, so a cancel that
# does not reach the sidecar still fails.  The latency itself is a benchmark's figure (bench/).
CANCEL_WITHIN_S = 2.0


def cancel_from_another_session(conn: psycopg.Connection, dsn: str, sql: str, params: Any = None,
                                when: Callable[[], None] = lambda: time.sleep(0.5)
                                ) -> tuple[BaseException | None, float]:
    """Run `sql` on `conn` in a thread; once `when()` returns, pg_cancel_backend it from a
    second connection.  Returns the error the query ended with (None if it finished) and the
    seconds from sending the cancel to that error."""
    pid = conn.info.backend_pid
    result: dict = {}

    def run() -> None:
        try:
            conn.execute(sql, params)
        except psycopg.Error as err:
            result["error"], result["at"] = err, time.monotonic()

    t = threading.Thread(target=run)
    t.start()
    when()
    with psycopg.connect(dsn, autocommit=True) as other:
        sent = time.monotonic()
        other.execute("SELECT pg_cancel_backend(%s)", (pid,))
    t.join(10)
    return result.get("error"), result.get("at", float("inf")) - sent


def generation_tokens(port: int) -> float:
    """Tokens the session sidecar's generation model has decoded so far (its metrics)."""
    return sample(scrape(port), "llmfdw_engine_tokens_total", model=GEN_MODEL)


def wait_until_decoding(port: int, start: float, tokens: int = 3, timeout: float = 30) -> None:
    """Wait until the engine decoded `tokens` more than `start` (a generation is under way)."""
    deadline = time.monotonic() + timeout
    while generation_tokens(port) < start + tokens:
        assert time.monotonic() < deadline, "generation never started"
        time.sleep(0.02)


def assert_generation_stops(port: int) -> None:
    """After a cancel the engine stops decoding within CANCEL_WITHIN_S, and nothing is left in
    flight: no token over the next half second."""
    time.sleep(CANCEL_WITHIN_S)
    stopped_at = generation_tokens(port)
    time.sleep(0.5)
    assert generation_tokens(port) == stopped_at, "the sidecar kept generating"
    assert sample(scrape(port), "llmfdw_requests_in_flight", rpc="Generate") == 0
