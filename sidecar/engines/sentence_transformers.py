"""Embeddings on the CPU with sentence-transformers, batched across callers.

Every concurrent Embed call's texts are merged into engine batches of up to
max_batch texts and max_batch_tokens padded tokens (texts times the longest
of them: what the model really computes, so a few long texts make a small
batch and many short ones a full one).  A batch that would not be full waits
at most batch_wait_ms for company, so a lone request is barely delayed and a
busy sidecar runs full batches.  Batches are filled round-robin from the
requests waiting, a text from each in turn, so a request of 100,000 texts
does not hold a request of 3 behind it: the short one rides in the next
batch.  Results go back to each caller as the batches holding its texts
finish.  Texts are tokenized once, on arrival, for the budget and the metering.

The work one text can cause is bounded by what the model reads: a text is cut
at CHARS_PER_TOKEN characters per token of context (engines/base.py) before
it is tokenized, here and in the batch.  A cut text is reported as truncated,
and its input_tokens count the part kept.  Counting runs in worker threads,
each with its own copy of the tokenizer, so one request's counting never
waits for another's.
"""
from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator

import numpy as np

from llmfdw.sidecar import metrics
from llmfdw.sidecar.engines.base import READY, EmbeddingEngine, EmbeddingResult, readable_part
from llmfdw.sidecar.metering import Metered

Group = list[tuple[int, EmbeddingResult]]


@dataclass(eq=False)
class _Request:
    texts: list[str]           # cut to what the model reads (readable_part)
    tokens: list[int]          # each text's length in tokens, before truncation to the context
    cut: list[bool]            # the text was cut by readable_part
    usage: Metered
    arrived_ns: int
    results: asyncio.Queue = field(default_factory=asyncio.Queue)   # Group or Exception
    taken: int = 0             # texts already handed to a batch
    started: bool = False      # a batch with its texts has started


class SentenceTransformersEngine(EmbeddingEngine):
    engine_name = "sentence_transformers"

    async def load(self) -> None:
        from sentence_transformers import SentenceTransformer
        import torch

        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self._model = await asyncio.to_thread(SentenceTransformer, self.config.path(), device="cpu")
        self.dimensions = self._model.get_embedding_dimension()
        self.max_tokens = self.context_length = int(self._model.max_seq_length)
        # A fast tokenizer is not safe to share between threads (encode sets its padding and
        # truncation while it runs): each counting thread gets its own copy of this pristine one.
        self._pristine = copy.deepcopy(self._model.tokenizer)
        self._copying = threading.Lock()
        self._counters = threading.local()
        self._waiting: deque[_Request] = deque()    # requests with texts not yet batched
        self._arrived = asyncio.Event()
        self._depth = metrics.EMBED_QUEUE.labels(self.name)
        self._worker = asyncio.create_task(self._run(), name=f"{self.name}-batcher")
        self.state = READY

    async def close(self) -> None:
        self._worker.cancel()

    async def embed(self, texts: list[str], usage: Metered) -> AsyncIterator[Group]:
        readable = [readable_part(t, self.max_tokens) for t in texts]
        kept = [t for t, _ in readable]
        request = _Request(kept, await asyncio.to_thread(self._count, kept), [cut for _, cut in readable],
                           usage, time.monotonic_ns())
        self._waiting.append(request)
        self._depth.inc(len(texts))
        self._arrived.set()
        delivered = 0
        try:
            while delivered < len(texts):
                group = await request.results.get()
                if isinstance(group, Exception):
                    raise group
                delivered += len(group)
                yield group
        finally:
            if request in self._waiting:   # the caller left: its texts not yet batched are dropped
                self._waiting.remove(request)
                self._depth.dec(len(texts) - request.taken)

    def _pending(self) -> int:
        return sum(len(r.texts) - r.taken for r in self._waiting)

    def _count(self, texts: list[str]) -> list[int]:
        """Each text's tokens, with this thread's own tokenizer."""
        counter = getattr(self._counters, "tokenizer", None)
        if counter is None:
            with self._copying:
                counter = self._counters.tokenizer = copy.deepcopy(self._pristine)
        return [len(ids) for ids in counter(texts, add_special_tokens=True)["input_ids"]]

    def _take_batch(self) -> list[tuple[_Request, int, int]]:
        """Texts within max_batch and max_batch_tokens, one from each waiting request in
        turn; the next batch starts with the request after the last one served here.
        A text longer than the whole budget still goes, alone."""
        taken: dict[_Request, int] = {}
        count = longest = 0
        while self._waiting and count < self.config.max_batch:
            request = self._waiting[0]
            n = min(request.tokens[request.taken + taken.get(request, 0)], self.max_tokens)
            if count and (count + 1) * max(longest, n) > self.config.max_batch_tokens:
                break
            taken[request] = taken.get(request, 0) + 1
            count, longest = count + 1, max(longest, n)
            self._waiting.popleft()
            if request.taken + taken[request] < len(request.texts):
                self._waiting.append(request)
        slices = [(request, request.taken, request.taken + k) for request, k in taken.items()]
        for request, k in taken.items():
            request.taken += k
        self._depth.dec(count)
        return slices

    async def _run(self) -> None:
        """Wait for texts, top the batch up within batch_wait_ms, run it, deliver."""
        wait = self.config.batch_wait_ms / 1000
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            if not self._waiting:
                continue
            deadline = time.monotonic() + wait
            while self._pending() < self.config.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                    self._arrived.clear()
                except asyncio.TimeoutError:
                    break
            slices = self._take_batch()
            if self._waiting:
                self._arrived.set()        # more is waiting: no need to sleep before the next batch
            await self._compute(slices)

    async def _compute(self, slices: list[tuple[_Request, int, int]]) -> None:
        now = time.monotonic_ns()
        for request, _, _ in slices:
            if not request.started:
                request.started = True
                request.usage.queue_ns += now - request.arrived_ns
        texts = [t for request, start, end in slices for t in request.texts[start:end]]
        metrics.BATCH_SIZE.labels(self.name).observe(len(texts))
        try:
            vectors, elapsed = await asyncio.to_thread(self._encode, texts)
        except Exception as err:
            for request, _, _ in slices:
                request.results.put_nowait(err)
            return
        share = elapsed // len(texts)   # the batch's time, shared equally among its texts
        pos = 0
        for request, start, end in slices:
            group = [(index, EmbeddingResult(vectors[pos + k], request.tokens[index],
                                             request.cut[index] or request.tokens[index] > self.max_tokens,
                                             share))
                     for k, index in enumerate(range(start, end))]
            pos += end - start
            request.results.put_nowait(group)

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, int]:
        started = time.monotonic_ns()
        vectors = self._model.encode(texts, batch_size=len(texts), convert_to_numpy=True,
                                     normalize_embeddings=False, show_progress_bar=False)
        return vectors.astype(np.float32, copy=False), time.monotonic_ns() - started
