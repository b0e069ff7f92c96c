"""The sidecar process's life: SIGTERM drains, a model that fails to load ends it non-zero.

Each test starts a sidecar of its own with only the generation model (no torch
import: it starts in about a second).
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy import embedded
from llm_inference.v1 import inference_pb2 as pb
from llm_inference.v1 import inference_pb2_grpc as pb_grpc
from sidecar_process import running_sidecar, sidecar_process

GEN = "smollm2-135m-instruct"
PACKAGED = Path(__file__).resolve().parents[1] / "sidecar" / "llm_sidecar" / "models.yaml"


def write_config(path: Path, **changes) -> Path:
    model = next(m for m in yaml.safe_load(PACKAGED.read_text())["models"] if m["name"] == GEN)
    path.write_text(yaml.safe_dump({"models": [{**model, **changes}]}))
    return path


def health(stub) -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status


def test_sigterm_finishes_running_requests_refuses_new_ones_and_exits_0(tmp_path):
    sock = tmp_path / "s.sock"
    # A grace far above what 150 tokens take even on a loaded 2-core machine: the test is about
    # what the drain does, not how fast the model decodes.
    with running_sidecar(str(sock), str(write_config(tmp_path / "c.yaml")), log_path=str(tmp_path / "log"),
                         extra=("--grace", "120")) as proc, \
            grpc.insecure_channel(f"unix://{sock}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        call = stub.Generate(pb.GenerateRequest(model=GEN, prompt="Write a long story about a dragon.",
                                                params=pb.GenerationParams(max_tokens=150)))
        messages = [next(call)]                       # decoding has begun
        reader = threading.Thread(target=lambda: messages.extend(call))
        reader.start()
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while health(health_pb2_grpc.HealthStub(channel)) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as exc:
            list(stub.Generate(pb.GenerateRequest(model=GEN, prompt="Hello")))
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in exc.value.details()
        assert reader.is_alive(), "the long generation should still be running during the drain"
        reader.join(150)
        final = messages[-1].final
        assert final.finish_reason == pb.FINISH_REASON_LENGTH and final.usage.output_tokens == 150
        assert proc.wait(30) == 0


def test_a_model_that_fails_to_load_is_shown_then_the_process_exits_2(tmp_path):
    missing = tmp_path / "no-such-model.gguf"
    config = write_config(tmp_path / "c.yaml", source={"path": str(missing)})
    sock = tmp_path / "s.sock"
    with sidecar_process(str(sock), str(config), stdout=subprocess.PIPE, extra=("--fail-linger", "4")) as proc:
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            deadline = time.monotonic() + 30
            while True:
                assert time.monotonic() < deadline and proc.poll() is None
                try:
                    model = stub.ListModels(pb.ListModelsRequest(), timeout=1).models[0]
                    if model.state == pb.MODEL_STATE_FAILED:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
            assert "no-such-model.gguf" in model.error
            assert health(health_pb2_grpc.HealthStub(channel)) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as exc:
                list(stub.Generate(pb.GenerateRequest(model=GEN, prompt="Hello")))
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and "failed to load" in exc.value.details()
        assert proc.wait(30) == 2
        assert b"no-such-model.gguf" in proc.stdout.read()


def test_max_connection_age_makes_clients_reconnect_without_failing_a_call(tmp_path):
    """--max-connection-age: the sidecar asks a client to reconnect (GOAWAY) after about that long,
    which is what makes a client of a dns:/// name resolve it again and find sidecar pods added
    since.  Seen from the FDW's own channel: the connection is replaced (new local ports), no
    call fails, and a generation that outlives its connection's age finishes on it."""
    import psutil

    from llm_tables.client import channel_for, forget_channel

    port = embedded.free_port()
    address = f"127.0.0.1:{port}"
    with running_sidecar(str(tmp_path / "s.sock"), str(write_config(tmp_path / "c.yaml")),
                         extra=("--listen", address, "--max-connection-age", "1")):
        stub = pb_grpc.InferenceStub(channel_for(address))
        try:
            stub.ListModels(pb.ListModelsRequest(), timeout=5)   # connects: its age counts from here
            time.sleep(0.7)
            long = stub.Generate(pb.GenerateRequest(model=GEN, prompt="Write a long story about a dragon.",
                                                    params=pb.GenerationParams(max_tokens=150)), timeout=60)
            messages: list = []
            started = time.monotonic()
            reader = threading.Thread(target=lambda: (messages.extend(long), messages.append(time.monotonic())))
            reader.start()
            ports, failures, calls = set(), [], 0
            deadline = time.monotonic() + 3.5
            while time.monotonic() < deadline:
                try:
                    assert stub.ListModels(pb.ListModelsRequest(), timeout=5).models[0].name == GEN
                except grpc.RpcError as err:
                    failures.append(f"{err.code().name}: {err.details()}")
                calls += 1
                ports |= {c.laddr.port for c in psutil.Process().net_connections("tcp")
                          if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED}
                time.sleep(0.05)
            reader.join(60)
        finally:
            forget_channel(address)
    assert not failures, failures[:3]
    assert calls > 20 and len(ports) >= 3, (calls, ports)   # about one new connection a second
    finished = messages.pop()
    print(f"{calls} calls over {len(ports)} connections; the generation took {finished - started:.2f} s")
    assert messages[-1].final.usage.output_tokens == 150, f"the long generation did not finish: {messages[-1].final}"
    # it began 0.7 s into its connection's life, which ends at 0.9-1.1 s
    assert finished - started > 0.5, "the generation should outlive its connection's age"


@pytest.mark.parametrize("mode, warned", [(0o644, True), (0o600, False)])
def test_a_config_with_tokens_that_every_user_may_read_is_warned_about(tmp_path, mode, warned):
    config = write_config(tmp_path / "c.yaml")
    data = yaml.safe_load(config.read_text())
    data.update(auth="required", tenants=[{"name": "acme", "token": "s3cret"}])
    config.write_text(yaml.safe_dump(data))
    config.chmod(mode)
    embedded.give_to_server_user(config)   # the sidecar runs as that user and must read it
    log = tmp_path / "log"
    with running_sidecar(str(tmp_path / "s.sock"), str(config), log_path=str(log)):
        pass
    assert ("holds tenants' tokens and every user of this host may read it" in log.read_text()) == warned



def sidecar_user_ids() -> tuple[int, int]:
    """uid and gid the test sidecar runs as: the server OS user as root, else ourselves."""
    user = embedded.server_os_user()
    entry = pwd.getpwnam(user) if user else pwd.getpwuid(os.geteuid())
    return entry.pw_uid, entry.pw_gid


@pytest.fixture
def log_dir():
    """A log directory as `make up` makes it: 0700, the sidecar's user's.  Not under tmp_path: a
    pytest session starting meanwhile makes pytest's root 0700 again, which would keep the
    sidecar's user from creating the next file when it rotates."""
    path = embedded.make_server_dir(Path(tempfile.mkdtemp(prefix="llmfdw-test-log-")), 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_log_file_is_private_and_rotated_with_llama_cpp_output_in_it(tmp_path, log_dir):
    """--log-file (as `make up` runs it): 0600 even over an older 0644 file, renamed at
    --log-max-bytes with --log-backups files kept, and native output (llama.cpp writes to stderr)
    follows each rotation instead of growing a renamed file."""
    log = log_dir / "sidecar.log"
    log.write_text("a line from a run before logs were private\n")
    log.chmod(0o644)
    embedded.give_to_server_user(log)
    stdout = tmp_path / "stdout"
    with running_sidecar(str(tmp_path / "s.sock"), str(write_config(tmp_path / "c.yaml")), log_path=str(stdout),
                         extra=("--log-file", str(log), "--log-max-bytes", "4096", "--log-backups", "2")), \
            grpc.insecure_channel(f"unix://{tmp_path / 's.sock'}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        for i in range(20):
            list(stub.Generate(pb.GenerateRequest(model=GEN, prompt=f"Say {i}.",
                                                  params=pb.GenerationParams(max_tokens=2))))
    files = sorted(p.name for p in log_dir.iterdir())
    assert files == ["sidecar.log", "sidecar.log.1", "sidecar.log.2"]
    for name in files:
        st = (log_dir / name).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, *sidecar_user_ids()), name
        # a record rolls the file over when it would pass the limit; llama.cpp's lines for one
        # request (about 1 KB, written before its record) may take it past
        assert st.st_size < 2 * 4096, (name, st.st_size)
    text = "".join((log_dir / name).read_text() for name in files)
    assert "print_timing" in text and '"event": "request"' in text and "stopped (exit code 0)" in text
    assert "before logs were private" not in text and "Logging error" not in text
    assert "print_timing" not in stdout.read_text()


def test_a_start_up_failure_is_in_the_log_file_that_make_up_shows(tmp_path, log_dir):
    config = write_config(tmp_path / "c.yaml", parallel=0)
    sock = tmp_path / "s.sock"
    with sidecar_process(str(sock), str(config), extra=("--log-file", str(log_dir / "sidecar.log"))) as proc:
        with pytest.raises(RuntimeError) as exc:
            embedded.wait_serving(f"unix://{sock}", 60, alive=lambda: proc.poll() is None,
                                  log_file=log_dir / "sidecar.log")
    assert proc.returncode == 2
    assert "exited" in str(exc.value) and "bad configuration" in str(exc.value) and "parallel" in str(exc.value)
