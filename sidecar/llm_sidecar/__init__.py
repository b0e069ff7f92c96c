"""The llmfdw sidecar: a gRPC model server shared by every Postgres backend.

Hops, in order: server (process, health, signals) -> servicer (proto <-> engine,
status codes) -> engines (one per model: llama.cpp, sentence-transformers, vLLM).
"""
