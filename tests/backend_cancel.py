"""Cancel a running query from another session, as a user's Ctrl-C or pg_cancel_backend does."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import psycopg


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
