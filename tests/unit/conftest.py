"""tests/unit: logic without Postgres, a sidecar or a model (`make test-unit`, seconds).

A test here that asked for one of the suite's server fixtures (conn, pg_server, session_sidecar, ...)
would start a cluster and a model server: it belongs in tests/, so asking fails at once.
"""
from __future__ import annotations

import pytest

SERVER_FIXTURES = {"work_dir", "pg_server", "session_sidecar", "sidecar_socket", "pg_dsn", "conn",
                   "sidecar_metrics_port", "run_dir"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = SERVER_FIXTURES & set(getattr(item, "fixturenames", ()))
        if used and "/tests/unit/" in str(item.path):
            raise pytest.UsageError(f"{item.nodeid} uses {sorted(used)}: a test with Postgres or a "
                                    f"sidecar goes in tests/, not tests/unit/")
