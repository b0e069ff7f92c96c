"""The FDW side of llmfdw: Multicorn-API classes for the virtual tables and their gRPC client."""
