"""Start a real sidecar process for tests, wait until it serves, read its metrics."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def wait_serving(address: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll grpc.health.v1 until SERVING; fail early if the process died."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {proc.returncode} before serving")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"sidecar at {address} not SERVING after {timeout:.0f} s")


@contextlib.contextmanager
def running_sidecar(socket_path: str, config_path: str | None = None, timeout: float = 120,
                    log_path: str | None = None, metrics_port: int = 0,
                    python: str | None = None) -> Iterator[subprocess.Popen]:
    args = [python or sys.executable, "-m", "llmfdw.sidecar.server", "--listen", f"unix://{socket_path}",
            "--metrics-port", str(metrics_port)]
    if config_path:
        args += ["--config", config_path]
    log = open(log_path or os.devnull, "ab")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_serving(f"unix://{socket_path}", timeout, proc)
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
