"""What both benchmarks share: the inputs they embed and how results are saved."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

WORDS = ("database vector search model query index table row column token embedding "
         "postgres sidecar batch latency cache cluster replica tenant metric").split()


def corpus(n: int) -> list[str]:
    """Distinct sentences of 8-16 words, deterministic, so runs compare."""
    return [f"Document {i}: " + " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(8 + i % 9))
            for i in range(n)]


def save(results: dict, out: str) -> None:
    """Write results (with the machine they ran on) as JSON, and say where."""
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
