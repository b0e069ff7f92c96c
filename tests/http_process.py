"""A helper process that serves HTTP (Prometheus, its postgres_exporter), started for a test."""
from __future__ import annotations

import contextlib
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def serving(cmd: list[str], ready_url: str, log_path: Path, env: dict[str, str] | None = None,
            timeout: float = 60) -> Iterator[subprocess.Popen]:
    """Run cmd (its output to log_path) until ready_url answers; yield the process; stop it at
    the end (SIGTERM, then SIGKILL after 20 s).  A process that exits or never answers fails the
    test with its log."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                assert proc.poll() is None, log_path.read_text()
                try:
                    urllib.request.urlopen(ready_url, timeout=10).close()
                    break
                except OSError:   # not listening yet, or not ready (an HTTP error status)
                    assert time.monotonic() < deadline, f"{cmd[0]} did not get ready: {log_path.read_text()}"
                    time.sleep(0.2)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
