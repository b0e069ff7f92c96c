"""Benchmark: the vectorizer's backfill against the bulk UPDATE, and its lag under a steady load.

    .venv/bin/python bench/bench_vectorizer.py [--rows 100000] [--rate 50] [--seconds 60]

Starts its own Postgres (llmfdw preloaded, so the background worker serves database llmfdw) and
sidecar (deploy/embedded.py, in a temporary directory), loads --rows distinct texts into two
tables and, in the same run:

1. bulk: `UPDATE a SET embedding = e.embedding FROM llm.embeddings e WHERE e.input = a.body`
   (the batched join, 1,000 rows per request): rows/s;
2. worker: `llm.create_vectorizer('b', 'body', chunking => 'none', hnsw => false)` (one vector per
   row, like the UPDATE, no index on either) and the time until the worker has emptied the queue,
   at llmfdw.vectorizer_batch rows per transaction: rows/s and the ratio to the bulk UPDATE;
3. lag: --rate rows/s of ~1 KB documents inserted for --seconds into a third table with a default
   vectorizer (token chunks, HNSW index); each row's lag is from its INSERT's commit until its
   chunks are visible (polled every 50 ms): p50, p95, max; the private memory (RssAnon) of the
   worker and of the sidecar, sampled every second.

Prints the figures and writes bench/results/vectorizer.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.bench_bulk_update import rss_anon_mb  # noqa: E402
from bench.common import corpus, remove, save, scratch_layout  # noqa: E402
from deploy import embedded  # noqa: E402

BULK = "UPDATE a SET embedding = e.embedding FROM llm.embeddings e WHERE e.input = a.body"


def load(conn: psycopg.Connection, table: str, texts: list[str]) -> None:
    conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, body text, embedding vector(384))")
    with conn.cursor().copy(f"COPY {table} (id, body) FROM STDIN") as copy:
        for i, text in enumerate(texts):
            copy.write_row((i, text))
    conn.execute(f"ANALYZE {table}")


def wait_drained(conn: psycopg.Connection, name: str, poll: float = 0.2) -> None:
    while conn.execute("SELECT pending FROM llm.vectorizers WHERE name = %s", (name,)).fetchone()[0]:
        time.sleep(poll)


def worker_pid(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'llmfdw vectorizer' "
                        "AND datname = current_database()").fetchone()[0]


def steady_load(uri: str, rate: float, seconds: float, sidecar: int) -> dict:
    """Insert `rate` rows/s for `seconds`; each row's lag until its chunks are visible."""
    doc = " ".join(["The lighthouse keeper logged the passing ships, the weather and the lamp."] * 14)  # ~1 KB
    inserted: dict[int, float] = {}
    seen: dict[int, float] = {}
    memory: list[dict] = []
    done = threading.Event()
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("CREATE TABLE c (id int PRIMARY KEY, body text)")
        conn.execute("SELECT llm.create_vectorizer('c', 'body')")
        worker = worker_pid(conn)

    def watch() -> None:
        with psycopg.connect(uri, autocommit=True) as w:
            last_sample = 0.0
            while not done.is_set() or len(seen) < len(inserted):
                now = time.monotonic()
                for (key,) in w.execute("SELECT DISTINCT id FROM c_chunks WHERE id > %s", (max(seen, default=-1),)):
                    seen.setdefault(key, now)
                if now - last_sample >= 1.0:
                    memory.append({"s": round(now - t0, 1), "worker_mb": rss_anon_mb(worker),
                                   "sidecar_mb": rss_anon_mb(sidecar)})
                    last_sample = now
                time.sleep(0.05)

    t0 = time.monotonic()
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with psycopg.connect(uri, autocommit=True) as conn:
            for i in range(int(rate * seconds)):
                time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
                conn.execute("INSERT INTO c VALUES (%s, %s)", (i, f"Log {i}. {doc}"))
                inserted[i] = time.monotonic()
    finally:
        done.set()
        watcher.join()
    lags = sorted(seen[k] - inserted[k] for k in inserted)
    return {"rows": len(lags), "rate": rate, "p50_s": statistics.median(lags),
            "p95_s": lags[int(0.95 * (len(lags) - 1))], "max_s": lags[-1], "memory": memory}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=512, help="llmfdw.vectorizer_batch")
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "vectorizer.json"))
    args = parser.parse_args()

    layout = scratch_layout("bench-vectorizer")
    try:
        uri = embedded.up(layout, port=embedded.free_port(), demo=False)
        sidecar = embedded.sidecar_pid(layout)
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute(f"ALTER SYSTEM SET llmfdw.vectorizer_batch = {args.batch}")
            conn.execute("SELECT pg_reload_conf()")
            texts = corpus(args.rows)
            load(conn, "a", [f"{t} #a" for t in texts])
            load(conn, "b", [f"{t} #b" for t in texts])   # other texts: nothing cached anywhere
            t0 = time.monotonic()
            conn.execute(BULK)
            bulk = time.monotonic() - t0
            t0 = time.monotonic()
            conn.execute("SELECT llm.create_vectorizer('b', 'body', chunking => 'none', hnsw => false)")
            wait_drained(conn, "b")
            drained = time.monotonic() - t0
            assert conn.execute("SELECT count(*) FROM b_chunks").fetchone() == (args.rows,)
        lag = steady_load(uri, args.rate, args.seconds, sidecar)
    finally:
        remove(layout)

    ratio = bulk / drained
    print(f"\n{args.rows} rows: bulk UPDATE {args.rows / bulk:.0f} rows/s ({bulk:.1f} s); "
          f"vectorizer backfill by the worker (batch {args.batch}) {args.rows / drained:.0f} rows/s "
          f"({drained:.1f} s): {ratio:.2f}x the bulk UPDATE")
    worker_mb = [m["worker_mb"] for m in lag["memory"]]
    sidecar_mb = [m["sidecar_mb"] for m in lag["memory"]]
    print(f"lag at {args.rate:.0f} rows/s of ~1 KB for {args.seconds:.0f} s ({lag['rows']} rows): "
          f"p50 {lag['p50_s']:.2f} s, p95 {lag['p95_s']:.2f} s, max {lag['max_s']:.2f} s; "
          f"worker private memory {min(worker_mb):.0f}-{max(worker_mb):.0f} MB, "
          f"sidecar {min(sidecar_mb):.0f}-{max(sidecar_mb):.0f} MB")
    save({"rows": args.rows, "batch": args.batch, "bulk_seconds": bulk, "vectorizer_seconds": drained,
          "ratio": ratio, "lag": lag}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
