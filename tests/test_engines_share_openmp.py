"""llama.cpp keeps its threads' OpenMP spinning beside an embedding model in the same sidecar.

torch and llama.cpp share the process's libgomp, which stops spinning at barriers once its
threads outnumber the CPUs; the embedding engine's compute thread used to keep its OpenMP pool for
the sidecar's life, so after one embedding llama.cpp's threads went to sleep at each of the ~100
barriers of a decoding step: 3,600 voluntary context switches a second per thread (under 100
without torch in the process), and classification through SQL ran at 0.85 of the engine called
directly (bench/bench_classify.py).  The compute thread now ends when idle
(engines/compute_thread.py).  Measured on the session sidecar (both models loaded): its threads'
voluntary context switches while it generates, after an embedding and an idle second.
"""
from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from llm_inference.v1 import inference_pb2 as pb
from llm_inference.v1 import inference_pb2_grpc as pb_grpc
from llm_sidecar.engines.compute_thread import IDLE_SECONDS

GEN, EMB = "smollm2-135m-instruct", "all-minilm-l6-v2"


def switches(pid: int) -> dict[str, tuple[int, int]]:
    """thread id -> (voluntary context switches, CPU ticks)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
            stat = (task / "stat").read_text()
        except FileNotFoundError:
            continue   # a thread that just ended
        voluntary = int(next(l for l in status.splitlines() if l.startswith("voluntary_ctxt_switches")).split()[1])
        fields = stat[stat.rindex(")") + 2:].split()
        out[task.name] = (voluntary, int(fields[11]) + int(fields[12]))
    return out


@pytest.fixture(scope="module")
def stub(sidecar_socket):
    with grpc.insecure_channel(f"unix://{sidecar_socket}") as channel:
        yield pb_grpc.InferenceStub(channel)


def test_generation_threads_keep_spinning_after_an_embedding(stub, session_sidecar):
    list(stub.Embed(pb.EmbedRequest(model=EMB, inputs=[f"warm the forward thread {i}" for i in range(64)])))
    time.sleep(IDLE_SECONDS + 1.0)   # the embedding engine's compute thread (and OpenMP pool) ends
    before, started = switches(session_sidecar.pid), time.monotonic()
    calls = [stub.Generate(pb.GenerateRequest(model=GEN, prompt=f"Count from {i} to {i + 50}.",
                                              params=pb.GenerationParams(max_tokens=48, temperature=0.0)))
             for i in range(4)]
    for call in calls:
        list(call)
    seconds = time.monotonic() - started
    after = switches(session_sidecar.pid)
    # llama.cpp's compute threads: the two (or `threads`) that used the most CPU meanwhile
    busiest = sorted(((after[t][1] - before.get(t, (0, 0))[1], after[t][0] - before.get(t, (0, 0))[0], t)
                      for t in after), reverse=True)[:2]
    rates = [voluntary / seconds for _, voluntary, _ in busiest]
    # before the fix: ~3,600 a second per thread; after: under 100 on a quiet machine
    assert max(rates) < 1000, (busiest, seconds)
