"""Plain roles for tests that must not run as the superuser (security is tested as a user would be)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg.conninfo import make_conninfo


@contextmanager
def llm_user_role(dsn: str, name: str) -> Iterator[str]:
    """A login role granted llm_user only (what an application's role gets), in the cluster of
    `dsn`; yields its conninfo, and drops the role and what it owns at the end."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f"CREATE ROLE {name} LOGIN")
        c.execute(f"GRANT llm_user TO {name}")
    try:
        yield make_conninfo(dsn, user=name)
    finally:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(f"DROP OWNED BY {name}")
            c.execute(f"DROP ROLE {name}")
