"""The sidecar's result cache (sidecar/llm_sidecar/cache.py): keys, the byte bound, revisions, the
YAML key.  No Postgres, no model; the cache through SQL and a real sidecar is tests/test_result_cache.py."""
from __future__ import annotations

import os

import numpy as np
import pytest

from llm_sidecar import metrics
from llm_sidecar.cache import (ENTRY_OVERHEAD, CachedEmbedding, CachedGeneration, ResultCache, embedding_keys,
                               generation_key, model_revision)
from llm_sidecar.config import DEFAULT_CACHE_BYTES, ConfigError, parse_config
from llm_inference.v1 import inference_pb2 as pb
from llm_inference.v1.params import PARAMS

MODEL = {"name": "m", "task": "generate", "engine": "llama_cpp", "source": {"path": "/nowhere"}}


def _request(**fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(model="m", prompt="Is it raining?", **fields)


def test_generation_key_covers_every_field_but_the_context():
    base = generation_key("t", "rev", _request())
    ctx = pb.RequestContext(tenant="t", token="x", request_id="r", backend_pid=7, statement="s", no_cache=True)
    assert generation_key("t", "rev", _request(context=ctx)) == base, "the context is not part of the key"
    assert generation_key("t", "rev", _request(params=pb.GenerationParams())) == base, "empty params: none"
    variants = [_request(system="Be brief."), _request(raw=True), _request(json_schema='{"type": "object"}'),
                _request(choices=["yes", "no"]), _request(params=pb.GenerationParams(stop=["\n"])),
                pb.GenerateRequest(model="other", prompt="Is it raining?"),
                pb.GenerateRequest(model="m", prompt="Is it snowing?")]
    # every generation parameter of the registry changes the key, so a new one is covered too
    variants += [_request(params=pb.GenerationParams(**{p.name: p.kind(p.high)})) for p in PARAMS]
    keys = {generation_key("t", "rev", r) for r in variants}
    assert base not in keys and len(keys) == len(variants)
    assert generation_key("u", "rev", _request()) != base, "the tenant is part of the key"
    assert generation_key("t", "rev2", _request()) != base, "the model's revision is part of the key"


def test_embedding_keys_are_per_text_and_tenant():
    req = pb.EmbedRequest(model="e", inputs=["a", "b", "a"], normalize=True)
    keys = embedding_keys("t", "rev", req)
    assert keys[0] == keys[2] != keys[1]
    alone = embedding_keys("t", "rev", pb.EmbedRequest(model="e", inputs=["b"]))
    assert alone[0] == keys[1], "a text's key does not depend on the other inputs nor on normalize"
    assert embedding_keys("u", "rev", req)[0] != keys[0]
    assert embedding_keys("t", "rev", pb.EmbedRequest(model="f", inputs=["a"]))[0] != keys[0]


def test_least_recently_used_go_first_and_bytes_stay_bounded():
    entry = CachedEmbedding(np.zeros(384, dtype=np.float32), 3, False)
    one = 32 + entry.size() + ENTRY_OVERHEAD
    cache = ResultCache(max_bytes=10 * one)
    keys = [bytes([i]) * 32 for i in range(25)]
    evicted = metrics.CACHE_EVICTIONS._value.get()
    for i, key in enumerate(keys):
        cache.put(key, entry)
        if i == 1:
            assert cache.get(keys[0]) is entry   # touched: now the most recently used
        assert cache.bytes <= cache.max_bytes
    assert len(cache) == 10 and cache.bytes == 10 * one
    assert metrics.CACHE_BYTES._value.get() == cache.bytes
    assert metrics.CACHE_EVICTIONS._value.get() - evicted == 15
    assert cache.get(keys[-1]) is entry and cache.get(keys[1]) is None
    cache.put(b"x" * 32, CachedGeneration("y" * (11 * one), "stop", 1, 1))   # larger than the cache: not kept
    assert cache.get(b"x" * 32) is None and len(cache) == 10
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0 == metrics.CACHE_ENTRIES._value.get()


def test_revision_changes_with_the_file(tmp_path):
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"v1")
    first = model_revision(str(weights))
    weights.write_bytes(b"v2 longer")
    assert model_revision(str(weights)) != first
    folder = tmp_path / "st"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"a")
    before = model_revision(str(folder))
    os.utime(folder / "model.safetensors", ns=(1, 1))
    assert model_revision(str(folder)) != before
    assert model_revision(str(tmp_path / "missing")).endswith("|?")


def test_cache_key_in_yaml():
    assert parse_config({"models": [MODEL]}).cache.max_bytes == DEFAULT_CACHE_BYTES
    assert parse_config({"models": [MODEL], "cache": {"max_bytes": 0}}).cache.max_bytes == 0
    with pytest.raises(ConfigError, match=r"cache.max_bytes: must be >= 0"):
        parse_config({"models": [MODEL], "cache": {"max_bytes": -1}})
    with pytest.raises(ConfigError, match=r"cache: unknown keys \['size'\]"):
        parse_config({"models": [MODEL], "cache": {"size": 1}})
