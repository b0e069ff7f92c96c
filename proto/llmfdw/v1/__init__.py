"""Generated gRPC stubs for the llmfdw.v1 contract (built from llmfdw.proto at install time)."""
