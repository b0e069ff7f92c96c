"""The interface every engine implements, whatever runs the model.

The servicer only talks to these classes; an engine never sees protobuf.
"""
from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Mapping

import numpy as np

from llm_sidecar.config import DTYPES, ModelConfig
from llm_sidecar.metering import Metered

LOADING, READY, FAILED = "loading", "ready", "failed"
# An embedding model reads at most its context of tokens, and in natural text a token spans
# 4-6 characters (whitespace included).  Cutting a text at 32 characters per token of context
# before tokenizing it bounds the work one text can cause (a 10 MB text once took 15 s to
# tokenize, stalling every caller) while every text whose first `context` tokens average under
# 32 characters is embedded exactly as before.
CHARS_PER_TOKEN = 32
# torch's CPU matmuls go through oneDNN, which keeps a compiled primitive per input shape in two
# caches of 1,024 entries each by default: ideep's (LRU_CACHE_CAPACITY) and oneDNN's own.  An
# embedding batch is [texts, longest] and every layer flattens it to texts x longest rows, so
# nearly every batch is a new shape: under a 15-minute mixed soak these caches took 886 MB and
# kept growing (a jemalloc heap profile: docs/soak-heap-profile.txt).  128 entries keep repeated
# shapes (short single-text queries) hot and cost no measurable speed (docs/benchmarks.md).
TORCH_CACHE_ENV = {"LRU_CACHE_CAPACITY": "128", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128"}


def bound_torch_caches() -> None:
    """Cap torch's per-shape kernel caches (TORCH_CACHE_ENV; an operator's own value wins).
    Call before torch runs its first matmul: both caches read their capacity once."""
    for key, value in TORCH_CACHE_ENV.items():
        os.environ.setdefault(key, value)


def cpu_bf16() -> str:
    """Why this CPU runs bfloat16 fast ("" when it cannot): AVX512-BF16 or AMX-BF16 in
    /proc/cpuinfo, or oneDNN's own check (torch.ops.mkldnn._is_mkldnn_bf16_supported)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        flags = []
    found = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    if found:
        return " and ".join(found)
    try:
        import torch
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return "oneDNN reports native bf16"
    except Exception:
        pass
    return ""


def check_dtype(name: str, dtype: str | None, *, device: str = "cpu") -> str:
    """The dtype an embedding model runs in (float32 when its config names none; auto: bfloat16
    where the hardware runs it natively, else float32); a dtype this
    machine cannot run fast is an error naming the key, raised at load, so the sidecar does not
    start (it exits 2) rather than silently running a slow or emulated model."""
    dtype = dtype or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"model {name}: dtype must be one of {DTYPES}, not {dtype!r}")
    if dtype == "auto":
        return "bfloat16" if device != "cpu" or cpu_bf16() else "float32"
    if dtype == "bfloat16" and device == "cpu" and not cpu_bf16():
        raise ValueError(f"model {name}: dtype: bfloat16 needs a CPU with AVX512-BF16 or AMX-BF16 "
                         f"(neither is in /proc/cpuinfo flags here); set dtype: float32 for this model")
    return dtype


def readable_part(text: str, context: int) -> tuple[str, bool]:
    """The part of `text` that an embedding model with `context` tokens reads (see
    CHARS_PER_TOKEN), and whether anything was cut off (then the result is truncated)."""
    limit = context * CHARS_PER_TOKEN
    return (text[:limit], True) if len(text) > limit else (text, False)


@dataclass(frozen=True)
class GenerateParams:
    """A request's generation parameters as the servicer resolved and checked them: `values`
    holds each parameter of the registry (llm_inference.v1.params.PARAMS) that has a value (the
    request's, else the model's YAML default, else the registry's) under the registry's name;
    one with none is absent, so the engine's own default applies.  max_tokens and temperature
    always have one."""

    values: Mapping[str, int | float]
    stop: list[str] = field(default_factory=list)
    # Constrained output (llm_inference.v1.constraints, checked by the servicer), at most one:
    # the answer is JSON valid against json_schema, or exactly one of choices.
    json_schema: Mapping[str, Any] | None = None
    choices: tuple[str, ...] = ()

    def named(self, renames: Mapping[str, str]) -> dict[str, int | float]:
        """`values` under an engine's own names: `renames` maps each registry name the engine
        spells differently (llama.cpp's repeat_penalty) and leaves the others as they are."""
        return {renames.get(name, name): value for name, value in self.values.items()}


@dataclass
class GenerateFinal:
    finish_reason: str       # "stop" | "length" | "stop_string" | "cancelled"
    input_tokens: int
    output_tokens: int
    compute_ns: int


@dataclass
class EmbeddingResult:
    vector: np.ndarray       # float32
    input_tokens: int
    truncated: bool
    compute_ns: int          # this input's share of its batch's engine time


class EngineFailed(RuntimeError):
    """The engine can no longer serve: the sidecar reports NOT_SERVING and exits."""


class EngineRestarting(RuntimeError):
    """The engine's process died under the request and is being started again (the sidecar
    stays up): the request is lost, a retry shortly is served by the new process."""


class Engine(abc.ABC):
    engine_name = ""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.state = LOADING
        self.error = ""
        self.dimensions = 0
        self.context_length = config.context_length
        # Set by the sidecar: called on its event loop when the engine can no longer serve and
        # will not recover (a request that meets a dead engine raises EngineFailed, or
        # EngineRestarting where the engine starts its process again)
        self.on_failure: Callable[[EngineFailed], None] | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @abc.abstractmethod
    async def load(self) -> None:
        """Load the weights; runs once at start, before the model is READY."""

    async def close(self) -> None:
        """Release the engine (on shutdown)."""


class GenerationEngine(Engine):
    @abc.abstractmethod
    def generate(self, prompt: str, system: str, raw: bool, params: GenerateParams,
                 usage: Metered) -> AsyncIterator[str | GenerateFinal]:
        """Yield text deltas, then one GenerateFinal.  Closing the iterator
        (the caller went away) must stop the work within a decoding step.
        Keep `usage` current as the work goes (tokens, compute; add any wait
        inside the engine to queue_ns), so that a cancelled request is metered too."""


class EmbeddingEngine(Engine):
    @abc.abstractmethod
    def embed(self, texts: list[str], usage: Metered) -> AsyncIterator[list[tuple[int, EmbeddingResult]]]:
        """Yield groups of (index into texts, result) as engine batches finish.
        Add to usage.queue_ns the time the texts waited inside the engine before
        it started on them; per-text tokens and compute travel in the results."""


@dataclass
class RerankResult:
    scores: list[float]      # one per document, in the order given
    input_tokens: int        # tokens of every (query, document) pair read


class RerankEngine(Engine):
    @abc.abstractmethod
    async def rerank(self, query: str, documents: list[str], usage: Metered) -> RerankResult:
        """Score each document against the query.  Cancelling the awaiting task must stop the
        work within one engine batch.  Add queue and compute time to `usage` as the work goes."""
