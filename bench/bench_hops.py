"""Benchmark: where one interactive request's time goes in the sidecar, hop by hop.

    .venv/bin/python bench/bench_hops.py [--calls 300] [--variant NAME=DIR ...]

Starts a sidecar (the packaged models, result cache off) with LLMFDW_HOPS=1, which makes each
Embed and Generate call send back its per-hop timestamps (sidecar/llm_sidecar/hops.py:
time.perf_counter_ns, CLOCK_MONOTONIC, the same clock in every process here), and sends it, one
at a time, a one-text Embed and an 8-token greedy Generate.  With the client's own timestamps
(before the stub call, first message, end of the call) each call splits into:
  Embed:    client -> handler (gRPC, both sides), validate, admission slot, tokenize + queue,
            batch formation (the batcher loop waking), thread hop to the forward pass, the
            forward pass, thread hop back, delivery to the handler, to-bytes (the response
            message), the write, the call's bookkeeping (metrics, usage, log, history), and
            the status back to the client;
  Generate: client -> handler, validate, slot, first token, the other 7 tokens, bookkeeping,
            status back to the client.
Beside them, in this process on the same texts, interleaved: SentenceTransformer.encode([text])
and the model's own forward pass on the tokenized text (what the engine runs).

First query on a new connection: what a backend does before its first request returns, in a
fresh process started as the backend starts Python (Debian's python3.11, isolated, no site,
then the venv's site-packages added, as fdw/src/python.c does): interpreter start, `import
grpc`, the rest of the FDW's modules (llm_tables.tables), making the channel, the first Embed on
it (connecting) and a second one (the steady state).

--variant NAME=DIR (repeatable) runs one sidecar per variant with DIR first on its PYTHONPATH
(a copy of another version's sidecar/ tree: DIR/llm_sidecar), and alternates the calls between
them (A/B in one run, the same machine load); without it, one sidecar of the installed package.
Writes bench/results/hops.json and prints a table (medians in ms).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from deploy import embedded  # noqa: E402
from bench.common import save, uncached_config, write_config  # noqa: E402
from bench.bench_interactive import EMBED_MODEL, EMBED_TEXT, PROMPT, load_encoder, texts  # noqa: E402
from sidecar_process import open_to_server_user  # noqa: E402
from llm_sidecar.engines.base import check_dtype  # noqa: E402

GEN_MODEL = "smollm2-135m-instruct"
# (hop, from mark, to mark), in the order a call passes them; client_* marks are this process's
EMBED_HOPS = [("client -> handler", "client_send", "received"), ("validate", "received", "validated"),
              ("admission slot", "validated", "admitted"), ("tokenize + queue", "admitted", "queued"),
              ("batch formation", "queued", "batch_formed"), ("thread hop in", "batch_formed", "forward_start"),
              ("forward pass", "forward_start", "forward_end"), ("thread hop out", "forward_end", "forward_returned"),
              ("deliver to request", "forward_returned", "batch_delivered"),
              ("handler wakes", "batch_delivered", "delivered"), ("to bytes", "delivered", "serialized"),
              ("write", "serialized", "sent"), ("handler ends", "sent", "done"),
              ("bookkeeping", "done", "finished"), ("status -> client", "finished", "client_end")]
GENERATE_HOPS = [("client -> handler", "client_send", "received"), ("validate", "received", "validated"),
                 ("admission slot", "validated", "admitted"), ("first token", "admitted", "first_token"),
                 ("other tokens", "first_token", "final"), ("handler ends", "final", "done"),
                 ("bookkeeping", "done", "finished"), ("status -> client", "finished", "client_end")]


@contextmanager
def sidecar(socket: Path, config: Path, path: str | None) -> Iterator[None]:
    """A sidecar with per-hop marks on, `path` (if any) first on its PYTHONPATH."""
    open_to_server_user(socket, config)
    home = Path(tempfile.mkdtemp(prefix="llmfdw-hops-home-"))
    argv, kwargs = embedded.sidecar_process_args(f"unix://{socket}", home=home, config=config)
    env = kwargs["env"]
    env["LLMFDW_HOPS"] = "1"
    if path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [path, env.get("PYTHONPATH")]))
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=home, **kwargs)
    try:
        embedded.wait_serving(f"unix://{socket}", 180, alive=lambda: proc.poll() is None)
        yield
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(home, ignore_errors=True)


def marks_of(call) -> dict[str, int]:
    return json.loads(dict(call.trailing_metadata())["llmfdw-hops"])


def embed_call(stub, pb, text: str) -> dict[str, int]:
    """One one-text Embed; the sidecar's marks and the client's."""
    sent = time.perf_counter_ns()
    call = stub.Embed(pb.EmbedRequest(model=EMBED_MODEL, inputs=[text], normalize=True), timeout=30)
    first = None
    for _ in call:
        first = first or time.perf_counter_ns()
    return {**marks_of(call), "client_send": sent, "client_first": first, "client_end": time.perf_counter_ns()}


def generate_call(stub, pb, prompt: str) -> dict[str, int]:
    """One 8-token greedy Generate; the sidecar's marks and the client's."""
    sent = time.perf_counter_ns()
    call = stub.Generate(pb.GenerateRequest(model=GEN_MODEL, prompt=prompt, params=pb.GenerationParams(
        max_tokens=8, temperature=0.0)), timeout=60)
    first = None
    for _ in call:
        first = first or time.perf_counter_ns()
    return {**marks_of(call), "client_send": sent, "client_first": first, "client_end": time.perf_counter_ns()}


def split(samples: list[dict[str, int]], hops: list[tuple[str, str, str]]) -> dict:
    """Median and p95 of each hop and of the whole call, in ms."""
    out = {}
    for name, a, b in hops + [("total (client)", "client_send", "client_end")]:
        ms = np.array([(s[b] - s[a]) / 1e6 for s in samples if a in s and b in s])
        if len(ms):
            out[name] = {"p50_ms": round(float(np.median(ms)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3)}
    return out


FIRST_QUERY = r"""
import json, sys, time
t = [time.perf_counter_ns()]
import site
site.addsitedir(sys.argv[2])
import grpc
t.append(time.perf_counter_ns())
import llm_tables.tables
from llm_inference.v1 import inference_pb2 as pb, inference_pb2_grpc as pb_grpc
t.append(time.perf_counter_ns())
stub = pb_grpc.InferenceStub(grpc.insecure_channel(sys.argv[1]))
t.append(time.perf_counter_ns())
for text in ("first", "second"):
    list(stub.Embed(pb.EmbedRequest(model=sys.argv[3], inputs=[text + " query of a new backend"]), timeout=30))
    t.append(time.perf_counter_ns())
print(json.dumps(t))
"""
FIRST_QUERY_PARTS = ["interpreter start", "import grpc", "import the FDW (llm_tables.tables)", "make the channel",
                     "first Embed (connects)", "second Embed"]


def first_query(address: str, n: int) -> dict:
    """Median ms of each step of a new backend's first query (FIRST_QUERY), over n fresh processes."""
    import sysconfig

    runs = []
    for _ in range(n):
        started = time.perf_counter_ns()
        out = subprocess.run([str(embedded.SYSTEM_PYTHON), "-I", "-S", "-c", FIRST_QUERY, address,
                              sysconfig.get_path("purelib"), EMBED_MODEL],
                             check=True, capture_output=True, text=True).stdout
        marks = [started] + json.loads(out)
        runs.append([(b - a) / 1e6 for a, b in zip(marks, marks[1:])])
    med = np.median(np.array(runs), axis=0)
    parts = {name: round(float(ms), 2) for name, ms in zip(FIRST_QUERY_PARTS, med)}
    parts["first query's extra over the next"] = round(float(sum(med[:-1]) - med[-1]), 2)
    return parts


def in_process(model, text: str) -> tuple[float, float]:
    """encode([text]) and the bare forward pass on its token ids (what the engine runs), in ms."""
    import torch

    started = time.perf_counter_ns()
    model.encode([text])
    encode = time.perf_counter_ns() - started
    features = getattr(model, "preprocess", model.tokenize)([text])
    started = time.perf_counter_ns()
    with torch.inference_mode():
        model({"input_ids": features["input_ids"], "attention_mask": features["attention_mask"]})
    return encode / 1e6, (time.perf_counter_ns() - started) / 1e6


def run(variants: dict[str, str | None], calls: int, dtype: str) -> dict:
    import grpc

    from llm_inference.v1 import inference_pb2 as pb
    from llm_inference.v1 import inference_pb2_grpc as pb_grpc

    model = load_encoder(dtype)
    work = Path(tempfile.mkdtemp(prefix="llmfdw-hops-", dir="/tmp"))
    work.chmod(0o755)
    write_config(uncached_config(), work / "models.yaml")   # every call reaches the engine
    samples = {v: {"embed": [], "generate": []} for v in variants}
    local: dict[str, list[float]] = {"encode": [], "forward": []}
    with ExitStack() as stack:
        stubs = {}
        for name, path in variants.items():
            sock_dir = embedded.make_server_dir(work / name, 0o700)
            stack.enter_context(sidecar(sock_dir / "s.sock", work / "models.yaml", path))
            channel = stack.enter_context(grpc.insecure_channel(f"unix://{sock_dir / 's.sock'}"))
            stubs[name] = pb_grpc.InferenceStub(channel)
            for i in range(10):   # warm: the channel, oneDNN's one-text kernels, llama.cpp's slots
                embed_call(stubs[name], pb, f"warm up {i}")
                generate_call(stubs[name], pb, f"warm up {i}")
        first = first_query(f"unix://{work / next(iter(variants)) / 's.sock'}", 10)
        for i, text in enumerate(texts(calls, EMBED_TEXT)):
            encode, forward = in_process(model, text)
            local["encode"].append(encode)
            local["forward"].append(forward)
            order = list(variants)
            random.shuffle(order)
            for name in order:
                samples[name]["embed"].append(embed_call(stubs[name], pb, f"{text} ({name})"))
                if i % 3 == 0:   # generation is slower: a third as many
                    samples[name]["generate"].append(generate_call(stubs[name], pb, PROMPT.format(i)))
    shutil.rmtree(work, ignore_errors=True)
    return {"first_query_ms": first, "in_process_ms": {k: {"p50_ms": round(float(np.median(v)), 3),
                                  "p95_ms": round(float(np.percentile(v, 95)), 3)} for k, v in local.items()},
            "variants": {name: {"path": variants[name],
                                "embed": split(s["embed"], EMBED_HOPS),
                                "generate_8_tokens": split(s["generate"], GENERATE_HOPS)}
                         for name, s in samples.items()}}


def report(r: dict) -> None:
    names = list(r["variants"])
    print(f"\ndtype {r['dtype']}; load average before {r['load_average_before']}, after {r['load_average_after']}")
    local = r["in_process_ms"]
    print(f"in-process, same texts, interleaved: encode([text]) p50 {local['encode']['p50_ms']} ms, "
          f"forward pass alone p50 {local['forward']['p50_ms']} ms")
    print("\nfirst query of a new backend (p50 ms): " + ", ".join(f"{k} {v}" for k, v in r["first_query_ms"].items()))
    for kind in ("embed", "generate_8_tokens"):
        print(f"\n{kind} (p50 ms)" + "".join(f"{n:>14}" for n in names))
        hops = list(r["variants"][names[0]][kind])
        for hop in hops:
            print(f"  {hop:<26}" + "".join(f"{r['variants'][n][kind].get(hop, {}).get('p50_ms', float('nan')):>14.3f}"
                                            for n in names))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="one-text Embed calls per variant")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                        help="a sidecar with DIR first on its PYTHONPATH (repeatable; default: the installed one)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "hops.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    variants = dict(v.split("=", 1) for v in args.variant) or {"installed": None}
    dtype = check_dtype(EMBED_MODEL, "auto")
    results = {"dtype": dtype, "calls": args.calls, "load_average_before": os.getloadavg(),
               "command": " ".join([".venv/bin/python", "bench/bench_hops.py"] + sys.argv[1:])}
    results.update(run(variants, args.calls, dtype))
    results["load_average_after"] = os.getloadavg()
    report(results)
    save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
