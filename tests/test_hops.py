"""Per-hop timestamps (sidecar/llm_sidecar/hops.py, read by bench/bench_hops.py): a sidecar
started with LLMFDW_HOPS=1 sends each Embed and Generate call's marks, in the order the call
passed them, in its trailing metadata; a sidecar without it sends none."""
from __future__ import annotations

import json
import time

import grpc

from sidecar_process import minilm, running_sidecar, smollm2
from llm_inference.v1 import inference_pb2 as pb
from llm_inference.v1 import inference_pb2_grpc as pb_grpc

EMBED_MARKS = ["received", "validated", "admitted", "queued", "batch_formed", "forward_start", "forward_end",
               "forward_returned", "batch_delivered", "delivered", "serialized", "sent", "done", "finished"]
GENERATE_MARKS = ["received", "validated", "admitted", "first_token", "final", "done", "finished"]


def _marks(call) -> dict[str, int] | None:
    text = dict(call.trailing_metadata()).get("llmfdw-hops")
    return None if text is None else json.loads(text)


def _in_order(marks: dict[str, int], names: list[str], sent: int, ended: int) -> None:
    assert list(marks) == names, marks
    times = [sent] + [marks[n] for n in names] + [ended]
    assert times == sorted(times), marks   # one clock (CLOCK_MONOTONIC) for both processes


def test_a_sidecar_with_hops_on_sends_each_calls_marks(work_dir, run_dir, monkeypatch):
    monkeypatch.setenv("LLMFDW_HOPS", "1")   # inherited by the sidecar (embedded.sidecar_env)
    config = work_dir / "hops.yaml"
    config.write_text("models:\n" + minilm() + smollm2(max_tokens=4))
    config.chmod(0o644)
    sock = run_dir / "hops.sock"
    with running_sidecar(str(sock), config_path=str(config), log_path=str(work_dir / "hops-sidecar.log")), \
            grpc.insecure_channel(f"unix://{sock}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        sent = time.perf_counter_ns()
        call = stub.Embed(pb.EmbedRequest(model="all-minilm-l6-v2", inputs=["where does the time go"]), timeout=60)
        assert len(list(call)) == 1
        _in_order(_marks(call), EMBED_MARKS, sent, time.perf_counter_ns())
        sent = time.perf_counter_ns()
        call = stub.Generate(pb.GenerateRequest(model="smollm2-135m-instruct", prompt="Hi"), timeout=60)
        list(call)
        _in_order(_marks(call), GENERATE_MARKS, sent, time.perf_counter_ns())


def test_the_session_sidecar_sends_no_marks(session_sidecar, sidecar_socket):
    with grpc.insecure_channel(f"unix://{sidecar_socket}") as channel:
        call = pb_grpc.InferenceStub(channel).Embed(
            pb.EmbedRequest(model="all-minilm-l6-v2", inputs=["no marks here"]), timeout=60)
        list(call)
        assert _marks(call) is None
