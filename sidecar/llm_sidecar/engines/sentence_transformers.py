"""Embeddings on the CPU with sentence-transformers, batched across callers.

The batch policy (budgets, length-aware order, fairness between requests) is
sidecar/llm_sidecar/batching.py, shared with the vLLM engine.  This engine:

- tokenizes each request once, on arrival, in chunks of batching.CHUNK texts
  (so the first batch of a large request runs while the rest is tokenized),
  in worker threads (batching.TokenIds: a private copy of the model's Rust
  tokenizer, safe from several threads, without the GIL);
- runs each batch as one forward pass of the model's modules on the padded
  token ids batching.Batch.arrays() builds (no second tokenization inside
  SentenceTransformer.encode), in a thread of its own, one batch at a time
  (engines/compute_thread.py: it ends when idle, so that its OpenMP pool does
  not slow down llama.cpp's in the same process);
- returns the batch's vectors as one float32 array; each text's result is a
  row of it.

The work one text can cause is bounded by what the model reads: a text is cut
at CHARS_PER_TOKEN characters per token of context (engines/base.py) before
it is tokenized.  A cut text, or one with more tokens than the context, is
reported as truncated, and its input_tokens count the part kept by the cut.
Callers that must not lose the rest split texts first with the Chunk RPC,
which counts with this model's tokenizer (`chunker`, chunking.TokenChunker).

`dtype` (config) picks float32 or bfloat16 weights and activations;
bfloat16 needs AVX512-BF16 or AMX on the CPU (engines/base.check_dtype,
checked at load: the sidecar does not start otherwise).
"""
from __future__ import annotations

import asyncio
import functools
import time
from typing import AsyncIterator

import numpy as np

from llm_sidecar import metrics
from llm_sidecar.batching import Batch, Batcher, Group, Request, TokenIds
from llm_sidecar.chunking import TokenChunker
from llm_sidecar.engines.base import READY, EmbeddingEngine, bound_torch_caches, check_dtype
from llm_sidecar.engines.compute_thread import ComputeThread
from llm_sidecar.metering import Metered


class SentenceTransformersEngine(EmbeddingEngine):
    engine_name = "sentence_transformers"

    async def load(self) -> None:
        bound_torch_caches()
        import torch
        from sentence_transformers import SentenceTransformer

        self.dtype = check_dtype(self.name, self.config.dtype)
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        # Loading and every forward pass run on one thread (one batch at a time): a hand-off to it
        # costs less than one to asyncio's shared pool (bench/bench_hops.py), torch's thread count
        # (an OpenMP setting of the calling thread) is set there, and it ends when idle, taking its
        # OpenMP pool with it (compute_thread.py says why that matters).
        threads = self.config.threads or torch.get_num_threads()
        self._compute = ComputeThread(f"{self.name}-forward", functools.partial(torch.set_num_threads, threads))
        kwargs = {"model_kwargs": {"dtype": torch.bfloat16}} if self.dtype == "bfloat16" else {}
        loop = asyncio.get_running_loop()
        self._model = await loop.run_in_executor(
            self._compute, functools.partial(SentenceTransformer, self.config.path(), device="cpu", **kwargs))
        self._model.eval()
        self.dimensions = self._model.get_embedding_dimension()
        self.max_tokens = self.context_length = int(self._model.max_seq_length)
        self._tokenize = TokenIds(self._model.tokenizer, self.max_tokens)
        self.chunker = TokenChunker(self._model.tokenizer, self.max_tokens)   # the Chunk RPC (chunking.py)
        self._batcher = Batcher(max_batch=self.config.max_batch, max_batch_tokens=self.config.max_batch_tokens,
                                context=self.max_tokens, wait_ms=self.config.batch_wait_ms, tail=self._tokenize.tail,
                                depth=metrics.EMBED_QUEUE.labels(self.name))
        # warm-up: the first forward pass sets up oneDNN's kernels (bf16 ones take a while)
        warm = Request(1, Metered())
        warm.extend(self._tokenize(["warm up"]))
        batch = Batch([(warm, np.array([0]))], self.max_tokens, self._tokenize.tail)
        await loop.run_in_executor(self._compute, self._forward, batch)
        self._worker = asyncio.create_task(self._run(), name=f"{self.name}-batcher")
        self.state = READY

    async def close(self) -> None:
        self._worker.cancel()
        self._compute.shutdown()

    def embed(self, texts: list[str], usage: Metered) -> AsyncIterator[Group]:
        return self._batcher.embed(texts, usage, self._tokenize)

    async def _run(self) -> None:
        """Take a batch, run it, deliver; the next request's tokenizing overlaps the compute."""
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._batcher.next()
            batch.start()
            metrics.BATCH_SIZE.labels(self.name).observe(batch.size)
            try:
                vectors, elapsed = await loop.run_in_executor(self._compute, self._forward, batch)
            except Exception as err:
                batch.fail(err)
                continue
            batch.mark("forward_returned")
            batch.deliver(vectors, elapsed)

    def _forward(self, batch: Batch) -> tuple[np.ndarray, int]:
        """One forward pass over the batch's padded ids: float32 vectors [texts, dimensions]."""
        import torch

        started = time.monotonic_ns()
        batch.mark("forward_start")
        ids, mask = batch.arrays()
        with torch.inference_mode():
            out = self._model({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)})
        vectors = out["sentence_embedding"].float().numpy()
        batch.mark("forward_end")
        return vectors, time.monotonic_ns() - started
