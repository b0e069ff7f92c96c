"""Engines behind one interface (base.py); build() picks one from the config.

Each engine module is imported only when a model uses it, so a CPU host never
imports vLLM and a GPU host never needs llama.cpp.
"""
from __future__ import annotations

import importlib

from llm_sidecar.config import ModelConfig
from llm_sidecar.engines.base import Engine

_CLASSES = {
    ("llama_cpp", "generate"): ("llm_sidecar.engines.llama_cpp", "LlamaCppEngine"),
    ("sentence_transformers", "embed"): ("llm_sidecar.engines.sentence_transformers", "SentenceTransformersEngine"),
    ("vllm", "generate"): ("llm_sidecar.engines.vllm", "VllmGenerationEngine"),
    ("vllm", "embed"): ("llm_sidecar.engines.vllm", "VllmEmbeddingEngine"),
    ("cross_encoder", "rerank"): ("llm_sidecar.engines.cross_encoder", "CrossEncoderEngine"),
    ("vllm", "rerank"): ("llm_sidecar.engines.cross_encoder", "VllmRerankEngine"),
}


def build(config: ModelConfig) -> Engine:
    where = _CLASSES.get((config.engine, config.task))
    if where is None:
        raise ValueError(f"model {config.name}: engine {config.engine} cannot {config.task}")
    module, cls = where
    return getattr(importlib.import_module(module), cls)(config)
