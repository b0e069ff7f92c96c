"""What the benchmarks share: the inputs they embed, a throw-away deployment, how results are saved."""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

from deploy import embedded

WORDS = ("database vector search model query index table row column token embedding "
         "postgres sidecar batch latency cache cluster replica tenant metric").split()


def corpus(n: int) -> list[str]:
    """Distinct sentences of 8-16 words, deterministic, so runs compare."""
    return [f"Document {i}: " + " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(8 + i % 9))
            for i in range(n)]


def status_mib(pid: int, field: str) -> float:
    """One memory field of /proc/<pid>/status (VmHWM, VmRSS, RssAnon, ...) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def save(results: dict, out: str) -> None:
    """Write results (with the machine they ran on) as JSON, and say where."""
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


def scratch_layout(name: str) -> embedded.Layout:
    """The layout of a throw-away embedded deployment (Postgres, sidecar) in a new /tmp folder
    that the Postgres server user can traverse; `embedded.up` starts it, remove() ends it."""
    state = Path(tempfile.mkdtemp(prefix=f"llmfdw-{name}-", dir="/tmp"))
    state.chmod(0o755)
    return embedded.Layout(state)


def remove(layout: embedded.Layout) -> None:
    """Stop what a scratch layout started and delete its files."""
    embedded.down(layout)
    shutil.rmtree(layout.state, ignore_errors=True)


def uncached_config() -> dict:
    """The packaged models file with the sidecar's result cache off: a benchmark that sends the
    same inputs again (rounds, interleaved ways) must reach the engine every time, not the cache."""
    import yaml

    from llm_sidecar.config import DEFAULT_CONFIG

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["cache"] = {"max_bytes": 0}
    return raw


def write_config(raw: dict, path: Path) -> Path:
    """`raw` as a models file that the sidecar (the server OS user) can read."""
    import yaml

    path.write_text(yaml.safe_dump(raw))
    path.chmod(0o644)
    return path
