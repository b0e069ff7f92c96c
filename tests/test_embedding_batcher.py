"""The sentence-transformers engine with its batcher (sidecar/llm_sidecar/batching.py), in-process
with the real model: token budgets make long texts ride in small batches, and requests take
turns.  The batcher alone, on fake token ids: tests/unit/test_batcher.py."""
from __future__ import annotations

import asyncio

import pytest

from llm_sidecar.config import load_config
from llm_sidecar.engines.sentence_transformers import SentenceTransformersEngine
from llm_sidecar.metering import Metered

# -- the real engine --

LONG = "the quick brown fox jumps over the lazy dog " * 12      # ~110 tokens
SHORT = "a cat"                                                # 4 tokens with [CLS]/[SEP]


def engine(**overrides) -> SentenceTransformersEngine:
    config = next(m for m in load_config().models if m.task == "embed")
    for key, value in overrides.items():
        setattr(config, key, value)
    return SentenceTransformersEngine(config)


async def run(e: SentenceTransformersEngine, requests: list[list[str]]) -> tuple[list[list[str]], dict[str, int]]:
    """Embed the requests concurrently; returns the batches the engine ran (as texts), and each
    text's tokens."""
    batches: list[list[str]] = []
    tokens: dict[str, int] = {}
    forward = e._forward
    by_total = {len(texts): texts for texts in requests}

    def recording(batch):
        batches.append([by_total[r.total][int(i)] for r, idx in batch.parts for i in idx])
        return forward(batch)

    e._forward = recording   # the real forward pass still runs; this only records each batch

    async def one(texts: list[str]) -> None:
        got = []
        async for group in e.embed(texts, Metered()):
            for index, result in group:
                got.append(index)
                tokens[texts[index]] = result.input_tokens
                assert result.vector.shape == (384,)
        assert sorted(got) == list(range(len(texts)))

    await asyncio.gather(*(one(t) for t in requests))
    return batches, tokens


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_engine_a_token_budget_makes_long_texts_ride_in_small_batches(loop):
    async def scenario():
        e = engine(max_batch=64, max_batch_tokens=300)
        await e.load()
        try:
            return await run(e, [[LONG] * 6, [SHORT] * 40])
        finally:
            await e.close()

    batches, tokens = loop.run_until_complete(scenario())
    assert tokens[LONG] > 100 and tokens[SHORT] == 4
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(tokens[t] for t in batch) <= 300, batch
    assert sum(map(len, batches)) == 46
    assert all(b.count(LONG) <= 2 for b in batches)     # 3 x ~110 padded tokens would exceed 300
    assert any(SHORT in b for b in batches[:2])         # the short texts did not wait for all long ones


def test_engine_requests_take_turns_and_a_short_one_is_not_held_behind_a_long_one(loop):
    async def scenario():
        e = engine(max_batch=8, max_batch_tokens=10_000, batch_wait_ms=50)
        await e.load()
        try:
            return await run(e, [[f"long request text {i}" for i in range(200)], ["short one", "short two"]])
        finally:
            await e.close()

    batches, _ = loop.run_until_complete(scenario())
    first_short = next(i for i, b in enumerate(batches) if "short one" in b)
    assert first_short <= 1, f"the 2-text request waited for {first_short} batches of the 200-text one"
    assert all(len(b) <= 8 for b in batches)
    assert sum(map(len, batches)) == 202
