"""Benchmark: the RAG request shape, one user request per query, at 1 and 16 clients.

    .venv/bin/python bench/bench_rag.py [--rows 100000] [--seconds 20] [--clients 1,16]

One request = embed the question + HNSW top-5 over --rows documents + a 32-token answer from
SmolLM2 (llama.cpp) with the five documents as context, all in one SQL statement
(bench/rag_answer.pgbench). Where the time goes comes from running the request's prefixes as their
own pgbench scripts in the same run: the embedding alone (rag_embed.pgbench), embedding + top-5
(rag_retrieve.pgbench), and the whole request: retrieval = retrieve - embed, answer = whole -
retrieve (p50s). Each question is new (`\\set n random(...)`), the answer bypasses the result cache.

The documents' vectors are random unit vectors made in SQL, not embeddings of their text:
embedding 100,000 texts would take minutes on a small CPU and the ANN lookup's cost depends on the
index's size and dimensions, not on what the vectors mean (the answers are not judged here).
Starts its own Postgres and sidecar (deploy/embedded.py). Writes bench/results/rag.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.bench_interactive import pgbench  # noqa: E402
from bench.common import corpus, remove, save, scratch_layout  # noqa: E402
from deploy import embedded  # noqa: E402

DIMS = 384   # all-minilm-l6-v2
SCRIPTS = {"embed": "rag_embed.pgbench", "retrieve": "rag_retrieve.pgbench", "answer": "rag_answer.pgbench"}


def make_documents(uri: str, rows: int) -> dict:
    """rag_docs(id, body, embedding vector(384)) with random unit vectors and an HNSW index;
    how long the load and the index build took."""
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS rag_docs")
        conn.execute(f"CREATE TABLE rag_docs (id bigint PRIMARY KEY, body text NOT NULL, embedding vector({DIMS}))")
        started = time.perf_counter()
        with conn.cursor().copy("COPY rag_docs (id, body) FROM STDIN") as copy:
            for i, text in enumerate(corpus(rows)):
                copy.write_row((i, text))
        conn.execute(f"""UPDATE rag_docs SET embedding = l2_normalize((SELECT array_agg(random() - 0.5)
                           FROM generate_series(1, {DIMS}) WHERE rag_docs.id IS NOT NULL)::vector({DIMS}))""")
        loaded = time.perf_counter() - started
        conn.execute("SET maintenance_work_mem = '512MB'")
        started = time.perf_counter()
        conn.execute("CREATE INDEX ON rag_docs USING hnsw (embedding vector_cosine_ops)")
        indexed = time.perf_counter() - started
        conn.execute("ANALYZE rag_docs")
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN " + (REPO / "bench" / SCRIPTS["retrieve"]).read_text().split("\n", 1)[1]
            .replace(":n", "1").rstrip().rstrip(";")))
    return {"rows": rows, "load_s": round(loaded, 1), "hnsw_build_s": round(indexed, 1),
            "retrieve_uses_hnsw": "rag_docs_embedding_idx" in plan}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--seconds", type=int, default=20, help="per pgbench run")
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "rag.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results: dict = {"command": " ".join([".venv/bin/python", "bench/bench_rag.py"] + sys.argv[1:]),
                     "load_average_before": os.getloadavg()}
    layout = scratch_layout("bench-rag")
    try:
        uri = embedded.up(layout, port=embedded.free_port(), demo=False)
        results["documents"] = make_documents(uri, args.rows)
        with psycopg.connect(uri, autocommit=True) as conn:   # load both models before timing
            conn.execute("SELECT embedding FROM llm.embeddings WHERE input = 'warm up'").fetchall()
            conn.execute("SELECT completion FROM llm.completions WHERE prompt = 'Hi' AND max_tokens = 2").fetchall()
        runs: dict = {}
        for clients in (int(c) for c in args.clients.split(",")):
            runs[str(clients)] = {stage: pgbench(uri, script, clients, args.seconds)
                                  for stage, script in SCRIPTS.items()}
            r = runs[str(clients)]
            r["where_p50_ms"] = {"embed": r["embed"]["p50_ms"],
                                 "retrieve": round(r["retrieve"]["p50_ms"] - r["embed"]["p50_ms"], 2),
                                 "answer": round(r["answer"]["p50_ms"] - r["retrieve"]["p50_ms"], 2)}
        results["clients"] = runs
    finally:
        remove(layout)
    results["load_average_after"] = os.getloadavg()
    report(results)
    save(results, args.out)
    return 0


def report(r: dict) -> None:
    """The table on stdout."""
    d = r["documents"]
    print(f"\n{d['rows']} documents (random unit vectors), HNSW build {d['hnsw_build_s']} s, "
          f"retrieval plan uses the index: {d['retrieve_uses_hnsw']}; load average before "
          f"{r['load_average_before']}, after {r['load_average_after']}")
    print(f"{'clients':>8} {'script':<10}{'q/s':>8}{'p50':>9}{'p95':>9}{'failed':>8}")
    for clients, runs in r["clients"].items():
        for stage in SCRIPTS:
            x = runs[stage]
            print(f"{clients:>8} {stage:<10}{x['qps']:>8.1f}{x['p50_ms']:>9.1f}{x['p95_ms']:>9.1f}{x['failed']:>8}")
        print(f"{'':>8} where the request's p50 goes (ms): {runs['where_p50_ms']}")


if __name__ == "__main__":
    sys.exit(main())
