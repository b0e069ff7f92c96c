"""llmfdw: LLMs and embedding models as Postgres foreign tables."""
