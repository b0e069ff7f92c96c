"""Generated gRPC stubs for the llm_inference.v1 contract (built from inference.proto at install time)."""
