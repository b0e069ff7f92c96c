"""Several sidecars behind one foreign server: balancing and failover, for real.

Three sidecars on local TCP ports (127.0.0.1 only), each serving the small embedding model and the
generation model; one foreign server whose `address` lists all three.  Eight sessions run mixed
queries for a bounded time while one sidecar is SIGKILLed and, later, another is SIGTERMed
(drains, then exits).  gRPC's round_robin spreads the calls (fdw/llm_tables/client.py), and its retry
policy sends every call that got no answer yet to another sidecar, so:

  - no embedding query fails;
  - the only generations that fail are those the killed sidecar had already started streaming
    (a retry after the first token would repeat text, so gRPC never retries those).

How the second figure is measured: the killed sidecar's own metrics, scraped immediately before
the SIGKILL: generations that have sent their first token (llmfdw_time_to_first_token_seconds
count) minus generations that have finished (llmfdw_requests_total, rpc=Generate).  The kill
waits (up to 3 s) for a scrape that shows at least one, so that the mid-stream case is exercised.
The scrape and the kill are a few milliseconds apart, so a generation can start or finish
streaming in between; the test allows that one-call race (and prints both figures).  The SIGTERMed sidecar
finishes what it runs (--grace) and refuses new calls with UNAVAILABLE, which gRPC retries
elsewhere: no query fails because of it.
"""
from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import psycopg
import pytest

from deploy import embedded
from sidecar_process import minilm, sample, scrape, smollm2

GEN, EMB = "smollm2-135m-instruct", "all-minilm-l6-v2"
CONFIG = "models:\n" + smollm2(max_tokens=12, parallel=4, context_length=1024, threads=1) + minilm(threads=1)
SESSIONS = 8
LOAD_SECONDS = 16.0
KILL_AT = 5.0            # then up to 3 s more, until a generation streams on the sidecar to kill
TERM_AFTER_KILL = 4.0
LOAD_AFTER_TERM = 5.0    # the load runs until LOAD_SECONDS, and at least this long after the SIGTERM
SCHEMA = "failover"


@dataclass
class Sidecar:
    name: str
    port: int
    metrics_port: int
    proc: subprocess.Popen
    home: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Outcome:
    kind: str          # "embed" | "generate"
    started: float
    ended: float
    error: str | None = None
    sqlstate: str | None = None


@dataclass
class Load:
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)


def _start(name: str, config: Path, log_dir: Path) -> Sidecar:
    port, metrics_port = embedded.free_port(), embedded.free_port()
    home = Path(tempfile.mkdtemp(prefix=f"llmfdw-failover-{name}-"))
    argv, kwargs = embedded.sidecar_process_args(
        f"127.0.0.1:{port}", home=home, config=config,
        extra=("--metrics-port", str(metrics_port), "--grace", "5"))
    log = open(log_dir / f"failover-{name}.log", "ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=home, **kwargs)
    log.close()
    return Sidecar(name, port, metrics_port, proc, home)


def _streaming_generations(samples: dict) -> int:
    """Generations that have sent their first token and not finished, from one scrape."""
    first_tokens = sample(samples, "llmfdw_time_to_first_token_seconds_count")
    finished = sample(samples, "llmfdw_requests_total", rpc="Generate")
    return int(first_tokens - finished)


def _session(pg_dsn: str, n: int, load: Load, t0: float) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        i = 0
        while not load.stop.is_set():
            kind = "embed" if i % 2 == 0 else "generate"
            started = time.monotonic() - t0
            try:
                if kind == "embed":
                    row = conn.execute(f"SELECT vector_dims(embedding) FROM {SCHEMA}.embeddings "
                                       f"WHERE input = %s", (f"session {n} text {i} about cats",)).fetchone()
                    assert row == (384,)
                else:
                    row = conn.execute(f"SELECT completion FROM {SCHEMA}.completions WHERE prompt = %s",
                                       (f"Count from {i} to {i + 20}.",)).fetchone()
                    assert row is not None and row[0]
                load.add(Outcome(kind, started, time.monotonic() - t0))
            except psycopg.Error as err:
                load.add(Outcome(kind, started, time.monotonic() - t0, str(err).splitlines()[0], err.sqlstate))
            i += 1


def test_three_sidecars_one_killed_one_terminated(pg_dsn, work_dir):
    config = work_dir / "failover.yaml"
    config.write_text(CONFIG)
    config.chmod(0o644)
    log_dir = work_dir / "log"
    log_dir.mkdir(exist_ok=True)
    sidecars = [_start(name, config, log_dir) for name in ("a", "b", "c")]
    killed, terminated, survivor = sidecars
    address = ",".join(s.address for s in sidecars)
    started = time.monotonic()
    try:
        for s in sidecars:
            embedded.wait_serving(s.address, 120, alive=lambda s=s: s.proc.poll() is None,
                                  log_file=log_dir / f"failover-{s.name}.log")
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
            conn.execute(f"DROP SERVER IF EXISTS {SCHEMA} CASCADE")
            conn.execute(f"CREATE SERVER {SCHEMA} FOREIGN DATA WRAPPER llmfdw OPTIONS (address '{address}')")
            conn.execute(f"CREATE SCHEMA {SCHEMA}")
            conn.execute(f"IMPORT FOREIGN SCHEMA llm FROM SERVER {SCHEMA} INTO {SCHEMA}")

        serving = time.monotonic() - started
        load = Load()
        t0 = time.monotonic()
        threads = [threading.Thread(target=_session, args=(pg_dsn, n, load, t0), daemon=True)
                   for n in range(SESSIONS)]
        for t in threads:
            t.start()

        time.sleep(KILL_AT)
        before = {s.name: scrape(s.metrics_port) for s in sidecars}
        # Kill while at least one generation streams there (so the test sees that case), waiting
        # up to 3 s for one; the last look at its metrics, then at once the kill.
        deadline = time.monotonic() + 3
        while True:
            streaming = _streaming_generations(scrape(killed.metrics_port))
            if streaming or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        killed.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic() - t0

        time.sleep(TERM_AFTER_KILL)
        terminated.proc.send_signal(signal.SIGTERM)
        termed_at = time.monotonic() - t0
        drained = {}
        load_end = max(LOAD_SECONDS, termed_at + LOAD_AFTER_TERM)
        while terminated.proc.poll() is None and time.monotonic() - t0 < load_end:
            try:
                drained = scrape(terminated.metrics_port)
            except OSError:
                pass
            time.sleep(0.2)

        time.sleep(max(0.0, load_end - (time.monotonic() - t0)))
        load.stop.set()
        for t in threads:
            t.join(60)
        try:
            terminated.proc.wait(30)   # --grace 5 s, then the models close
        except subprocess.TimeoutExpired:
            pass
        after = scrape(survivor.metrics_port)

        embeds = [o for o in load.outcomes if o.kind == "embed"]
        gens = [o for o in load.outcomes if o.kind == "generate"]
        failed_embeds = [o for o in embeds if o.error]
        failed_gens = [o for o in gens if o.error]
        served = {name: sample(s, "llmfdw_requests_total") for name, s in before.items()}
        print(f"\n{len(embeds)} embedding queries ({len(failed_embeds)} failed), {len(gens)} generations "
              f"({len(failed_gens)} failed); SIGKILL at {killed_at:.2f} s with {streaming} generation(s) "
              f"streaming there, SIGTERM at {termed_at:.2f} s (exit code {terminated.proc.returncode}); "
              f"requests per sidecar before the kill {served}; refused while draining "
              f"{sample(drained, 'llmfdw_requests_total', status='UNAVAILABLE'):.0f}; survivor served "
              f"{sample(after, 'llmfdw_requests_total'):.0f} in all; the three were SERVING after {serving:.1f} s")
        for o in failed_embeds + failed_gens:
            print(f"  failed {o.kind} {o.started:.2f}-{o.ended:.2f} s [{o.sqlstate}] {o.error}")

        assert all(v > 0 for v in served.values()), f"round_robin did not reach every sidecar: {served}"
        assert terminated.proc.returncode == 0, "the SIGTERMed sidecar did not drain and exit 0"
        assert len(embeds) >= 20 and len(gens) >= 20
        assert not failed_embeds
        # Only generations under way on the killed sidecar fail, at the kill, as "not reachable".
        for o in failed_gens:
            assert o.started <= killed_at <= o.ended + 0.1, o
            assert o.sqlstate == "HV00N", o
        # The scrape is a few ms before the kill: a generation may start or finish streaming in
        # between, hence the one-call tolerance.
        assert abs(len(failed_gens) - streaming) <= 1, (len(failed_gens), streaming)
        # Queries after the kill and the SIGTERM were served (by the sidecars left).
        assert any(o.started > termed_at + 1 and not o.error for o in gens)
        assert any(o.started > termed_at + 1 and not o.error for o in embeds)
    finally:
        for s in sidecars:
            if s.proc.poll() is None:
                s.proc.send_signal(signal.SIGTERM)
        for s in sidecars:
            try:
                s.proc.wait(20)
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait()
            shutil.rmtree(s.home, ignore_errors=True)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
            conn.execute(f"DROP SERVER IF EXISTS {SCHEMA} CASCADE")


@contextlib.contextmanager
def in_process_servers(servicers: list, add: Callable, kind: str, folder: Path) -> Iterator[str]:
    """One gRPC server in this process per servicer (registered with `add`), on Unix sockets or
    127.0.0.1 ports; yields the FDW address that lists them all, and stops them afterwards."""
    from concurrent import futures

    import grpc

    from llm_tables.client import forget_channel

    servers, targets = [], []
    for i, servicer in enumerate(servicers):
        server = grpc.server(futures.ThreadPoolExecutor(2))
        add(servicer, server)
        if kind == "unix":
            target = f"unix://{folder}/s{i}.sock"
            server.add_insecure_port(target)
        else:
            target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        server.start()
        servers.append(server)
        targets.append(target)
    address = ",".join(targets)
    try:
        yield address
    finally:
        forget_channel(address)
        for server in servers:
            server.stop(None)


@pytest.mark.parametrize("kind", ["unix", "ipv4"])
def test_a_list_of_addresses_round_robins_over_all(kind, tmp_path):
    """gRPC's unix and ipv4 resolvers both take a comma list: the FDW's channel (client.py) reaches
    every server of the list, one call each in turn."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from llm_tables.client import channel_for

    calls = [0, 0, 0]

    class Counting(health.HealthServicer):
        def __init__(self, i: int) -> None:
            super().__init__()
            self.i = i
            self.set("", health_pb2.HealthCheckResponse.SERVING)

        def Check(self, request, context):
            calls[self.i] += 1
            return super().Check(request, context)

    with in_process_servers([Counting(i) for i in range(3)], health_pb2_grpc.add_HealthServicer_to_server,
                            kind, tmp_path) as address:
        stub = health_pb2_grpc.HealthStub(channel_for(address))
        stub.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=10)
        time.sleep(0.5)   # round_robin connects to every address; wait for all three
        calls[:] = [0, 0, 0]
        for _ in range(30):
            stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert calls == [10, 10, 10], calls


def test_a_call_a_stopping_sidecar_cancels_before_answering_goes_to_the_next(tmp_path):
    """A sidecar's gRPC core cancels the calls it received but had not yet handed to the servicer
    when it stops (no headers sent): with several sidecars the client retries them on the next
    one, as it does UNAVAILABLE, so a query never sees that race (test_failover's one-in-eight
    flake: an embedding query failed "CANCELLED" just as a SIGTERMed sidecar stopped)."""
    import grpc

    from llm_inference.v1 import inference_pb2 as pb
    from llm_inference.v1 import inference_pb2_grpc as pb_grpc
    from llm_tables.client import channel_for

    calls = [0, 0]

    class Models(pb_grpc.InferenceServicer):
        def __init__(self, i: int) -> None:
            self.i = i

        def ListModels(self, request, context):
            calls[self.i] += 1
            if self.i == 0:
                context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")
            return pb.ListModelsResponse(models=[pb.ModelInfo(name="m")])

    with in_process_servers([Models(0), Models(1)], pb_grpc.add_InferenceServicer_to_server,
                            "unix", tmp_path) as address:
        stub = pb_grpc.InferenceStub(channel_for(address))
        stub.ListModels(pb.ListModelsRequest(), wait_for_ready=True, timeout=10)
        time.sleep(0.5)   # round_robin connects to both
        for _ in range(20):
            assert stub.ListModels(pb.ListModelsRequest(), timeout=5).models[0].name == "m"
        assert calls[0] >= 5, f"the cancelling server was not reached: {calls}"


def test_an_address_list_gRPC_cannot_balance_is_refused():
    from llm_tables.client import channel_target, several_sidecars
    from llm_tables.errors import LlmError

    assert channel_target("10.0.0.5:50051, 10.0.0.6:50051") == "ipv4:10.0.0.5:50051,10.0.0.6:50051"
    assert channel_target("unix:///a.sock,unix:///b.sock") == "unix:///a.sock,/b.sock"
    assert channel_target("[fd00::5]:1,[fd00::6]:1") == "ipv6:[fd00::5]:1,[fd00::6]:1"
    assert channel_target("dns:///svc.ns.svc.cluster.local:50051") == "dns:///svc.ns.svc.cluster.local:50051"
    # retries only where another sidecar may take the call
    assert several_sidecars("ipv4:10.0.0.5:50051,10.0.0.6:50051") and several_sidecars("dns:///svc:50051")
    assert several_sidecars("sidecar.example:50051")
    assert not several_sidecars("unix:///run/sidecar.sock") and not several_sidecars("127.0.0.1:50051")
    for bad in ("a.example:1,b.example:1", "unix:///a.sock,127.0.0.1:1"):
        with pytest.raises(LlmError, match="several sidecars") as err:
            channel_target(bad)
        assert "dns:///" in err.value.hint
