"""Start the llmfdw sidecar (same arguments as `python -m llm_sidecar.server`) with its
Prometheus endpoint on every interface of the pod, so that Prometheus can scrape it.

The sidecar binds --metrics-port to 127.0.0.1 only (right for `make up`; in a pod, nothing
outside the pod could scrape it).  LLMFDW_METRICS_ADDRESS (default 0.0.0.0) is the address used
instead.  Drop this launcher once the sidecar takes a --metrics-address option.
"""
import os
import sys

from llm_sidecar import metrics, server

_serve = metrics.serve
_address = os.environ.get("LLMFDW_METRICS_ADDRESS", "0.0.0.0")


def _serve_on_pod(port: int, address: str = _address) -> None:
    _serve(port, address)


metrics.serve = _serve_on_pod
sys.exit(server.main(sys.argv[1:]))
