"""llm_inference: the gRPC contract between the FDW classes (llm_tables) and the sidecar (llm_sidecar).

The stubs in v1/ are generated from proto/llm_inference/v1/inference.proto when the package is built.
"""
