"""llama.cpp runs in a child process of the sidecar (engines/llama_worker.py): found there, a
crash of it fails the calls it was running loudly (UNAVAILABLE, marked "restarting") instead of
hanging, a new process takes over while the sidecar stays up, a crash loop stops the sidecar
(exit 3, for its supervisor), and the process does not outlive a killed sidecar."""
from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import grpc
import psycopg
import pytest

from llm_inference.v1 import inference_pb2 as pb
from llm_inference.v1 import inference_pb2_grpc as pb_grpc
from sidecar_process import running_sidecar, smollm2

GEN = "smollm2-135m-instruct"
WORKER = b"llm_sidecar.engines.llama_worker"


def workers(parent: int) -> list[int]:
    """The llama.cpp worker processes whose parent is `parent`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(next(l for l in (entry / "status").read_text().splitlines() if l.startswith("PPid:")).split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
        if ppid == parent and WORKER in cmdline:
            found.append(int(entry.name))
    return found


def gone(pid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def sidecar(run_dir, work_dir, request):
    config = work_dir / f"worker-{request.node.name[:40]}.yaml"
    config.write_text("models:\n" + smollm2(max_tokens=2000, parallel=2, context_length=4096))
    config.chmod(0o644)
    sock = run_dir / f"worker-{os.getpid()}-{len(request.node.name)}.sock"
    with running_sidecar(str(sock), str(config), log_path=str(work_dir / "worker-sidecar.log")) as proc:
        yield proc, sock


def new_worker(proc, old: int, timeout: float = 60) -> int:
    """The llama.cpp process that replaced `old`, once there is one."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = [pid for pid in workers(proc.pid) if pid != old]
        if found:
            return found[0]
        assert proc.poll() is None, f"the sidecar exited ({proc.returncode}) instead of restarting llama.cpp"
        time.sleep(0.05)
    raise AssertionError("no new llama.cpp process")


def model_state(stub) -> tuple[int, str]:
    (info,) = [m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models if m.name == GEN]
    return info.state, info.error


def generates(stub, timeout: float = 60) -> str:
    """A short answer, once the model takes requests again (UNAVAILABLE "loading" until then)."""
    end = time.monotonic() + timeout
    while True:
        try:
            return "".join(r.delta for r in stub.Generate(pb.GenerateRequest(
                model=GEN, prompt="Say hi.", params=pb.GenerationParams(max_tokens=4, temperature=0)), timeout=60))
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "starting again" in err.details(), err
            assert dict(err.trailing_metadata())["llmfdw-unavailable"] == "loading"
            assert time.monotonic() < end, "the model did not come back"
            time.sleep(0.1)


def test_a_crash_of_llama_cpp_fails_its_call_and_a_new_process_takes_over(sidecar):
    proc, sock = sidecar
    (child,) = workers(proc.pid)
    with grpc.insecure_channel(f"unix://{sock}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        call = stub.Generate(pb.GenerateRequest(model=GEN, prompt="Write a very long story about a dragon.",
                                                params=pb.GenerationParams(max_tokens=2000)), timeout=60)
        next(call)                         # it is generating
        os.kill(child, signal.SIGKILL)     # as a segfault inside llama.cpp would end it
        with pytest.raises(grpc.RpcError) as err:
            for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert dict(err.value.trailing_metadata())["llmfdw-unavailable"] == "restarting"
        assert "exited (status -9) while running this request" in err.value.details()
        assert gone(child, 10)
        new_worker(proc, child)
        assert generates(stub)
        assert model_state(stub) == (pb.MODEL_STATE_READY, "")
    assert proc.poll() is None
    assert not list(Path(tempfile.gettempdir()).glob(f"llmfdw-llama-{child}-*"))   # its listener went with it


def test_through_sql_the_lost_query_says_to_run_it_again_and_the_next_one_is_answered(sidecar, pg_dsn):
    """What a user sees: SQLSTATE 57P03 with the cause and a hint for the query that was running,
    then answers again from the new process, on the same connection."""
    proc, sock = sidecar
    (child,) = workers(proc.pid)
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("DROP SCHEMA IF EXISTS llama_restart CASCADE")
        admin.execute("DROP SERVER IF EXISTS llama_restart CASCADE")
        admin.execute(f"CREATE SERVER llama_restart FOREIGN DATA WRAPPER llmfdw OPTIONS (address 'unix://{sock}')")
        admin.execute("CREATE SCHEMA llama_restart")
        admin.execute("IMPORT FOREIGN SCHEMA llm LIMIT TO (completions) FROM SERVER llama_restart INTO llama_restart")
    try:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            outcome: dict = {}

            def long_query() -> None:
                try:
                    conn.execute("SELECT completion FROM llama_restart.completions WHERE max_tokens = 2000 "
                                 "AND prompt = 'Write a very long story about a lighthouse.'").fetchall()
                except psycopg.Error as err:
                    outcome["error"] = err
            pid = conn.info.backend_pid
            query = threading.Thread(target=long_query)
            query.start()
            with psycopg.connect(pg_dsn, autocommit=True) as watch:   # its 2,000 tokens take ~20 s here
                end = time.monotonic() + 30
                while watch.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() != ("active",):
                    assert time.monotonic() < end
                    time.sleep(0.05)
            time.sleep(1.0)   # past reading the prompt: decoding
            with grpc.insecure_channel(f"unix://{sock}") as channel:
                stub = pb_grpc.InferenceStub(channel)
                os.kill(child, signal.SIGKILL)
                query.join(30)
                err = outcome["error"]
                assert err.sqlstate == "57P03", err
                assert "exited (status -9) while running this request" in err.diag.message_primary
                assert "Run the statement again" in err.diag.message_hint
                new_worker(proc, child)
                generates(stub)   # the model is back
            assert conn.execute("SELECT length(completion) > 0 FROM llama_restart.completions "
                                "WHERE prompt = 'Say hi.' AND max_tokens = 4").fetchone() == (True,)
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("DROP SCHEMA IF EXISTS llama_restart CASCADE")
            admin.execute("DROP SERVER IF EXISTS llama_restart CASCADE")


def test_the_worker_does_not_outlive_a_killed_sidecar(sidecar):
    proc, _ = sidecar
    (child,) = workers(proc.pid)
    proc.kill()
    proc.wait()
    assert gone(child, 10), "llama.cpp's process outlived the sidecar"


def test_the_next_sidecar_removes_what_a_killed_one_left(sidecar, run_dir, work_dir):
    proc, _ = sidecar
    (child,) = workers(proc.pid)
    (left,) = Path(tempfile.gettempdir()).glob(f"llmfdw-llama-{child}-*")   # llama.cpp's listener
    proc.kill()
    proc.wait()
    assert gone(child, 10) and left.exists()   # nobody was left to remove it
    config = work_dir / "worker-next.yaml"
    config.write_text("models:\n" + smollm2(max_tokens=16, parallel=1, context_length=1024))
    config.chmod(0o644)
    with running_sidecar(str(run_dir / f"worker-next-{os.getpid()}.sock"), str(config),
                         log_path=str(work_dir / "worker-sidecar.log")):
        assert not left.exists()


def test_a_worker_that_dies_while_idle_is_replaced_at_once_and_a_crash_loop_stops_the_sidecar(sidecar):
    """Not at the next request: the new process loads while nobody waits.  Dying more than
    MAX_RESTARTS times within RESTART_WINDOW_S is a loop a restart in place does not mend: the
    sidecar exits 3 for its supervisor."""
    from llm_sidecar.engines.llama_cpp import MAX_RESTARTS

    proc, sock = sidecar
    (child,) = workers(proc.pid)
    with grpc.insecure_channel(f"unix://{sock}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        for _ in range(MAX_RESTARTS):
            os.kill(child, signal.SIGKILL)
            child = new_worker(proc, child)
            assert generates(stub)
        os.kill(child, signal.SIGKILL)
    assert proc.wait(timeout=60) == 3


