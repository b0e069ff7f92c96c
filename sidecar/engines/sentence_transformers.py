"""Embeddings on the CPU with sentence-transformers, batched across callers.

Texts from every concurrent Embed call are merged into engine batches of up
to max_batch texts; a batch waits at most batch_wait_ms for company, so a
lone request is not delayed and a busy sidecar runs full batches.  Results go
back to each caller as its texts' batches finish.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator

import numpy as np

from llmfdw.sidecar import metrics
from llmfdw.sidecar.engines.base import READY, EmbeddingEngine, EmbeddingResult


@dataclass
class _Work:
    texts: list[str]
    indexes: list[int]
    future: asyncio.Future


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
        self._queue: asyncio.Queue[_Work] = asyncio.Queue()
        self._worker = asyncio.create_task(self._run(), name=f"{self.name}-batcher")
        self.state = READY

    async def close(self) -> None:
        self._worker.cancel()

    async def embed(self, texts: list[str]) -> AsyncIterator[list[tuple[int, EmbeddingResult]]]:
        loop = asyncio.get_running_loop()
        size = self.config.max_batch
        pending = []
        for start in range(0, len(texts), size):
            work = _Work(texts[start:start + size], list(range(start, min(start + size, len(texts)))),
                         loop.create_future())
            pending.append(work.future)
            self._queue.put_nowait(work)
        try:
            for next_done in asyncio.as_completed(pending):
                yield await next_done
        finally:
            for f in pending:
                f.cancel()       # texts not yet batched are skipped

    async def _run(self) -> None:
        """Take work, top it up to max_batch within batch_wait_ms, run it."""
        wait = self.config.batch_wait_ms / 1000
        while True:
            batch = [await self._queue.get()]
            deadline = time.monotonic() + wait
            while sum(len(w.texts) for w in batch) < self.config.max_batch:
                left = deadline - time.monotonic()
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left) if left > 0
                                 else self._queue.get_nowait())
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
            batch = [w for w in batch if not w.future.cancelled()]
            if not batch:
                continue
            texts = [t for w in batch for t in w.texts]
            metrics.BATCH_SIZE.labels(self.name).observe(len(texts))
            try:
                vectors, tokens, elapsed = await asyncio.to_thread(self._encode, texts)
            except Exception as err:
                for w in batch:
                    if not w.future.done():
                        w.future.set_exception(err)
                continue
            share = elapsed // max(1, len(texts))
            pos = 0
            for w in batch:
                n = len(w.texts)
                results = [(idx, EmbeddingResult(vectors[pos + k], tokens[pos + k],
                                                 tokens[pos + k] > self.max_tokens, share))
                           for k, idx in enumerate(w.indexes)]
                pos += n
                if not w.future.done():
                    w.future.set_result(results)

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, list[int], int]:
        started = time.monotonic_ns()
        vectors = self._model.encode(texts, batch_size=len(texts), convert_to_numpy=True,
                                     normalize_embeddings=False, show_progress_bar=False)
        tokens = [len(ids) for ids in self._model.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        return vectors.astype(np.float32, copy=False), tokens, time.monotonic_ns() - started
