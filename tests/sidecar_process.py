"""Start a real sidecar process for tests, wait until it serves, read its metrics."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from deploy import embedded


@contextlib.contextmanager
def running_sidecar(socket_path: str, config_path: str | None = None, timeout: float = 120,
                    log_path: str | None = None, metrics_port: int = 0,
                    python: str | None = None) -> Iterator[subprocess.Popen]:
    args = [python or sys.executable, "-m", "llmfdw.sidecar.server", "--listen", f"unix://{socket_path}",
            "--metrics-port", str(metrics_port)]
    if config_path:
        args += ["--config", config_path]
    log = open(log_path or os.devnull, "ab")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=embedded.sidecar_env())
    try:
        embedded.wait_serving(f"unix://{socket_path}", timeout, alive=lambda: proc.poll() is None,
                              log_file=Path(log_path) if log_path else None)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        Path(socket_path).unlink(missing_ok=True)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The sidecar's Prometheus samples: {(name, sorted labels): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called name whose labels include the given ones."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def long_generation_underway(stub, model: str, deltas: int = 3):
    """A Generate call of up to 1000 tokens that has streamed `deltas` messages: decoding, to cancel."""
    from llmfdw.v1 import llmfdw_pb2 as pb

    call = stub.Generate(pb.GenerateRequest(
        model=model, prompt="Write a very long story about a dragon and a knight.",
        params=pb.GenerationParams(max_tokens=1000)))
    for _ in range(deltas):
        next(call)
    return call
