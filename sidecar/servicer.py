"""llmfdw.v1.Inference: protobuf in, engine calls, protobuf out.

Validation lives here, so every engine gets clean parameters and every
caller gets a status code with a message written for the SQL user.  A
cancelled or expired call cancels the handler task; closing the engine's
iterator then stops the model work (see each engine).
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from asyncio import CancelledError as _Cancelled
from typing import AsyncIterator

import grpc
import numpy as np

from llmfdw.sidecar import metrics
from llmfdw.sidecar.engines.base import (FAILED, READY, EmbeddingEngine, Engine, EngineFailed,
                                         GenerateFinal, GenerateParams, GenerationEngine)
from llmfdw.v1 import llmfdw_pb2 as pb
from llmfdw.v1 import llmfdw_pb2_grpc as pb_grpc

log = logging.getLogger("llmfdw.sidecar")

_TASKS = {"generate": pb.TASK_GENERATE, "embed": pb.TASK_EMBED}
_STATES = {"loading": pb.MODEL_STATE_LOADING, READY: pb.MODEL_STATE_READY, FAILED: pb.MODEL_STATE_FAILED}
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
           "stop_string": pb.FINISH_REASON_STOP_STRING, "cancelled": pb.FINISH_REASON_CANCELLED}


class InvalidRequest(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _status_of(err: BaseException) -> str:
    if isinstance(err, (GeneratorExit, _Cancelled)):
        return "CANCELLED"
    if isinstance(err, InvalidRequest):
        return err.code.name
    return type(err).__name__


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, engines: dict[str, Engine], on_engine_failure) -> None:
        self.engines = engines
        self.on_engine_failure = on_engine_failure

    # -- helpers ---------------------------------------------------------

    def _engine(self, name: str, task: str) -> Engine:
        engine = self.engines.get(name)
        if engine is None:
            served = ", ".join(sorted(self.engines)) or "none"
            raise InvalidRequest(grpc.StatusCode.NOT_FOUND,
                                 f"model {name!r} is not served by this sidecar (it serves: {served})")
        if engine.config.task != task:
            raise InvalidRequest(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"model {name!r} is a {engine.config.task} model; it cannot {task}")
        if engine.state == FAILED:
            raise InvalidRequest(grpc.StatusCode.UNAVAILABLE, f"model {name!r} failed to load: {engine.error}")
        if engine.state != READY:
            raise InvalidRequest(grpc.StatusCode.UNAVAILABLE, f"model {name!r} is still loading; retry shortly")
        return engine

    @staticmethod
    def _params(engine: Engine, p: pb.GenerationParams) -> GenerateParams:
        defaults = engine.config.defaults
        max_tokens = p.max_tokens if p.HasField("max_tokens") else int(defaults.get("max_tokens", 128))
        temperature = p.temperature if p.HasField("temperature") else float(defaults.get("temperature", 0.0))
        top_p = p.top_p if p.HasField("top_p") else defaults.get("top_p")
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if max_tokens < 1:
            raise InvalidRequest(bad, f"max_tokens must be at least 1, got {max_tokens}")
        if max_tokens > engine.config.context_length:
            raise InvalidRequest(bad, f"max_tokens must be at most the model's context length "
                                      f"{engine.config.context_length}, got {max_tokens}")
        if not 0 <= temperature <= 2:
            raise InvalidRequest(bad, f"temperature must be in [0, 2], got {temperature:g}")
        if top_p is not None and not 0 < top_p <= 1:
            raise InvalidRequest(bad, f"top_p must be in (0, 1], got {top_p:g}")
        return GenerateParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                              seed=p.seed if p.HasField("seed") else None, stop=list(p.stop))

    @staticmethod
    def _request_id(ctx: pb.RequestContext) -> str:
        return ctx.request_id or uuid.uuid4().hex[:16]

    def _log(self, rpc: str, request_id: str, model: str, ctx: pb.RequestContext, status: str,
             started: float, **extra) -> None:
        """One structured log line and the metrics of a finished request."""
        metrics.REQUESTS.labels(rpc, model, ctx.tenant, status).inc()
        metrics.LATENCY.labels(rpc, model).observe(time.monotonic() - started)
        metrics.INPUT_TOKENS.labels(model, ctx.tenant).inc(extra.get("input_tokens", 0))
        metrics.OUTPUT_TOKENS.labels(model, ctx.tenant).inc(extra.get("output_tokens", 0))
        if rpc == "Embed":
            metrics.EMBEDDED.labels(model, ctx.tenant).inc(extra.get("embedded", 0))
        log.info(json.dumps({"event": "request", "rpc": rpc, "request_id": request_id, "model": model,
                             "tenant": ctx.tenant, "database": ctx.database, "status": status,
                             "duration_ms": round((time.monotonic() - started) * 1000, 3), **extra}))

    async def _fail(self, context: grpc.aio.ServicerContext, err: Exception) -> None:
        if isinstance(err, InvalidRequest):
            await context.abort(err.code, str(err))
        if isinstance(err, EngineFailed):
            self.on_engine_failure(err)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the model engine failed: {err}")
        if isinstance(err, ValueError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        await context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")

    # -- RPCs ------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        started = time.monotonic()
        request_id = self._request_id(request.context)
        status, usage = "OK", {}
        in_flight = metrics.IN_FLIGHT.labels("Generate", request.model)
        in_flight.inc()
        first = True
        try:
            engine = self._engine(request.model, "generate")
            assert isinstance(engine, GenerationEngine)
            params = self._params(engine, request.params)
            stream = engine.generate(request.prompt, request.system, request.raw, params)
            try:
                async for event in stream:
                    if isinstance(event, GenerateFinal):
                        usage = {"input_tokens": event.input_tokens, "output_tokens": event.output_tokens,
                                 "compute_ns": event.compute_ns}
                        yield pb.GenerateResponse(final=pb.GenerateFinal(
                            finish_reason=_FINISH[event.finish_reason], model=engine.name,
                            usage=pb.Usage(**usage)))
                    else:
                        if first:
                            metrics.FIRST_TOKEN.labels(engine.name).observe(time.monotonic() - started)
                            first = False
                        yield pb.GenerateResponse(delta=event)
            finally:
                await stream.aclose()
        except BaseException as err:
            status = _status_of(err)
            if isinstance(err, Exception) and not isinstance(err, _Cancelled):
                await self._fail(context, err)
            raise
        finally:
            in_flight.dec()
            self._log("Generate", request_id, request.model, request.context, status, started, **usage)

    async def Embed(self, request: pb.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> AsyncIterator[pb.EmbedResponse]:
        started = time.monotonic()
        request_id = self._request_id(request.context)
        status, count, tokens = "OK", 0, 0
        in_flight = metrics.IN_FLIGHT.labels("Embed", request.model)
        in_flight.inc()
        try:
            engine = self._engine(request.model, "embed")
            assert isinstance(engine, EmbeddingEngine)
            if not request.inputs:
                raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, "inputs must not be empty")
            stream = engine.embed(list(request.inputs))
            try:
                async for group in stream:
                    out = []
                    compute = 0
                    for index, result in group:
                        v = result.vector
                        if request.normalize:
                            norm = float(np.linalg.norm(v))
                            v = v / norm if norm > 0 else v
                        out.append(pb.Embedding(index=index, vector=v.astype("<f4").tobytes(),
                                                dimensions=v.shape[0], input_tokens=result.input_tokens,
                                                truncated=result.truncated))
                        compute += result.compute_ns
                        tokens += result.input_tokens
                    count += len(out)
                    yield pb.EmbedResponse(embeddings=out, usage=pb.Usage(
                        input_tokens=sum(e.input_tokens for e in out), compute_ns=compute))
            finally:
                await stream.aclose()
        except BaseException as err:
            status = _status_of(err)
            if isinstance(err, Exception) and not isinstance(err, _Cancelled):
                await self._fail(context, err)
            raise
        finally:
            in_flight.dec()
            self._log("Embed", request_id, request.model, request.context, status, started,
                      inputs=len(request.inputs), embedded=count, input_tokens=tokens)

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        models = []
        for engine in self.engines.values():
            cfg = engine.config
            models.append(pb.ModelInfo(
                name=cfg.name, task=_TASKS[cfg.task], engine=cfg.engine, dimensions=engine.dimensions,
                context_length=engine.context_length, state=_STATES[engine.state], error=engine.error,
                source=str(cfg.source.get("package") or cfg.source.get("path", ""))))
        return pb.ListModelsResponse(models=models)

