"""The embedding batcher (sidecar/llm_sidecar/batching.py): budgets, length-aware order, fairness between
requests, the padded id arrays and the delivery of results, on fake token ids: no model.  The
engine with the real model: tests/test_embedding_batcher.py."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from llm_sidecar.batching import Batch, Batcher, Request, pack
from llm_sidecar.metering import Metered

CLS, SEP = 101, 102


def texts_of(lengths, start: int = 1000) -> list[list[int]]:
    """Fake tokenized texts: [CLS] distinct ids [SEP], each `length` ids long."""
    out = []
    for n in lengths:
        out.append([CLS] + list(range(start, start + n - 2)) + [SEP])
        start += n
    return out


def request(lengths, cut=None) -> tuple[Request, object]:
    r = Request(len(lengths), Metered())
    return r, pack(texts_of(lengths), cut)


def batcher(**kw) -> Batcher:
    args = dict(max_batch=8, max_batch_tokens=10_000, context=256, tail=1)
    args.update(kw)
    return Batcher(**args)


def drain(b: Batcher) -> list[Batch]:
    batches = []
    while (batch := b.take()) is not None:
        batches.append(batch)
    return batches


def members(batch: Batch) -> list[tuple[int, int]]:
    """(request total, index) of each text in the batch."""
    return [(r.total, int(i)) for r, idx in batch.parts for i in idx]


# -- the budgets --

def test_a_batch_stays_within_max_batch_and_the_padded_token_budget():
    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 200, size=500)
    b = batcher(max_batch=32, max_batch_tokens=2000)
    r, t = request(lengths)
    b.add(r, t)
    batches = drain(b)
    assert sum(batch.size for batch in batches) == 500
    for batch in batches:
        assert batch.size <= 32 and batch.padded <= 2000
    taken = sorted(i for batch in batches for _, i in members(batch))
    assert taken == list(range(500))           # every text exactly once


def test_a_text_longer_than_the_whole_budget_goes_alone_cut_to_the_context():
    b = batcher(max_batch_tokens=100, context=256)
    r, t = request([5, 900, 5])
    b.add(r, t)
    batches = drain(b)
    alone = [batch for batch in batches if 1 in [i for _, i in members(batch)]]
    assert len(alone) == 1 and alone[0].size == 1 and alone[0].padded == 256


# -- length-aware order --

def test_texts_of_similar_length_ride_together():
    rng = np.random.default_rng(2)
    lengths = rng.integers(8, 250, size=640)
    b = batcher(max_batch=64, max_batch_tokens=64 * 256)
    r, t = request(lengths)
    b.add(r, t)
    batches = drain(b)
    padded = sum(batch.padded for batch in batches)
    arrival = sum(64 * lengths[i:i + 64].max() for i in range(0, 640, 64))  # batches in arrival order
    assert padded < 0.65 * arrival, (padded, arrival)
    assert padded <= 1.1 * lengths.sum()        # almost no padding at all
    firsts = [batch.lengths().max() for batch in batches]
    assert firsts == sorted(firsts)             # shortest first


# -- fairness between requests --

def test_a_100000_text_request_does_not_hold_a_3_text_one():
    b = batcher(max_batch=64, max_batch_tokens=8192)
    big, big_tokens = request(np.full(100_000, 12))
    b.add(big, big_tokens)
    b.take()                                    # the big request is being served...
    small, small_tokens = request([40, 50, 60])
    b.add(small, small_tokens)                  # ...when the small one arrives
    batch = b.take()
    assert sorted(i for total, i in members(batch) if total == 3) == [0, 1, 2]
    assert batch.size == 64 and batch.padded <= 8192
    assert small not in b._waiting and big in b._waiting


def test_requests_take_turns_one_text_each_and_the_turn_rotates():
    b = batcher(max_batch=2)
    reqs = []
    for n in (5, 6, 7):                         # distinct totals name the requests
        r, t = request([10] * n)
        b.add(r, t)
        reqs.append(r)
    served = [[total for total, _ in members(b.take())] for _ in range(3)]
    assert served == [[5, 6], [7, 5], [6, 7]]


def test_a_long_request_gives_way_under_the_token_budget():
    """A short request beside a long one under a tight budget still rides in the next batch."""
    b = batcher(max_batch=64, max_batch_tokens=300)
    long, long_tokens = request([110] * 6)
    short, short_tokens = request([4] * 40)
    b.add(long, long_tokens)
    b.add(short, short_tokens)
    batches = drain(b)
    assert all(batch.padded <= 300 or batch.size == 1 for batch in batches)
    assert any(total == 40 for total, _ in members(batches[0]))
    assert sum(batch.size for batch in batches) == 46


# -- what the model is fed, and what comes back --

def test_arrays_pad_and_cut_like_the_tokenizer():
    b = batcher(context=8, tail=1)
    r, t = request([3, 12, 8], cut=[False, False, True])
    b.add(r, t)
    batch = b.take()
    ids, mask = batch.arrays()
    full = texts_of([3, 12, 8])
    by_index = {int(i): row for (_, idx) in batch.parts for row, i in zip(range(3), idx)}
    rows = {i: (ids[k], mask[k]) for i, k in by_index.items()}
    assert ids.shape == (3, 8) and ids.dtype == np.int64
    assert list(rows[0][0]) == full[0] + [0] * 5 and list(rows[0][1]) == [1] * 3 + [0] * 5
    assert list(rows[1][0]) == full[1][:7] + [SEP] and rows[1][1].all()     # first 7, then [SEP]
    assert list(rows[2][0]) == full[2] and rows[2][1].all()
    vectors = np.arange(3 * 4, dtype=np.float32).reshape(3, 4)
    batch.deliver(vectors, elapsed_ns=3000)
    group = dict(r.results.get_nowait())
    assert sorted(group) == [0, 1, 2]
    assert [group[i].input_tokens for i in range(3)] == [3, 12, 8]
    assert [group[i].truncated for i in range(3)] == [False, True, True]
    for i, k in by_index.items():
        assert np.array_equal(group[i].vector, vectors[k]) and group[i].compute_ns == 1000
    assert batch.id_lists()[by_index[1]] == full[1][:7] + [SEP]


# -- request lifetimes (asyncio, a fake engine) --

async def fake_engine(b: Batcher, log: list, seconds: float = 0.0) -> None:
    """Deliver each batch's vectors: row k = the text's length; log what each batch held."""
    while True:
        batch = await b.next()
        batch.start()
        log.append(members(batch))
        if seconds:
            await asyncio.sleep(seconds)
        batch.deliver(batch.lengths()[:, None].astype(np.float32), 1)


async def feed_of(tokens, chunk: int = 1024):
    for start in range(0, len(tokens), chunk):
        await asyncio.sleep(0)
        yield pack([list(tokens.flat[o:o + n]) for o, n in zip(tokens.offsets[start:start + chunk],
                                                              tokens.counts[start:start + chunk])])


def test_streams_deliver_every_text_and_a_small_request_finishes_first():
    async def scenario():
        b = batcher(max_batch=64, max_batch_tokens=8192, wait_ms=1)
        log: list = []
        engine = asyncio.create_task(fake_engine(b, log, seconds=0.001))
        done: dict[int, float] = {}

        async def call(lengths, delay=0.0):
            await asyncio.sleep(delay)
            r, t = request(lengths)
            got = {}
            async for group in b.stream(r, feed_of(t)):
                for i, res in group:
                    got[i] = res
            assert sorted(got) == list(range(len(lengths)))
            assert all(got[i].vector[0] == min(lengths[i], 256) for i in got)
            done[len(lengths)] = time.monotonic()

        await asyncio.gather(call(np.full(20_000, 9)), call([30, 300, 5], delay=0.01))
        engine.cancel()
        return log, done

    log, done = asyncio.run(scenario())
    assert done[3] < done[20_000]
    first = next(k for k, batch in enumerate(log) if any(total == 3 for total, _ in batch))
    last = max(k for k, batch in enumerate(log) if any(total == 3 for total, _ in batch))
    assert last == first, "the 3 texts rode in one batch"
    assert first <= 20, f"the 3-text request waited for {first} batches"


def test_a_caller_that_leaves_drops_its_untaken_texts():
    class Gauge:
        value = 0

        def inc(self, n):
            self.value += n

        def dec(self, n):
            self.value -= n

    async def run():
        depth = Gauge()
        b = batcher(max_batch=4, wait_ms=0, depth=depth)
        r, t = request([10] * 100)
        stream = b.stream(r, feed_of(t, chunk=100))

        async def serve_one():
            batch = await b.next()
            batch.deliver(np.zeros((batch.size, 1), np.float32), 1)

        server = asyncio.create_task(serve_one())
        first = await stream.__anext__()
        await server
        await stream.aclose()
        return first, b, depth

    first, b, depth = asyncio.run(run())
    assert len(first) == 4
    assert b.pending() == 0 and not b._waiting and depth.value == 0


def test_a_tokenizer_error_reaches_the_caller():
    async def broken():
        yield pack([[CLS, SEP]])
        raise RuntimeError("tokenizer broke")

    async def run():
        b = batcher()
        r = Request(5, Metered())
        with pytest.raises(RuntimeError, match="tokenizer broke"):
            async for _ in b.stream(r, broken()):
                pass

    asyncio.run(run())


def test_an_idle_engine_takes_a_lone_text_at_once_and_a_busy_one_waits_for_more():
    """batch_wait_ms is spent only where texts queued while the engine computed: a one-row query
    that wakes an idle engine does not wait (it would add wait_ms to every interactive query)."""
    async def scenario():
        b = batcher(max_batch=64, wait_ms=60_000)
        idle = asyncio.create_task(b.next())
        await asyncio.sleep(0)                   # next() waits for an arrival: the engine is idle
        r, t = request([5])
        b.add(r, t)
        alone = await asyncio.wait_for(idle, 30)   # not the 60 s wait
        b.wait = 0.05
        first, t1 = request([6])
        b.add(first, t1)                         # queued while the engine computed: it is busy
        busy = asyncio.create_task(b.next())
        await asyncio.sleep(0)
        second, t2 = request([7])
        b.add(second, t2)                        # arrives during the wait: rides along
        return alone, await busy

    alone, busy = asyncio.run(scenario())
    assert members(alone) == [(1, 0)]
    assert busy.size == 2
