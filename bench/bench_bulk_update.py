"""Benchmark: embedding a large table in place, and the memory it takes.

    .venv/bin/python bench/bench_bulk_update.py [--rows 100000] [--every 5]

Starts its own Postgres and sidecar (deploy/embedded.py, in a temporary directory), loads
--rows distinct texts and runs the statement a user runs to fill (or refill) a vector column:

    UPDATE big t SET embedding = e.embedding FROM llm.embeddings e
     WHERE e.input = t.body AND t.embedding IS NULL

(the batched nested loop: 1,000 rows per request, fdw/src/batchjoin_exec.c), sampling every --every
seconds the private memory (RssAnon: not the shared buffers the UPDATE touches) of the backend
and of the sidecar.  Then runs it again, when no row is left to embed, to show that unchanged
rows cost nothing.  Prints the figures and writes bench/results/bulk_update.json.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import corpus, remove, save, scratch_layout, status_mib  # noqa: E402
from deploy import embedded  # noqa: E402

UPDATE = ("UPDATE big t SET embedding = e.embedding FROM llm.embeddings e "
          "WHERE e.input = t.body AND t.embedding IS NULL")


def rss_anon_mb(pid: int) -> float:
    """The private memory of `pid` (not the shared buffers it touches), in MiB."""
    return status_mib(pid, "RssAnon")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--every", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "bulk_update.json"))
    args = parser.parse_args()

    layout = scratch_layout("bench-update")
    samples: list[dict] = []
    try:
        uri = embedded.up(layout, port=embedded.free_port(), demo=False)
        sidecar = embedded.sidecar_pid(layout)
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("CREATE TABLE big (id int PRIMARY KEY, body text, embedding vector(384))")
            with conn.cursor().copy("COPY big (id, body) FROM STDIN") as copy:
                for i, text in enumerate(corpus(args.rows)):
                    copy.write_row((i, f"{text} #{i}"))
            conn.execute("ANALYZE big")
            plan = [r[0] for r in conn.execute("EXPLAIN " + UPDATE)]
            assert any("LLM Batched Nested Loop" in line for line in plan), plan
            backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            done = threading.Event()

            def sample(t0: float) -> None:
                while not done.is_set():
                    samples.append({"s": round(time.monotonic() - t0, 1), "backend_mb": rss_anon_mb(backend),
                                    "sidecar_mb": rss_anon_mb(sidecar)})
                    done.wait(args.every)

            t0 = time.monotonic()
            sampler = threading.Thread(target=sample, args=(t0,))
            sampler.start()
            try:
                conn.execute(UPDATE)
                seconds = time.monotonic() - t0
            finally:
                done.set()
                sampler.join()
            assert conn.execute("SELECT count(*) FROM big WHERE embedding IS NULL").fetchone() == (0,)
            t1 = time.monotonic()
            again = conn.execute(UPDATE).rowcount
            again_seconds = time.monotonic() - t1
    finally:
        remove(layout)

    backend_mb = [s["backend_mb"] for s in samples]
    sidecar_mb = [s["sidecar_mb"] for s in samples]
    print(f"\n{args.rows} rows embedded in place: {seconds:.1f} s, {args.rows / seconds:.0f} rows/s")
    print(f"backend private memory: {min(backend_mb):.0f}-{max(backend_mb):.0f} MB; "
          f"sidecar: {min(sidecar_mb):.0f}-{max(sidecar_mb):.0f} MB ({len(samples)} samples)")
    print(f"again with every row embedded: {again} rows in {again_seconds * 1000:.0f} ms")
    save({"rows": args.rows, "seconds": seconds, "rows_per_s": args.rows / seconds, "plan": plan,
          "samples": samples, "again_rows": again, "again_seconds": again_seconds}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
