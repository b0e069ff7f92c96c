"""Why llama.cpp runs in a process of its own: torch and llama.cpp in one process slow each other.

    .venv/bin/python bench/bench_openmp.py [--calls 300]

torch and llama.cpp both link libgomp.so.1, which a process loads once; once the OpenMP threads
of the two libraries outnumber the CPUs, libgomp stops spinning at barriers and every wait sleeps
in the kernel.  This measures the sidecar's embedding model (as the sidecar loads it: dtype auto)
answering one text at a time, `encode([text])` p50 over --calls calls, with 2 torch threads and
with 1, each in a fresh process: alone, and beside llama.cpp's server (the sidecar's generation
model, loaded and having answered once, idle) in the same process.  Writes
bench/results/openmp.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import save  # noqa: E402

CHILD = r"""
import json, os, shutil, sys, threading, time
import numpy as np, torch
from sentence_transformers import SentenceTransformer
from llm_sidecar.config import load_config
from llm_sidecar.engines.base import check_dtype
beside_llama, calls = sys.argv[1] == "1", int(sys.argv[2])
models = load_config().models
emb = next(m for m in models if m.task == "embed")
if beside_llama:
    from llm_sidecar.engines.llama_cpp import LlamaCppEngine
    from llm_sidecar.engines.llama_worker import build_server
    server, directory = build_server(LlamaCppEngine(next(m for m in models if m.task == "generate")).settings())
    server.handle_chat_completions({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                    "stream": True}, lambda chunk: False)
    shutil.rmtree(directory, ignore_errors=True)
kwargs = {"model_kwargs": {"dtype": torch.bfloat16}} if check_dtype(emb.name, emb.dtype) == "bfloat16" else {}
model = SentenceTransformer(emb.path(), device="cpu", **kwargs)
out = {}
def run(threads):
    torch.set_num_threads(threads)
    for i in range(20):
        model.encode([f"warm up {i}"])
    ms = []
    for i in range(calls):
        started = time.perf_counter()
        model.encode([f"interactive question {i} about vector search in postgres"])
        ms.append((time.perf_counter() - started) * 1000)
    out[threads] = round(float(np.percentile(ms, 50)), 2)
for threads in (2, 1):   # each on a fresh thread: torch's thread count is the calling thread's
    worker = threading.Thread(target=run, args=(threads,))
    worker.start()
    worker.join()
print(json.dumps(out))
"""


def measure(beside_llama: bool, calls: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, "1" if beside_llama else "0", str(calls)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "openmp.json"))
    args = parser.parse_args()
    results = {"cpus": os.cpu_count(), "calls": args.calls, "load_average_before": os.getloadavg(),
               "alone": measure(False, args.calls), "beside_llama_cpp": measure(True, args.calls)}
    results["load_average_after"] = os.getloadavg()
    print(f"one-text encode p50 (ms), {results['cpus']} CPUs   2 threads   1 thread")
    for name in ("alone", "beside_llama_cpp"):
        print(f"  {name:<28}{results[name]['2']:>10.2f}{results[name]['1']:>10.2f}")
    save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
