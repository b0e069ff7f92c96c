"""The GPU path: vLLM's AsyncLLM for generation and for pooling (embedding) models.

UNTESTED in CI: no GPU there.  Written against vLLM's AsyncLLM API
(generate / encode / abort, AsyncEngineArgs); imported only when a model's
engine is "vllm".  vLLM batches every in-flight request (continuous
batching) and, with enable_prefix_caching, reuses shared prompt prefixes.
Cancelling the iterating task aborts the request inside vLLM; an
EngineDeadError is fatal: the engine is marked failed and the sidecar exits.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

import numpy as np

from llmfdw.sidecar.metering import Metered
from llmfdw.sidecar.engines.base import (READY, EmbeddingEngine, EmbeddingResult, EngineFailed,
                                         GenerateFinal, GenerateParams, GenerationEngine)

ENGINE_ARGS = ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len",
               "enable_prefix_caching", "max_num_seqs", "dtype", "quantization", "enforce_eager")


def _engine(config, **extra: Any):
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    unknown = set(config.engine_args) - set(ENGINE_ARGS)
    if unknown:
        raise ValueError(f"model {config.name}: unknown engine_args {sorted(unknown)}; allowed: {ENGINE_ARGS}")
    args = {"max_num_seqs": config.parallel, "max_model_len": config.context_length, **config.engine_args}
    return AsyncLLM.from_engine_args(AsyncEngineArgs(model=config.path(), **args, **extra))


def _dead(err: BaseException) -> bool:
    return type(err).__name__ == "EngineDeadError"


class VllmGenerationEngine(GenerationEngine):
    engine_name = "vllm"

    async def load(self) -> None:
        self._llm = _engine(self.config)
        self._tokenizer = await self._llm.get_tokenizer()
        self.state = READY

    async def close(self) -> None:
        self._llm.shutdown()

    def _prompt(self, prompt: str, system: str, raw: bool) -> str:
        if raw:
            return prompt
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    async def generate(self, prompt: str, system: str, raw: bool, params: GenerateParams,
                       usage: Metered) -> AsyncIterator[str | GenerateFinal]:
        from vllm import SamplingParams

        sampling = SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature,
                                  top_p=params.top_p if params.top_p is not None else 1.0,
                                  seed=params.seed, stop=params.stop or None)
        request_id = uuid.uuid4().hex
        started = time.monotonic_ns()
        sent = 0
        try:
            async for out in self._llm.generate(self._prompt(prompt, system, raw), sampling, request_id):
                completion = out.outputs[0]
                if len(completion.text) > sent:
                    yield completion.text[sent:]
                    sent = len(completion.text)
                if out.finished:
                    reason = completion.finish_reason or "stop"
                    if reason == "stop" and completion.stop_reason is not None and isinstance(completion.stop_reason, str):
                        reason = "stop_string"
                    yield GenerateFinal(reason if reason in ("stop", "length", "stop_string") else "stop",
                                        len(out.prompt_token_ids or []), len(completion.token_ids),
                                        time.monotonic_ns() - started)
        except Exception as err:
            if _dead(err):
                self.state, self.error = "failed", str(err)
                raise EngineFailed(str(err)) from err
            raise
        finally:
            await self._llm.abort(request_id)  # no-op when finished


class VllmEmbeddingEngine(EmbeddingEngine):
    engine_name = "vllm"

    async def load(self) -> None:
        self._llm = _engine(self.config, runner="pooling")
        self.dimensions = self._llm.model_config.get_hidden_size()
        self.state = READY

    async def close(self) -> None:
        self._llm.shutdown()

    async def embed(self, texts: list[str], usage: Metered) -> AsyncIterator[list[tuple[int, EmbeddingResult]]]:
        import asyncio
        from vllm import PoolingParams

        async def one(i: int, text: str) -> tuple[int, EmbeddingResult]:
            started = time.monotonic_ns()
            request_id = uuid.uuid4().hex
            try:
                async for out in self._llm.encode(text, PoolingParams(task="embed"), request_id):
                    if out.finished:
                        data = np.asarray(out.outputs.data.cpu(), dtype=np.float32)
                        return i, EmbeddingResult(data, len(out.prompt_token_ids), False,
                                                  time.monotonic_ns() - started)
            except Exception as err:
                if _dead(err):
                    self.state, self.error = "failed", str(err)
                    raise EngineFailed(str(err)) from err
                raise
            finally:
                await self._llm.abort(request_id)
            raise RuntimeError("vLLM returned no embedding")

        tasks = [asyncio.create_task(one(i, t)) for i, t in enumerate(texts)]
        try:
            for next_done in asyncio.as_completed(tasks):
                yield [await next_done]
        finally:
            for t in tasks:
                t.cancel()
