"""Benchmark: the sidecar's engines called in-process vs through gRPC.

    .venv/bin/python bench/bench_sidecar.py [--clients 1,8,32] [--texts 2048] [--gen-tokens 48]

For embeddings (all-MiniLM-L6-v2) and for generation (SmolLM2-135M), with
1, 8 and 32 concurrent clients, side by side in one run:
  in_process - the sidecar's own engine objects (same batcher, same llama.cpp
               slots, same config) called from asyncio tasks in this process:
               no protobuf, no socket;
  grpc       - a real sidecar process on a Unix socket, each client with its
               own channel (as each Postgres backend has).
Embedding clients send requests of --request-texts texts until --texts texts
are embedded, --rounds times per mode (the modes alternate); the figure is
texts per second over all rounds, with per-request latency.
Generation clients each send --gen-requests prompts (greedy, --gen-tokens
tokens at most; a lone client sends 4 times as many, for a steadier baseline); figures are output tokens per second, time to first token
(TTFT) and per-request latency.  The two modes run one after the other per
concurrency level, never at the same time (the idle side costs nothing).
Prints a table and writes bench/results/sidecar.json.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import grpc
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from bench.common import WORDS, corpus, save, uncached_config, write_config  # noqa: E402
from sidecar_process import running_sidecar  # noqa: E402

from llm_sidecar import engines  # noqa: E402
from llm_sidecar.config import DEFAULT_CONFIG, load_config  # noqa: E402
from llm_sidecar.engines.base import GenerateFinal, GenerateParams  # noqa: E402
from llm_sidecar.metering import Metered  # noqa: E402
from llm_inference.v1 import inference_pb2 as pb  # noqa: E402
from llm_inference.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

EMB, GEN = "all-minilm-l6-v2", "smollm2-135m-instruct"
PROMPTS = ["Write a short poem about {}.", "Explain what a {} is in two sentences.",
           "List three facts about {}.", "Describe a {} to a child."]


def prompt(i: int) -> str:
    return PROMPTS[i % len(PROMPTS)].format(WORDS[i % len(WORDS)])


@dataclass
class Sample:
    latency: float
    ttft: float = 0.0
    units: int = 0     # texts embedded or tokens generated


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        lat = np.array([s.latency for s in self.samples]) * 1000
        out = {"requests": len(self.samples), "seconds": round(self.seconds, 3),
               "units_per_s": round(sum(s.units for s in self.samples) / self.seconds, 2),
               "latency_ms_p50": round(float(np.percentile(lat, 50)), 2),
               "latency_ms_p99": round(float(np.percentile(lat, 99)), 2)}
        if any(s.ttft for s in self.samples):
            ttft = np.array([s.ttft for s in self.samples]) * 1000
            out.update(ttft_ms_p50=round(float(np.percentile(ttft, 50)), 2),
                       ttft_ms_p99=round(float(np.percentile(ttft, 99)), 2),
                       ttft_ms_max=round(float(ttft.max()), 2))
        return out


async def clients(n: int, jobs: list, one: Callable[[int, object], Awaitable[Sample]]) -> Run:
    """n clients take jobs from a shared list in turn; each client is one caller at a time."""
    run, queue = Run(), list(reversed(jobs))

    async def client(c: int) -> None:
        while queue:
            run.samples.append(await one(c, queue.pop()))

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(n)))
    run.seconds = time.perf_counter() - start
    return run


# -- the two ways of calling -------------------------------------------------

class InProcess:
    def __init__(self, embedder, generator) -> None:
        self.embedder, self.generator = embedder, generator

    async def embed(self, _client: int, texts: list[str]) -> Sample:
        start, n = time.perf_counter(), 0
        async for group in self.embedder.embed(texts, Metered()):
            n += len(group)
        return Sample(time.perf_counter() - start, units=n)

    async def generate(self, _client: int, text: str, max_tokens: int) -> Sample:
        start, first, tokens = time.perf_counter(), 0.0, 0
        params = GenerateParams({"max_tokens": max_tokens, "temperature": 0.0})
        async for event in self.generator.generate(text, "", False, params, Metered()):
            if isinstance(event, GenerateFinal):
                tokens = event.output_tokens
            elif not first:
                first = time.perf_counter() - start
        return Sample(time.perf_counter() - start, first, tokens)


class OverGrpc:
    def __init__(self, address: str, n: int) -> None:
        self.channels = [grpc.aio.insecure_channel(address) for _ in range(n)]
        self.stubs = [pb_grpc.InferenceStub(c) for c in self.channels]

    async def close(self) -> None:
        for c in self.channels:
            await c.close()

    async def embed(self, client: int, texts: list[str]) -> Sample:
        start, n = time.perf_counter(), 0
        async for message in self.stubs[client].Embed(pb.EmbedRequest(model=EMB, inputs=texts)):
            for e in message.embeddings:
                np.frombuffer(e.vector, dtype="<f4")   # what a client does with it
                n += 1
        return Sample(time.perf_counter() - start, units=n)

    async def generate(self, client: int, text: str, max_tokens: int) -> Sample:
        start, first, tokens = time.perf_counter(), 0.0, 0
        request = pb.GenerateRequest(model=GEN, prompt=text, params=pb.GenerationParams(max_tokens=max_tokens))
        async for message in self.stubs[client].Generate(request):
            if message.HasField("final"):
                tokens = message.final.usage.output_tokens
            elif not first:
                first = time.perf_counter() - start
        return Sample(time.perf_counter() - start, first, tokens)


# -- the benchmark ------------------------------------------------------------

async def bench(args: argparse.Namespace, socket: str) -> dict:
    config = load_config(DEFAULT_CONFIG)
    for m in config.models:
        if m.engine == "llama_cpp":
            m.engine_args["verbosity"] = -1     # llama.cpp's per-request log lines, in this process only
    built = {m.name: engines.build(m) for m in config.models}
    for engine in built.values():
        await engine.load()
    local = InProcess(built[EMB], built[GEN])
    texts = corpus(args.texts)
    k = args.request_texts
    emb_jobs = [texts[i:i + k] for i in range(0, len(texts), k)]
    out: dict = {"embed": {}, "generate": {}}
    for n in args.clients:
        remote = OverGrpc(f"unix://{socket}", n)
        # Warm both sides as a resident server is warm: every llama.cpp slot has seen a
        # request (so the chat template's shared prefix is in its KV cache), with other prompts.
        warm = [f"Say hi to friend number {i}." for i in range(n)]
        for caller in (local, remote):
            await caller.embed(0, texts[:64])
            await clients(n, warm, lambda c, p, g=caller.generate: g(c, p, 2))
        runs: dict[str, list[Run]] = {"in_process": [], "grpc": []}
        for _ in range(args.rounds):   # alternated, so that drift on a noisy machine hits both alike
            for mode, caller in (("in_process", local), ("grpc", remote)):
                runs[mode].append(await clients(n, emb_jobs, caller.embed))
        row = {mode: Run([s for r in rs for s in r.samples], sum(r.seconds for r in rs)).summary()
               for mode, rs in runs.items()}
        row["grpc_vs_in_process"] = round(row["grpc"]["units_per_s"] / row["in_process"]["units_per_s"], 3)
        row["grpc_vs_in_process_per_round"] = [round(a.seconds / b.seconds, 3)
                                               for a, b in zip(runs["in_process"], runs["grpc"])]
        out["embed"][n] = row
        print(f"embed    {n:>3} clients: " + _line(row), flush=True)

        gen_jobs = [prompt(i) for i in range(max(n, 4) * args.gen_requests)]
        row = {}
        for mode, caller in (("in_process", local), ("grpc", remote)):
            row[mode] = (await clients(n, gen_jobs, lambda c, p, g=caller.generate: g(c, p, args.gen_tokens))).summary()
        row["grpc_vs_in_process"] = round(row["grpc"]["units_per_s"] / row["in_process"]["units_per_s"], 3)
        out["generate"][n] = row
        print(f"generate {n:>3} clients: " + _line(row), flush=True)
        await remote.close()
    for engine in built.values():
        await engine.close()
    single = min(out["generate"], key=int)
    for n, row in out["generate"].items():
        for mode in ("in_process", "grpc"):
            row[mode]["ttft_max_vs_single_p50"] = round(
                row[mode]["ttft_ms_max"] / out["generate"][single][mode]["ttft_ms_p50"], 2)
    return out


def _line(row: dict) -> str:
    a, b = row["in_process"], row["grpc"]
    s = (f"in-process {a['units_per_s']:8.1f}/s p50 {a['latency_ms_p50']:7.1f} ms | "
         f"gRPC {b['units_per_s']:8.1f}/s p50 {b['latency_ms_p50']:7.1f} p99 {b['latency_ms_p99']:7.1f} ms | "
         f"ratio {row['grpc_vs_in_process']:.1%}")
    if "ttft_ms_p50" in b:
        s += f" | TTFT gRPC p50 {b['ttft_ms_p50']:.0f} max {b['ttft_ms_max']:.0f} ms"
    return s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    parser.add_argument("--texts", type=int, default=2048, help="texts embedded per run")
    parser.add_argument("--rounds", type=int, default=3, help="embedding runs per mode, alternated")
    parser.add_argument("--request-texts", type=int, default=16, help="texts per Embed request")
    parser.add_argument("--gen-requests", type=int, default=2, help="prompts per generation client")
    parser.add_argument("--gen-tokens", type=int, default=48, help="max_tokens per prompt")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "sidecar.json"))
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory(prefix="llmfdw-bench-") as tmp:
        socket = os.path.join(tmp, "sidecar.sock")
        # the result cache off: the rounds send the same texts and prompts again, and the in-process
        # side has no cache (it calls the engines)
        config = write_config(uncached_config(), Path(tmp) / "models.yaml")
        with running_sidecar(socket, str(config), log_path=os.path.join(tmp, "sidecar.log")):
            results = asyncio.run(bench(args, socket))
    results["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    for n, row in results["generate"].items():
        print(f"generate {n:>3} clients: slowest TTFT / single-client TTFT p50: "
              f"in-process {row['in_process']['ttft_max_vs_single_p50']:.2f}x, "
              f"gRPC {row['grpc']['ttft_max_vs_single_p50']:.2f}x")
    save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
