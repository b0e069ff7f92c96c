"""Tenants against a real sidecar with `auth: required`: tokens, limits (with the marker that tells
an admission rejection from any other), and usage that adds up."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml

from deploy import embedded
from llm_sidecar.servicer import ADMISSION_REJECTED
from llm_inference.v1 import inference_pb2 as pb
from llm_inference.v1 import inference_pb2_grpc as pb_grpc
from sidecar_process import running_sidecar, sample, scrape

GEN = "smollm2-135m-instruct"
EMB = "all-minilm-l6-v2"
PACKAGED = Path(__file__).resolve().parents[1] / "sidecar" / "llm_sidecar" / "models.yaml"
TOKENS = {"acme": "acme-s3cret", "beta": "beta-s3cret", "ledger": "ledger-s3cret", "pair": "pair-s3cret"}
MARKER = ADMISSION_REJECTED[0]    # ("llmfdw-rejected", "queue-full")


@pytest.fixture(scope="module")
def tenant_sidecar(tmp_path_factory):
    """A sidecar of its own (the session's has auth off), with the packaged models."""
    work = tmp_path_factory.mktemp("tenants")
    config = yaml.safe_load(PACKAGED.read_text())
    config.update(auth="required", default_limits={"max_in_flight": 8, "max_queued": 16}, tenants=[
        {"name": "acme", "token": TOKENS["acme"], "max_in_flight": 1, "max_queued": 1},
        {"name": "beta", "token": TOKENS["beta"], "max_in_flight": 1, "max_queued": 0},
        {"name": "ledger", "token": TOKENS["ledger"]},
        {"name": "pair", "token": TOKENS["pair"], "max_in_flight": 2, "max_queued": 2},
    ])
    (work / "sidecar.yaml").write_text(yaml.safe_dump(config))
    port = embedded.free_port()
    with running_sidecar(str(work / "s.sock"), str(work / "sidecar.yaml"), log_path=str(work / "log"),
                         metrics_port=port):
        with grpc.insecure_channel(f"unix://{work / 's.sock'}") as channel:
            yield pb_grpc.InferenceStub(channel), port


def ctx(tenant: str, token: str | None = None) -> pb.RequestContext:
    return pb.RequestContext(tenant=tenant, token=TOKENS.get(tenant, "") if token is None else token)


def gen_request(tenant: str, prompt: str = "What is 2 plus 2?", **params) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=GEN, prompt=prompt, params=pb.GenerationParams(**params), context=ctx(tenant))


@pytest.mark.parametrize("context, words", [
    (ctx("acme", ""), "carries none"),
    (ctx("acme", "beta-s3cret"), "not valid"),
    (ctx("nobody", "whatever"), "not valid"),
    (ctx("", "acme-s3cret"), "'default'"),
])
def test_missing_or_wrong_token_is_unauthenticated(tenant_sidecar, context, words):
    stub, _ = tenant_sidecar
    calls = [
        lambda: list(stub.Generate(pb.GenerateRequest(model=GEN, prompt="x", context=context))),
        lambda: list(stub.Embed(pb.EmbedRequest(model=EMB, inputs=["x"], context=context))),
        lambda: stub.Usage(pb.UsageRequest(context=context)),
        lambda: stub.ListModels(pb.ListModelsRequest(context=context)),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as exc:
            call()
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert words in exc.value.details()
        assert not any(token in exc.value.details() for token in TOKENS.values())


def wait_for(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_over_its_limits_a_tenant_gets_resource_exhausted(tenant_sidecar):
    stub, port = tenant_sidecar
    running = stub.Generate(gen_request("acme", "Write a long story about a dragon.", max_tokens=400))
    next(running)                                   # decoding: acme's one request in flight
    queued = stub.Generate(gen_request("acme", max_tokens=8))
    wait_for(lambda: sample(scrape(port), "llmfdw_queued_requests", tenant="acme") == 1)
    with pytest.raises(grpc.RpcError) as exc:
        list(stub.Generate(gen_request("acme")))
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "'acme'" in exc.value.details() and "max_queued 1" in exc.value.details()
    assert MARKER in exc.value.trailing_metadata()
    # another tenant is not held up by acme's backlog
    assert list(stub.Generate(gen_request("ledger", max_tokens=2)))[-1].final.usage.output_tokens == 2
    # beta may queue nothing: its second request is refused at once, naming max_in_flight
    beta = stub.Generate(gen_request("beta", "Write a long story about a knight.", max_tokens=400))
    next(beta)
    with pytest.raises(grpc.RpcError) as exc:
        list(stub.Generate(gen_request("beta")))
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "'beta'" in exc.value.details() and "max_in_flight 1" in exc.value.details()
    assert MARKER in exc.value.trailing_metadata()
    beta.cancel()
    # when acme's running request goes, its queued one runs
    running.cancel()
    messages = list(queued)
    assert messages[-1].final.usage.output_tokens > 0
    assert messages[-1].final.usage.queue_ns > 0
    assert sample(scrape(port), "llmfdw_queued_requests", tenant="acme") == 0


def usage_of(stub, tenant: str) -> dict[str, pb.UsageRow]:
    rows = stub.Usage(pb.UsageRequest(context=ctx(tenant))).rows
    assert all(r.tenant == tenant for r in rows)
    return {r.model: r for r in rows}


FIELDS = ("requests", "errors", "input_tokens", "output_tokens", "embedded_inputs", "queue_ns", "compute_ns")


def test_usage_adds_up_to_the_requests_and_shows_only_the_caller(tenant_sidecar):
    stub, _ = tenant_sidecar
    before = usage_of(stub, "ledger")
    want = {GEN: dict.fromkeys(FIELDS, 0), EMB: dict.fromkeys(FIELDS, 0)}
    for prompt in ("What is 2 plus 2?", "Name a color.", "Say hello."):
        final = list(stub.Generate(gen_request("ledger", prompt, max_tokens=12)))[-1].final
        row = want[GEN]
        row["requests"] += 1
        for name in ("input_tokens", "output_tokens", "queue_ns", "compute_ns"):
            row[name] += getattr(final.usage, name)
    for inputs in (["one text"], [f"text number {i}" for i in range(150)]):
        row = want[EMB]
        row["requests"] += 1
        for message in stub.Embed(pb.EmbedRequest(model=EMB, inputs=inputs, context=ctx("ledger"))):
            row["embedded_inputs"] += len(message.embeddings)
            for name in ("input_tokens", "queue_ns", "compute_ns"):
                row[name] += getattr(message.usage, name)
    with pytest.raises(grpc.RpcError) as exc:
        list(stub.Generate(gen_request("ledger", temperature=3)))
    assert MARKER not in (exc.value.trailing_metadata() or ())   # only admission rejections carry it
    want[GEN]["requests"] += 1
    want[GEN]["errors"] += 1

    after = usage_of(stub, "ledger")
    for model in (GEN, EMB):
        got = {f: getattr(after[model], f) - (getattr(before[model], f) if model in before else 0) for f in FIELDS}
        assert got == want[model], model
    assert want[GEN]["compute_ns"] > 0 and want[EMB]["compute_ns"] > 0 and want[EMB]["embedded_inputs"] == 151
    # the other tenants see their own rows, never ledger's
    assert all(r.tenant == "acme" for r in stub.Usage(pb.UsageRequest(context=ctx("acme"))).rows)
    assert stub.Usage(pb.UsageRequest(context=ctx("beta"))).since_unix_ns > 0


def test_a_caller_that_backs_off_on_the_marker_runs_more_prompts_than_its_limits(tenant_sidecar):
    """pair may run 2 and queue 2; five prompts at once get one rejection marked queue-full,
    and retrying it (as the FDW does while its other calls are open) completes all five."""
    stub, _ = tenant_sidecar
    start = threading.Barrier(5)
    rejections: list[tuple] = []
    outputs: list[int] = []

    def run(i: int) -> None:
        start.wait()
        while True:
            try:
                outputs.append(list(stub.Generate(gen_request("pair", f"Tell me about the number {i}.",
                                                              max_tokens=48)))[-1].final.usage.output_tokens)
                return
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
                rejections.append(tuple(err.trailing_metadata()))
                time.sleep(0.2)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(outputs) == 5 and all(outputs)
    assert rejections and all(MARKER in r for r in rejections)
