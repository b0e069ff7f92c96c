"""llm_inference.v1.Inference: protobuf in, engine calls, protobuf out.

Validation lives here, so every engine gets clean parameters and every
caller gets a status code with a message written for the SQL user.  Each
call is authenticated (tenants.authenticate), waits for an engine slot
within its tenant's limits (tenants.Admission), is metered (metering) and
ends in one structured log line.  A cancelled or expired call cancels the
handler task; closing the engine's iterator then stops the model work (see
each engine).

Status codes (the contract is written in proto/llm_inference/v1/inference.proto, above
the service).  Every RPC, ListModels and Usage too, goes through one path,
_serving: refused while draining (Generate and Embed only), authenticated,
counted in llmfdw_requests_total / llmfdw_request_seconds and logged as one
JSON line.  An error raised while serving becomes a status by one table,
_STATUS: exception type -> (status code, trailing metadata).  UNAVAILABLE
from the sidecar always carries `llmfdw-unavailable: loading | failed |
draining`, so a caller tells "up, but cannot serve this now" from "not
reachable" (gRPC's own UNAVAILABLE, which carries no such mark) without
reading the message.  Any exception the table does not name is a bug here:
INTERNAL.

Admission rejections carry a marker.  When a tenant is at max_in_flight and
max_queued (tenants.LimitExceeded) the call ends with RESOURCE_EXHAUSTED and
the trailing metadata `llmfdw-rejected: queue-full` (ADMISSION_REJECTED).
Only that pair means "the queue is full, back off and retry": a caller with
other calls of its own still open (the FDW running `prompt = ANY(...)`)
waits for one of them to finish and sends the rejected request again.  Any
other RESOURCE_EXHAUSTED (a gRPC message over its size limit, say) lacks the
marker and is final.

Inputs are bounded before they reach an engine: each embedding input,
prompt and system message may be at most max_input_bytes of UTF-8
(INVALID_ARGUMENT naming the input, 0-based for embedding inputs), and every
generation parameter is checked with a message naming the field.  A prompt
(with its system message) of more characters than CHARS_PER_TOKEN per token
of the model's context cannot fit it: it is refused here, because llama.cpp
would tokenize all of it first (0.7 s for 1 MB, delaying the other slots)
only to refuse it too.

Deterministic answers are kept in the result cache (cache.py): an Embed input, and a Generate at
temperature 0 or with a seed, unless the context says no_cache.  A hit needs no engine slot; a
cached generation streams back as one delta and its final message; an Embed request computes
only the inputs the cache lacks.  Hits are metered as hits (Metered.cache_hits) with their
answers' token counts and no queue or compute time.  Generate, Embed and Chunk requests whose context names a backend pid and statement
feed the progress book (progress.py) that the Progress RPC reads.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from asyncio import CancelledError as _Cancelled
from dataclasses import asdict, dataclass, field, replace
from typing import AsyncIterator, Callable

import grpc
import numpy as np

from llm_sidecar import hops, metrics
from llm_sidecar.cache import CachedEmbedding, CachedGeneration, ResultCache, embedding_keys, generation_key
from llm_sidecar.chunking import (DEFAULT_MAX_CHARS, DEFAULT_SEPARATORS, Chunk as TextPiece, TokenChunker,
                                  character_chunks)
from llm_sidecar.config import SidecarConfig
from llm_sidecar.engines.base import (CHARS_PER_TOKEN, FAILED, READY, EmbeddingEngine, Engine,
                                         EngineFailed, EngineRestarting, GenerateFinal, GenerateParams,
                                         GenerationEngine, RerankEngine)
from llm_sidecar.history import Bounds, History, Record
from llm_sidecar.metering import Metered, UsageBook
from llm_sidecar.progress import Key as ProgressKey, ProgressBook
from llm_sidecar.tenants import Admission, LimitExceeded, Unauthenticated, authenticate
from llm_inference.v1 import inference_pb2 as pb
from llm_inference.v1 import inference_pb2_grpc as pb_grpc
from llm_inference.v1.constraints import ConstraintError, check_choices, load_schema
from llm_inference.v1.params import PARAMS

log = logging.getLogger("llm_sidecar")

_TASKS = {"generate": pb.TASK_GENERATE, "embed": pb.TASK_EMBED, "rerank": pb.TASK_RERANK}
_STATES = {"loading": pb.MODEL_STATE_LOADING, READY: pb.MODEL_STATE_READY, FAILED: pb.MODEL_STATE_FAILED}
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
           "stop_string": pb.FINISH_REASON_STOP_STRING, "cancelled": pb.FINISH_REASON_CANCELLED}
# RPC -> the `kind` of its records in the recent-requests window (history.py; list_models and usage
# go in a lane of their own, so they cannot push out model requests); Requests is not recorded
_KINDS = {"Generate": "generate", "Embed": "embed", "Rerank": "rerank", "ListModels": "list_models", "Usage": "usage"}
# Documents one Rerank request may score: a cross-encoder reads each with the query, so a long list
# is a mistake (rerank the top candidates of a cheaper retrieval); the FDW sends at most this many.
MAX_RERANK_DOCUMENTS = 10_000

# Trailing metadata: the sidecar's marks (see the status section of the proto).
# RESOURCE_EXHAUSTED that admission sent: the tenant's queue is full, back off and retry.
ADMISSION_REJECTED = (("llmfdw-rejected", "queue-full"),)
# UNAVAILABLE that the sidecar sent (it is up): why it cannot serve the request now.
UNAVAILABLE_KEY = "llmfdw-unavailable"
MODEL_LOADING = ((UNAVAILABLE_KEY, "loading"),)     # the model is loading: retry shortly
MODEL_FAILED = ((UNAVAILABLE_KEY, "failed"),)       # failed to load / engine broke: the sidecar exits
RESTARTING = ((UNAVAILABLE_KEY, "restarting"),)     # the engine's process died and is starting again
DRAINING = ((UNAVAILABLE_KEY, "draining"),)         # shutting down (SIGTERM): retry once restarted


# What a request can do wrong, or why it cannot be served now; _STATUS gives each its code.
class ModelNotFound(Exception):
    """The request names a model this sidecar does not serve."""


class BadArgument(ValueError):
    """A request field is wrong; the message names the field."""


class WrongTask(Exception):
    """The model exists but does the other task (Generate on an embedding model, say)."""


class ModelLoading(Exception):
    """The model is still loading."""


class ModelFailed(Exception):
    """The model failed to load; the sidecar is about to exit (2)."""


class Draining(Exception):
    """The sidecar is shutting down and takes no new Generate/Embed calls."""


# exception type -> (status code, trailing metadata).  Looked up along the exception's MRO, so
# the most specific entry wins (BadArgument before ValueError).  Anything else is INTERNAL.
_STATUS: dict[type[BaseException], tuple[grpc.StatusCode, tuple[tuple[str, str], ...]]] = {
    ModelNotFound: (grpc.StatusCode.NOT_FOUND, ()),
    BadArgument: (grpc.StatusCode.INVALID_ARGUMENT, ()),
    ValueError: (grpc.StatusCode.INVALID_ARGUMENT, ()),   # an engine refusing the request
    WrongTask: (grpc.StatusCode.FAILED_PRECONDITION, ()),
    ModelLoading: (grpc.StatusCode.UNAVAILABLE, MODEL_LOADING),
    ModelFailed: (grpc.StatusCode.UNAVAILABLE, MODEL_FAILED),
    EngineFailed: (grpc.StatusCode.UNAVAILABLE, MODEL_FAILED),
    EngineRestarting: (grpc.StatusCode.UNAVAILABLE, RESTARTING),
    Draining: (grpc.StatusCode.UNAVAILABLE, DRAINING),
    Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, ()),
    LimitExceeded: (grpc.StatusCode.RESOURCE_EXHAUSTED, ADMISSION_REJECTED),
}


def _caller_name(name: str, most: int = 200) -> str:
    """A model name the caller sent, for an error message: cut short, since the message travels
    in gRPC's trailing metadata, which a 20,000-character name would overflow."""
    return repr(name) if len(name) <= most else f"{name[:most]!r}... ({len(name):,} characters)"


def status_for(err: Exception) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The status code, details and trailing metadata a failed call ends with."""
    for cls in type(err).__mro__:
        if cls in _STATUS:
            code, metadata = _STATUS[cls]
            details = f"the model engine failed: {err}" if isinstance(err, EngineFailed) else str(err)
            return code, details, metadata
    return grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}", ()


def _outcome(err: BaseException, context: grpc.aio.ServicerContext) -> str:
    """A failed request's status for metrics and the log: the code's name.  A handler that was
    cancelled (the caller cancelled, or its deadline passed) never sends a code of its own."""
    if isinstance(err, (GeneratorExit, _Cancelled)):
        left = context.time_remaining()
        return "DEADLINE_EXCEEDED" if left is not None and left <= 0 else "CANCELLED"
    if isinstance(err, Exception):
        return status_for(err)[0].name
    return type(err).__name__


@dataclass
class _Call:
    """One request while it is served: who, what, and what it cost so far."""
    rpc: str
    model: str
    request_id: str
    started: float = field(default_factory=time.monotonic)
    arrived_ns: int = field(default_factory=time.time_ns)   # wall clock: the record's `at`
    first_token: float | None = None   # seconds from started to the first generated text
    session: str = ""          # RequestContext.session: admission's fairness unit within the tenant
    tenant: str = ""           # set once authenticated
    metered: bool = False      # the model is served: the request goes into the usage book
    status: str = "OK"
    usage: Metered = field(default_factory=Metered)
    progress: ProgressKey | None = None   # its statement in the progress book (progress.py), if tracked
    marks: hops.Marks | None = None       # per-hop timestamps when LLMFDW_HOPS=1 (hops.py), else None


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, engines: dict[str, Engine], config: SidecarConfig,
                 on_engine_failure: Callable[[Exception], None]) -> None:
        self.engines = engines
        self.config = config
        self.on_engine_failure = on_engine_failure
        # a generation model runs slots() requests at once (`parallel` per session); the embedding
        # batcher takes all
        self.admission = Admission({name: e.config.slots() if e.config.task == "generate" else None
                                    for name, e in engines.items()},
                                   {name: e.config.reserve() for name, e in engines.items()})
        self.book = UsageBook()
        # a window per tenant; tenants named in the config keep theirs when others are made (history.py)
        self.history = History(config.history.max_rows, config.history.max_age_seconds,
                               config.history.max_tenants, configured=(t.name for t in config.tenants))
        self.cache = ResultCache(config.cache.max_bytes)   # deterministic answers (cache.py)
        self.progress = ProgressBook()                     # running statements (progress.py)
        self._weights: dict[str, str] = {}                 # model -> its weights' path (cache revisions)
        self.draining = False
        self._active = 0                 # calls being served (every RPC)
        self._idle = asyncio.Event()
        self._idle.set()

    async def drain(self, grace: float) -> bool:
        """Refuse new Generate/Embed calls; wait up to `grace` seconds for the
        calls being served.  True when none is left.  (Done here rather than by
        grpc's own graceful stop, which stalled streaming calls in tests.)
        ListModels and Usage are still answered while draining: they hold no
        engine and end at once, and ListModels shows a caller why the models
        refuse work (a model that FAILED, say)."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
            return True
        except asyncio.TimeoutError:
            return False

    # -- helpers ---------------------------------------------------------

    def _engine(self, name: str, task: str) -> Engine:
        engine = self.engines.get(name)
        if engine is None:
            served = ", ".join(sorted(self.engines)) or "none"
            raise ModelNotFound(f"model {_caller_name(name)} is not served by this sidecar (it serves: {served})")
        if engine.config.task != task:
            raise WrongTask(f"model {name!r} is a {engine.config.task} model; it cannot {task}")
        if engine.state == FAILED:
            raise ModelFailed(f"model {name!r} failed to load: {engine.error}")
        if engine.state != READY:   # loading, or starting again after its process died (error says)
            why = f"is starting again ({engine.error})" if engine.error else "is still loading"
            raise ModelLoading(f"model {name!r} {why}; retry shortly")
        return engine

    @staticmethod
    def _params(engine: Engine, p: pb.GenerationParams) -> GenerateParams:
        """The request's parameters: for each one of the registry (llm_inference.v1.params.PARAMS)
        the request's field if set, else the model's YAML default, else the registry's default
        (else none: the engine's own), each in its range (which the FDW checks too), and
        max_tokens within the model's context."""
        values: dict[str, int | float] = {}
        for param in PARAMS:
            value = getattr(p, param.name) if p.HasField(param.name) else getattr(engine.config.defaults, param.name)
            value = param.default if value is None else value
            if value is None:
                continue
            problem = param.problem(value)
            if problem:
                raise BadArgument(problem)
            values[param.name] = value
        if values["max_tokens"] > engine.config.context_length:
            raise BadArgument(f"max_tokens must be at most the model's context length "
                              f"{engine.config.context_length}, got {values['max_tokens']}")
        for i, stop in enumerate(p.stop):
            if not stop:
                raise BadArgument(f"stop strings must not be empty (stop[{i}], 0-based, is '')")
        return GenerateParams(values, stop=list(p.stop))

    def _constrained(self, params: GenerateParams, request: pb.GenerateRequest) -> GenerateParams:
        """`params` with the request's constraint (a JSON Schema or choices), checked as the FDW
        checks it (llm_inference.v1.constraints): a schema that is not valid JSON Schema, or that
        uses a keyword the engines would not enforce, is refused here, before any token is spent."""
        if not request.json_schema and not request.choices:
            return params
        if request.json_schema and request.choices:
            raise BadArgument("json_schema and choices cannot both be given: choose one constraint")
        try:
            if request.json_schema:
                self._check_size(request.json_schema, "json_schema")
                return replace(params, json_schema=load_schema(request.json_schema))
            return replace(params, choices=tuple(check_choices(list(request.choices))))
        except ConstraintError as err:
            raise BadArgument(str(err)) from None

    def _check_size(self, text: str, what: str) -> None:
        """INVALID_ARGUMENT when `text` is over max_input_bytes of UTF-8.  A character is 1 to 4
        bytes, so a text of at most a quarter of the limit in characters passes unencoded."""
        limit = self.config.max_input_bytes
        if len(text) * 4 <= limit:
            return
        size = len(text.encode("utf-8"))
        if size > limit:
            raise BadArgument(f"{what} is {size:,} bytes, over the limit of {limit:,} bytes per text "
                              f"(max_input_bytes in the sidecar config): split it into smaller pieces "
                              f"or shorten it, or raise max_input_bytes")

    def _checked_inputs(self, inputs, field: str = "inputs") -> list[str]:
        """An Embed or Chunk request's inputs (a Rerank request's documents: `field`): at least
        one, each within max_input_bytes (INVALID_ARGUMENT naming the input otherwise)."""
        texts = list(inputs)
        if not texts:
            raise BadArgument(f"{field} must not be empty")
        for i, text in enumerate(texts):
            self._check_size(text, f"{field}[{i}] (0-based)")
        return texts

    @staticmethod
    def _check_fits(engine: Engine, chars: int) -> None:
        """INVALID_ARGUMENT for a prompt that cannot fit the model's context (see the module docstring)."""
        most = engine.context_length * CHARS_PER_TOKEN
        if chars > most:
            raise BadArgument(f"the prompt and system message are {chars:,} characters: more than the "
                              f"context of model {engine.name!r} ({engine.context_length} tokens) can hold "
                              f"(at most {most:,} characters are taken); shorten them")

    def _label(self, model: str) -> str:
        """The model as a metric label: names the sidecar does not serve are one label, so a
        caller cannot grow the metrics without bound by sending made-up names."""
        return model if model in self.engines else "unknown"

    @contextlib.asynccontextmanager
    async def _serving(self, rpc: str, model: str, ctx: pb.RequestContext, context: grpc.aio.ServicerContext,
                       refuse_when_draining: bool = True) -> AsyncIterator[_Call]:
        """The one path of every RPC: refuse while draining (when asked), authenticate; on the way
        out, end a failed call with its status (_STATUS), then usage book, metrics, log line."""
        call = _Call(rpc, model, ctx.request_id or uuid.uuid4().hex[:16], session=ctx.session, marks=hops.begin())
        in_flight = metrics.IN_FLIGHT.labels(rpc, self._label(model))
        in_flight.inc()
        self._active += 1
        self._idle.clear()
        ended = False

        def end() -> None:
            nonlocal ended
            ended = True
            in_flight.dec()
            self._active -= 1
            if not self._active:
                self._idle.set()
            self._finish(call, ctx)

        try:
            if self.draining and refuse_when_draining:
                raise Draining("the sidecar is shutting down and takes no new requests; retry shortly")
            call.tenant = authenticate(self.config, ctx.tenant, ctx.token)
            yield call
        except Exception as err:
            call.status = _outcome(err, context)
            if isinstance(err, EngineFailed):
                self.on_engine_failure(err)
            code, details, metadata = status_for(err)
            end()   # counted before the caller has its status: a scrape after the error sees it
            await context.abort(code, details, trailing_metadata=metadata)   # raises AbortError
        except BaseException as err:   # cancelled, or the stream closed: no status to send
            call.status = _outcome(err, context)
            raise
        finally:
            if not ended:
                hops.mark(call.marks, "done")
                end()
                if call.marks is not None:   # a successful call: its marks go back with its status
                    hops.mark(call.marks, "finished")
                    context.set_trailing_metadata(hops.trailer(call.marks))

    @contextlib.asynccontextmanager
    async def _slot(self, call: _Call, engine: Engine) -> AsyncIterator[None]:
        """Wait for an engine slot within the tenant's limits; the wait is queue time."""
        limits = self.config.limits(call.tenant)
        async with self.admission.slot(call.tenant, limits, engine.name, call.session) as waited:
            call.usage.queue_ns = waited
            yield

    def _finish(self, call: _Call, ctx: pb.RequestContext) -> None:
        """Meter, count and log a finished request (once, whatever its outcome)."""
        u, model, tenant = call.usage, call.model, call.tenant
        self.progress.finished(call.progress, id(call), call.status)
        duration = time.monotonic() - call.started
        if call.metered and tenant:
            self.book.record(tenant, model, call.status == "OK", u)
            metrics.INPUT_TOKENS.labels(model, tenant).inc(u.input_tokens)
            metrics.OUTPUT_TOKENS.labels(model, tenant).inc(u.output_tokens)
            metrics.EMBEDDED.labels(model, tenant).inc(u.embedded_inputs)
            metrics.COMPUTE.labels(model, tenant).inc(u.compute_ns / 1e9)
        metrics.REQUESTS.labels(call.rpc, self._label(model), tenant, call.status).inc()
        metrics.LATENCY.labels(call.rpc, self._label(model)).observe(duration)
        log.info(json.dumps({"event": "request", "rpc": call.rpc, "request_id": call.request_id,
                             "model": model, "tenant": tenant or ctx.tenant, "authenticated": bool(tenant),
                             "database": ctx.database, "role": ctx.role, "session": ctx.session,
                             "status": call.status,
                             "duration_ms": round(duration * 1000, 3), **asdict(u)}))
        if tenant and call.rpc in _KINDS:
            self.history.record(Record(
                # microseconds, timestamptz's precision: a bound compares the same here and in Postgres
                at_unix_ns=call.arrived_ns // 1000 * 1000, tenant=tenant, model=self._label(model) if model else "",
                kind=_KINDS[call.rpc], status=call.status, queue_ns=u.queue_ns,
                first_token_ns=None if call.first_token is None else int(call.first_token * 1e9),
                total_ns=int(duration * 1e9), input_tokens=u.input_tokens, output_tokens=u.output_tokens,
                embedded_inputs=u.embedded_inputs, compute_ns=u.compute_ns, request_id=call.request_id))

    # -- RPCs ------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        async with self._serving("Generate", request.model, request.context, context) as call:
            engine = self._engine(request.model, "generate")
            assert isinstance(engine, GenerationEngine)
            call.metered = True
            params = self._constrained(self._params(engine, request.params), request)
            self._check_size(request.prompt, "the prompt")
            self._check_size(request.system, "the system message")
            self._check_fits(engine, len(request.prompt) + len(request.system))
            self._track(call, request.context, 1, embeds=False)
            key = self._generation_key(call, engine, request, params)
            hit = self._lookup("Generate", call, [key])[0] if key is not None else None
            if isinstance(hit, CachedGeneration):
                for message in self._cached_generation(call, engine, hit):
                    yield message
                return
            hops.mark(call.marks, "validated")
            async with self._slot(call, engine):
                hops.mark(call.marks, "admitted")
                metrics.QUEUE_TIME.labels("Generate", engine.name).observe(call.usage.queue_ns / 1e9)
                stream = engine.generate(request.prompt, request.system, request.raw, params, call.usage)
                first = True
                parts: list[str] = []   # the answer so far, for the cache
                try:
                    async for event in stream:
                        if isinstance(event, GenerateFinal):
                            hops.mark(call.marks, "final")
                            u = call.usage
                            if key is not None and event.finish_reason != "cancelled":
                                self.cache.put(key, CachedGeneration("".join(parts), event.finish_reason,
                                                                     u.input_tokens, u.output_tokens))
                            yield pb.GenerateResponse(final=pb.GenerateFinal(
                                finish_reason=_FINISH[event.finish_reason], model=engine.name,
                                usage=pb.Usage(input_tokens=u.input_tokens, output_tokens=u.output_tokens,
                                               queue_ns=u.queue_ns, compute_ns=u.compute_ns)))
                        else:
                            if first:
                                hops.mark(call.marks, "first_token")
                                call.first_token = time.monotonic() - call.started
                                metrics.FIRST_TOKEN.labels(engine.name).observe(call.first_token)
                                first = False
                            if key is not None:
                                parts.append(event)
                            yield pb.GenerateResponse(delta=event)
                finally:
                    await stream.aclose()

    async def Embed(self, request: pb.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> AsyncIterator[pb.EmbedResponse]:
        async with self._serving("Embed", request.model, request.context, context) as call:
            engine = self._engine(request.model, "embed")
            assert isinstance(engine, EmbeddingEngine)
            call.metered = True
            inputs = self._checked_inputs(request.inputs)
            self._track(call, request.context, len(inputs), embeds=True)
            u = call.usage
            keys = self._embedding_keys(call, engine, request)
            todo = list(range(len(inputs)))   # the inputs the engine computes: those not in the cache
            if keys is not None:
                found = self._lookup("Embed", call, keys)
                hits = [(i, v) for i, v in enumerate(found) if isinstance(v, CachedEmbedding)]
                todo = [i for i, v in enumerate(found) if not isinstance(v, CachedEmbedding)]
                if hits:
                    message = self._embeddings(hits, request.normalize)
                    u.cache_hits += len(hits)
                    u.embedded_inputs += len(hits)
                    u.input_tokens += message.usage.input_tokens
                    yield message
            if not todo:
                return
            hops.mark(call.marks, "validated")
            async with self._slot(call, engine):
                hops.mark(call.marks, "admitted")
                stream = engine.embed([inputs[i] for i in todo], call.usage)
                first = True
                try:
                    async for group in stream:
                        hops.mark(call.marks, "delivered")
                        group = [(todo[j], result) for j, result in group]
                        if keys is not None:
                            for i, result in group:
                                self.cache.put(keys[i], CachedEmbedding(
                                    np.array(result.vector, dtype=np.float32), result.input_tokens, result.truncated))
                        message = self._embeddings(group, request.normalize)
                        if first:   # the request's queue time goes in its engine's first message
                            first = False
                            message.usage.queue_ns = u.queue_ns
                            metrics.QUEUE_TIME.labels("Embed", engine.name).observe(u.queue_ns / 1e9)
                        u.embedded_inputs += len(message.embeddings)
                        u.input_tokens += message.usage.input_tokens
                        u.compute_ns += message.usage.compute_ns
                        hops.mark(call.marks, "serialized")
                        yield message
                        hops.mark(call.marks, "sent")
                finally:
                    await stream.aclose()

    @staticmethod
    def _embeddings(group, normalize: bool) -> pb.EmbedResponse:
        out, compute = [], 0
        for index, result in group:
            v = result.vector
            if normalize:
                norm = float(np.linalg.norm(v))
                v = v / norm if norm > 0 else v
            out.append(pb.Embedding(index=index, vector=v.astype("<f4").tobytes(), dimensions=v.shape[0],
                                    input_tokens=result.input_tokens, truncated=result.truncated))
            compute += result.compute_ns
        return pb.EmbedResponse(embeddings=out, usage=pb.Usage(
            input_tokens=sum(e.input_tokens for e in out), compute_ns=compute))

    # ListModels, Usage and Requests are answered while draining (see drain).

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        async with self._serving("ListModels", "", request.context, context, refuse_when_draining=False):
            models = []
            for engine in self.engines.values():
                cfg = engine.config
                models.append(pb.ModelInfo(
                    name=cfg.name, task=_TASKS[cfg.task], engine=cfg.engine, dimensions=engine.dimensions,
                    context_length=engine.context_length, state=_STATES[engine.state], error=engine.error,
                    source=str(cfg.source.get("package") or cfg.source.get("path", ""))))
            return pb.ListModelsResponse(models=models)

    async def Usage(self, request: pb.UsageRequest, context: grpc.aio.ServicerContext) -> pb.UsageResponse:
        async with self._serving("Usage", "", request.context, context, refuse_when_draining=False) as call:
            rows = [pb.UsageRow(tenant=call.tenant, model=model, requests=t.requests, errors=t.errors,
                                input_tokens=t.input_tokens, output_tokens=t.output_tokens,
                                embedded_inputs=t.embedded_inputs, queue_ns=t.queue_ns, compute_ns=t.compute_ns,
                                cache_hits=t.cache_hits)
                    for model, t in self.book.rows(call.tenant)]
            return pb.UsageResponse(rows=rows, since_unix_ns=self.book.since_unix_ns)

    async def Requests(self, request: pb.RequestsRequest,
                       context: grpc.aio.ServicerContext) -> pb.RequestsResponse:
        """The calling tenant's records in the window (history.py), within the request's bounds."""
        async with self._serving("Requests", "", request.context, context, refuse_when_draining=False) as call:
            bounds = Bounds(
                after=request.after_unix_ns if request.HasField("after_unix_ns") else None,
                after_inclusive=request.after_inclusive,
                before=request.before_unix_ns if request.HasField("before_unix_ns") else None,
                before_inclusive=request.before_inclusive)
            rows = [pb.RequestRecord(
                        at_unix_ns=r.at_unix_ns, tenant=r.tenant, model=r.model, kind=r.kind, status=r.status,
                        queue_ns=r.queue_ns, first_token_ns=r.first_token_ns, total_ns=r.total_ns,
                        input_tokens=r.input_tokens, output_tokens=r.output_tokens,
                        embedded_inputs=r.embedded_inputs, compute_ns=r.compute_ns, request_id=r.request_id)
                    for r in self.history.rows(call.tenant, bounds)]
            return pb.RequestsResponse(rows=rows, max_rows=self.history.max_rows,
                                       max_age_seconds=self.history.max_age_seconds)

    # -- Chunk: splitting texts for the vectorizer (chunking.py) ------------

    async def Chunk(self, request: pb.ChunkRequest, context: grpc.aio.ServicerContext) -> pb.ChunkResponse:
        """Each input's chunks.  Tokenizing runs in a worker thread (the Rust tokenizer runs
        without the GIL) and outside the engine's batch slots: it takes no model compute, so it
        never waits behind embedding batches nor holds them up."""
        async with self._serving("Chunk", request.model, request.context, context) as call:
            engine = self._engine(request.model, "embed")
            call.metered = True
            inputs = self._checked_inputs(request.inputs)
            self._track(call, request.context, len(inputs), embeds=True)
            started = time.monotonic_ns()
            if request.mode == pb.CHUNK_MODE_CHARACTERS:
                results, read = await asyncio.to_thread(self._character_chunks, request, inputs), 0
            else:
                chunker, size = self._token_chunker(engine, request)
                results, read = await asyncio.to_thread(chunker.chunk, inputs, size, request.overlap_tokens)
            call.usage.input_tokens = read
            call.usage.compute_ns = time.monotonic_ns() - started
            return pb.ChunkResponse(
                results=[pb.ChunkedInput(index=i, chunks=[
                    pb.TextChunk(chunk_seq=c.seq, text=c.text, start=c.start, end=c.end, tokens=c.tokens)
                    for c in chunks]) for i, chunks in enumerate(results)],
                usage=pb.Usage(input_tokens=read, compute_ns=call.usage.compute_ns))

    @staticmethod
    def _token_chunker(engine: Engine, request: pb.ChunkRequest) -> tuple[TokenChunker, int]:
        """The model's chunker and the chunk size in tokens: at most what the model reads."""
        chunker = getattr(engine, "chunker", None)
        if chunker is None:
            raise WrongTask(f"model {engine.name!r} runs on engine {engine.config.engine}, which cannot "
                            f"chunk by tokens; use mode CHARACTERS")
        most = chunker.max_tokens
        size = request.max_tokens if request.HasField("max_tokens") else most
        if not 1 <= size <= most:
            raise BadArgument(f"max_tokens must be between 1 and {most} (what model {engine.name!r} reads of "
                              f"a text: its context less its special tokens), got {size}")
        if request.overlap_tokens >= size:
            raise BadArgument(f"overlap_tokens must be below max_tokens ({size}), got {request.overlap_tokens}")
        return chunker, size

    @staticmethod
    def _character_chunks(request: pb.ChunkRequest, inputs: list[str]) -> list[list[TextPiece]]:
        size = request.max_chars if request.HasField("max_chars") else DEFAULT_MAX_CHARS
        if size < 1:
            raise BadArgument(f"max_chars must be at least 1, got {size}")
        if request.overlap_chars >= size:
            raise BadArgument(f"overlap_chars must be below max_chars ({size}), got {request.overlap_chars}")
        separators = list(request.separators) or list(DEFAULT_SEPARATORS)
        if not all(separators):
            raise BadArgument("separators must not be empty strings")
        return [character_chunks(text, size, request.overlap_chars, separators) for text in inputs]

    # -- Rerank: a cross-encoder scores (query, document) pairs (engines/cross_encoder.py) --

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        """Each document's score against the query, in the documents' order.  Checked, admitted
        and metered as Embed is; a cancelled call stops the engine at its next batch."""
        async with self._serving("Rerank", request.model, request.context, context) as call:
            engine = self._engine(request.model, "rerank")
            assert isinstance(engine, RerankEngine)
            call.metered = True
            documents = self._checked_inputs(request.documents, "documents")
            if len(documents) > MAX_RERANK_DOCUMENTS:
                raise BadArgument(f"documents holds {len(documents):,} texts, over the limit of "
                                  f"{MAX_RERANK_DOCUMENTS:,} per request: rerank the top candidates of a "
                                  f"cheaper retrieval (llm.search does), or split the list")
            if not request.query:
                raise BadArgument("query must not be empty")
            self._check_size(request.query, "the query")
            self._track(call, request.context, len(documents), embeds=False)
            async with self._slot(call, engine):
                result = await engine.rerank(request.query, documents, call.usage)
            u = call.usage
            return pb.RerankResponse(scores=result.scores, usage=pb.Usage(
                input_tokens=result.input_tokens, queue_ns=u.queue_ns, compute_ns=u.compute_ns))

    # -- Progress (progress.py) and the result cache (cache.py) ------------

    def _track(self, call: _Call, ctx: pb.RequestContext, items: int, *, embeds: bool) -> None:
        """Enter a request into its statement's progress (when the context names one): it stands
        for `items` prompts or texts, done as it ends (embeds: as its texts come back)."""
        call.progress = self.progress.started(
            call.tenant, ctx.backend_pid, ctx.statement, ctx.statement_total, id(call), items, call.usage,
            embeds=embeds, model=call.model, database=ctx.database, role=ctx.role)

    async def Progress(self, request: pb.ProgressRequest, context: grpc.aio.ServicerContext) -> pb.ProgressResponse:
        """The calling tenant's running statements (never another tenant's)."""
        async with self._serving("Progress", "", request.context, context, refuse_when_draining=False) as call:
            rows = [pb.StatementProgress(
                        tenant=s.stmt.tenant, backend_pid=s.stmt.pid, statement=s.stmt.statement,
                        database=s.stmt.database, role=s.stmt.role, model=s.stmt.model,
                        started_unix_ns=s.stmt.started_ns, updated_unix_ns=s.stmt.updated_ns,
                        total=s.stmt.total or None, done=s.done, requests=s.stmt.requests,
                        running=len(s.stmt.running), errors=s.stmt.errors, input_tokens=s.input_tokens,
                        output_tokens=s.output_tokens, cache_hits=s.cache_hits, elapsed_ns=s.elapsed_ns,
                        remaining_ns=s.remaining_ns)
                    for s in self.progress.rows(call.tenant)]
            return pb.ProgressResponse(rows=rows, quiet_seconds=self.progress.quiet_seconds)

    def _revision(self, engine: Engine) -> str:
        """The revision of the engine's weights (cache.model_revision), part of every key."""
        path = self._weights.get(engine.name)
        if path is None:
            path = self._weights[engine.name] = engine.config.path()
        return self.cache.revision(path)

    def _generation_key(self, call: _Call, engine: Engine, request: pb.GenerateRequest,
                        params: GenerateParams) -> bytes | None:
        """The cache key of a generation whose answer is always the same (greedy decoding, or a
        fixed seed: the request's or the model's default); None when it may differ from one run
        to the next, when the cache is off, or when the caller opted out (context.no_cache)."""
        if not self.cache.enabled or request.context.no_cache:
            return None
        if params.values.get("temperature") != 0 and "seed" not in params.values:
            return None
        return generation_key(call.tenant, self._revision(engine), request)

    def _embedding_keys(self, call: _Call, engine: Engine, request: pb.EmbedRequest) -> list[bytes] | None:
        """One cache key per input; None when the cache is off or the caller opted out."""
        if not self.cache.enabled or request.context.no_cache:
            return None
        return embedding_keys(call.tenant, self._revision(engine), request)

    def _lookup(self, rpc: str, call: _Call, keys: list[bytes]) -> list[CachedGeneration | CachedEmbedding | None]:
        """The cached answers of `keys` (None for a miss), counted as hits and misses."""
        found = [self.cache.get(k) for k in keys]
        hits = sum(v is not None for v in found)
        if hits:
            metrics.CACHE_HITS.labels(rpc, call.model, call.tenant).inc(hits)
        if hits < len(found):
            metrics.CACHE_MISSES.labels(rpc, call.model, call.tenant).inc(len(found) - hits)
        return found

    @staticmethod
    def _cached_generation(call: _Call, engine: Engine, hit: CachedGeneration) -> list[pb.GenerateResponse]:
        """A cached answer as a stream: its whole text as one delta, then the final message with
        the answer's token counts and no queue or engine time, metered so (and as a hit)."""
        call.usage.cache_hits = 1
        call.usage.input_tokens, call.usage.output_tokens = hit.input_tokens, hit.output_tokens
        call.first_token = time.monotonic() - call.started
        final = pb.GenerateResponse(final=pb.GenerateFinal(
            finish_reason=_FINISH[hit.finish_reason], model=engine.name,
            usage=pb.Usage(input_tokens=hit.input_tokens, output_tokens=hit.output_tokens)))
        return ([pb.GenerateResponse(delta=hit.text)] if hit.text else []) + [final]
