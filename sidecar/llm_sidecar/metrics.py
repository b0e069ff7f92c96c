"""Prometheus metrics of the sidecar, served on --metrics-port.

Counted where the work happens: engine token counts inside the engines (so
a request that keeps decoding after its caller left would show), request
outcomes in the servicer, queue depths where requests wait.  Rates come from
the counters: tokens per second is rate(llmfdw_engine_tokens_total[1m]) per
model, or rate(llmfdw_output_tokens_total[1m]) per tenant.  The tenant label
is set only on counters (cheap); histograms are per model.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

REQUESTS = Counter("llmfdw_requests", "Finished requests", ["rpc", "model", "tenant", "status"])
IN_FLIGHT = Gauge("llmfdw_requests_in_flight", "Requests being served", ["rpc", "model"])
QUEUED = Gauge("llmfdw_queued_requests", "Requests waiting for an engine slot", ["model", "tenant"])
EMBED_QUEUE = Gauge("llmfdw_embedding_queue_texts", "Texts waiting for an embedding batch", ["model"])
LATENCY = Histogram("llmfdw_request_seconds", "Request duration", ["rpc", "model"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
QUEUE_TIME = Histogram("llmfdw_queue_seconds", "Time from arrival until the engine started a request",
                       ["rpc", "model"], buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
FIRST_TOKEN = Histogram("llmfdw_time_to_first_token_seconds", "Time to the first generated text",
                        ["model"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
ENGINE_TOKENS = Counter("llmfdw_engine_tokens", "Tokens the engine decoded", ["model"])
ENGINE_RESTARTS = Counter("llmfdw_engine_restarts", "Times a model's engine process died (and was started again "
                          "unless it died too often)", ["model"])
INPUT_TOKENS = Counter("llmfdw_input_tokens", "Prompt or input tokens read", ["model", "tenant"])
OUTPUT_TOKENS = Counter("llmfdw_output_tokens", "Tokens returned to callers", ["model", "tenant"])
EMBEDDED = Counter("llmfdw_embedded_inputs", "Texts embedded", ["model", "tenant"])
COMPUTE = Counter("llmfdw_compute_seconds", "Engine time attributed to requests", ["model", "tenant"])
BATCH_SIZE = Histogram("llmfdw_embedding_batch_size", "Texts per engine batch", ["model"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))

# The result cache (cache.py): hits and misses by rpc (a Generate request, or an Embed text), its size
CACHE_HITS = Counter("llmfdw_cache_hits", "Requests (Generate) or texts (Embed) answered from the result cache",
                     ["rpc", "model", "tenant"])
CACHE_MISSES = Counter("llmfdw_cache_misses", "Cacheable requests (Generate) or texts (Embed) the engine computed",
                       ["rpc", "model", "tenant"])
CACHE_BYTES = Gauge("llmfdw_cache_bytes", "Bytes the result cache holds (charged as cache.py counts them)")
CACHE_ENTRIES = Gauge("llmfdw_cache_entries", "Entries in the result cache")
CACHE_EVICTIONS = Counter("llmfdw_cache_evictions", "Entries the result cache dropped to stay within max_bytes")


def serve(port: int, address: str = "127.0.0.1") -> None:
    """Expose /metrics over HTTP (a thread of its own)."""
    start_http_server(port, addr=address)
