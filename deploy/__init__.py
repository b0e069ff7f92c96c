"""Deployment helpers for llmfdw: install placement (bootstrap) and the embedded default (embedded)."""
