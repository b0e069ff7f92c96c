"""Prometheus's postgres_exporter with the project's vectorizer queries, for tests.

Debian's prometheus-postgres-exporter (0.11.1; `make postgres-exporter` installs it) runs with
dashboards/postgres_exporter_queries.yaml, logs in over TCP with a password as the role it is
given (a monitoring role, never the superuser) and serves /metrics on a free port of 127.0.0.1.  Its bgwriter collector (0.11) fails on PostgreSQL 17
and later, so it is off.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Iterator

from prometheus_client.parser import text_string_to_metric_families

from http_process import serving  # tests/http_process.py

EXPORTER = shutil.which("prometheus-postgres-exporter") or "/usr/bin/prometheus-postgres-exporter"
QUERIES = Path(__file__).resolve().parents[1] / "dashboards" / "postgres_exporter_queries.yaml"


@contextlib.contextmanager
def running(dsn: str, databases: list[str], port: int, log_path: Path) -> Iterator[str]:
    """An exporter serving `databases` of the cluster `dsn` points at; yields its metrics URL."""
    if not os.access(EXPORTER, os.X_OK):
        raise RuntimeError("prometheus-postgres-exporter is not installed: run `make postgres-exporter` "
                           "(apt-get install prometheus-postgres-exporter)")
    env = {"PATH": os.environ.get("PATH", "/usr/bin"), "DATA_SOURCE_NAME": dsn}
    url = f"http://127.0.0.1:{port}/metrics"
    with serving([EXPORTER, f"--extend.query-path={QUERIES}", "--auto-discover-databases",
                  f"--include-databases={','.join(databases)}", "--no-collector.bgwriter",
                  f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], url, log_path, env):
        yield url


def samples(url: str, name: str) -> dict[tuple[str, str], float]:
    """One scrape: the value of metric `name` per (datname, vectorizer)."""
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[(sample.labels["datname"], sample.labels["vectorizer"])] = sample.value
    return out
