"""Benchmark: does one session's load delay another session's small request?

    .venv/bin/python bench/bench_fairness.py [--hog-requests 16] [--hog-tokens 2000] [--repeats 3]

Against a real sidecar (packaged config: SmolLM2 with 8 llama.cpp slots, MiniLM), through gRPC:
  generation - session B's 8-token completion, alone, then while session A (same tenant) runs
               --hog-requests long generations (what `prompt = ANY(16 prompts) AND
               max_tokens = 2000` sends).  Before per-session fairness A took all 8 slots
               and B waited for a whole long answer (0.24 s -> over 60 s).
  embedding  - a one-word embed, alone, then while another client keeps sending 1 MB inputs
               (under the 1 MiB limit).  Before inputs were cut to what the model reads,
               tokenizing such an input stalled every caller (21 ms -> 1.3 s).
Figures are medians over --repeats calls.  Prints them and writes bench/results/fairness.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from bench.common import save  # noqa: E402
from llm_inference.v1 import inference_pb2 as pb  # noqa: E402
from llm_inference.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402
from sidecar_process import running_sidecar  # noqa: E402

EMB, GEN = "all-minilm-l6-v2", "smollm2-135m-instruct"
HOG_PROMPT = "Write a very long story about a dragon and a knight, number {}."


def short_completion(stub: pb_grpc.InferenceStub, session: str) -> float:
    """Seconds for one 8-token completion from `session`."""
    began = time.monotonic()
    messages = list(stub.Generate(pb.GenerateRequest(
        model=GEN, prompt="What is the capital of France?", params=pb.GenerationParams(max_tokens=8),
        context=pb.RequestContext(session=session))))
    assert messages[-1].final.usage.output_tokens > 0
    return time.monotonic() - began


def one_word_embed(stub: pb_grpc.InferenceStub, session: str) -> float:
    """Seconds for embedding one word from `session`."""
    began = time.monotonic()
    for _ in stub.Embed(pb.EmbedRequest(model=EMB, inputs=["kitten"], context=pb.RequestContext(session=session))):
        pass
    return time.monotonic() - began


def timed(measure: Callable[[], float], repeats: int) -> list[float]:
    return [measure() for _ in range(repeats)]


class Hog:
    """Session A's long generations, each drained by its own thread as the FDW would; started
    counts those that have streamed their first token (hold a slot and decode)."""

    def __init__(self, stub: pb_grpc.InferenceStub, requests: int, max_tokens: int) -> None:
        self.calls = [stub.Generate(pb.GenerateRequest(
            model=GEN, prompt=HOG_PROMPT.format(i), params=pb.GenerationParams(max_tokens=max_tokens),
            context=pb.RequestContext(session="A"))) for i in range(requests)]
        self.started = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._drain, args=(c,), daemon=True) for c in self.calls]
        for t in self._threads:
            t.start()

    def _drain(self, call) -> None:
        first = True
        try:
            for _ in call:
                if first:
                    with self._lock:
                        self.started += 1
                    first = False
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                raise

    def wait_running(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.started < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.started} of the hog's requests started in {timeout} s")
            time.sleep(0.02)

    def stop(self) -> None:
        for call in self.calls:
            call.cancel()
        for t in self._threads:
            t.join(30)


def generation_fairness(stub: pb_grpc.InferenceStub, hog_requests: int = 16, hog_tokens: int = 2000,
                        repeats: int = 3, slots_for_hog: int = 8) -> dict:
    """B's short completion alone and beside A's hog (once A decodes on `slots_for_hog` slots)."""
    short_completion(stub, "B")   # warm-up: the first call pays for the channel
    alone = timed(lambda: short_completion(stub, "B"), repeats)
    hog = Hog(stub, hog_requests, hog_tokens)
    try:
        hog.wait_running(slots_for_hog)
        beside = timed(lambda: short_completion(stub, "B"), repeats)
        running = hog.started
    finally:
        hog.stop()
    return {"alone_s": alone, "beside_hog_s": beside, "median_alone_s": statistics.median(alone),
            "median_beside_hog_s": statistics.median(beside),
            "ratio": statistics.median(beside) / statistics.median(alone),
            "hog": {"requests": hog_requests, "max_tokens": hog_tokens, "started_when_measured": running}}


def embedding_fairness(stub: pb_grpc.InferenceStub, big_bytes: int = 1_000_000, repeats: int = 3) -> dict:
    """A one-word embed alone and while another client sends `big_bytes` inputs back to back."""
    one_word_embed(stub, "B")
    alone = timed(lambda: one_word_embed(stub, "B"), repeats)
    big = ("lorem ipsum dolor sit amet " * (big_bytes // 27 + 1))[:big_bytes]
    stop, sent = threading.Event(), []

    def flood() -> None:
        while not stop.is_set():
            began = time.monotonic()
            for _ in stub.Embed(pb.EmbedRequest(model=EMB, inputs=[big], context=pb.RequestContext(session="A"))):
                pass
            sent.append(time.monotonic() - began)

    worker = threading.Thread(target=flood, daemon=True)
    worker.start()
    try:
        while not sent:        # the big inputs are flowing
            time.sleep(0.01)
        beside = timed(lambda: one_word_embed(stub, "B"), repeats)
    finally:
        stop.set()
        worker.join(60)
    return {"alone_s": alone, "beside_big_s": beside, "median_alone_s": statistics.median(alone),
            "median_beside_big_s": statistics.median(beside), "big_input_bytes": big_bytes,
            "big_requests_sent": len(sent), "median_big_request_s": statistics.median(sent)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hog-requests", type=int, default=16)
    parser.add_argument("--hog-tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "fairness.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmfdw-fair-", dir="/tmp") as tmp:
        sock = f"{tmp}/s.sock"
        with running_sidecar(sock, log_path=f"{tmp}/sidecar.log"), \
                grpc.insecure_channel(f"unix://{sock}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            gen = generation_fairness(stub, args.hog_requests, args.hog_tokens, args.repeats)
            emb = embedding_fairness(stub, repeats=args.repeats)
    print(f"8-token completion, session B: alone {gen['median_alone_s']:.3f} s, beside session A's "
          f"{args.hog_requests} x {args.hog_tokens}-token generations {gen['median_beside_hog_s']:.3f} s "
          f"({gen['ratio']:.1f}x)")
    print(f"one-word embed: alone {emb['median_alone_s'] * 1000:.1f} ms, beside 1 MB inputs "
          f"{emb['median_beside_big_s'] * 1000:.1f} ms (each 1 MB request {emb['median_big_request_s']:.3f} s)")
    save({"generation": gen, "embedding": emb}, args.out)


if __name__ == "__main__":
    main()
