"""Soak: does the sidecar's memory plateau under sustained mixed SQL load?

    .venv/bin/python bench/soak_sidecar.py [--minutes 20] [--sessions 16] [--sample-s 30]

Starts its own Postgres and a real sidecar with the packaged models (deploy/embedded.py, in a
temporary directory), applies sql/llm_schema.sql, then runs --sessions Postgres sessions (threads, one
connection each, reconnecting every --reconnect-every queries) that loop over a mix of real SQL
until --minutes are up:
  complete   - llm.completions, one varied prompt, max_tokens 8-32
  embed_one  - llm.embeddings of one varied text
  embed_many - llm.embeddings WHERE input = ANY(20-100 varied texts)
  models     - llm.models
  usage      - llm.usage
  cancel     - a 500-token completion under statement_timeout 200ms (cancelled)
  error      - llm.completions without a prompt qual (refused)
Every --sample-s seconds it reads the sidecar's VmRSS, VmHWM and thread count (with its
llama.cpp worker process's) from
/proc/<pid>/status and prints one line with the queries done so far.  At the end it prints the
curve per minute and the RSS growth in the first and second half of the run, stops everything and
writes bench/results/soak.json.  Every loop is bounded by the deadline (and every query by a
statement_timeout), so it stops by itself.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import WORDS, remove, save, scratch_layout  # noqa: E402
from deploy import embedded  # noqa: E402

KINDS = {"complete": 30, "embed_one": 25, "embed_many": 15, "models": 8, "usage": 8, "cancel": 7, "error": 7}
QUERY_TIMEOUT = "120s"   # no single query may hang the soak
TOPICS = ("France", "databases", "the ocean", "a red bicycle", "prime numbers", "coffee", "Postgres",
          "the moon", "a small cat", "tax forms", "jazz", "volcanoes", "Rust", "tea", "winter")


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def prompt(rng: random.Random) -> str:
    return (f"{rng.choice(('Say', 'Tell me', 'Write', 'Explain'))} something about {rng.choice(TOPICS)} "
            f"and {words(rng, rng.randint(1, 6))} (#{rng.randrange(10**9)}).")


def text(rng: random.Random) -> str:
    return f"{rng.randrange(10**9)} {words(rng, rng.randint(3, 40))}"


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done: Counter[str] = Counter()          # queries finished, by kind
        self.outcomes: Counter[str] = Counter()      # kind/outcome, outcome = ok or the error's class

    def add(self, kind: str, outcome: str) -> None:
        with self.lock:
            self.done[kind] += 1
            self.outcomes[f"{kind}/{outcome}"] += 1

    def snapshot(self) -> tuple[int, dict[str, int]]:
        with self.lock:
            errors = {k: v for k, v in self.outcomes.items() if not k.endswith("/ok")}
            return sum(self.done.values()), errors


def run_query(conn: psycopg.Connection, kind: str, rng: random.Random) -> str:
    """Run one query of `kind`; the outcome the soak expects ('ok', or for cancel and error the
    error class they should raise) or raises."""
    if kind == "complete":
        row = conn.execute("SELECT completion, output_tokens FROM llm.completions WHERE prompt = %s "
                           "AND max_tokens = %s", (prompt(rng), rng.randint(8, 32))).fetchone()
        assert row is not None and row[1] > 0, row
    elif kind == "embed_one":
        row = conn.execute("SELECT vector_dims(embedding) FROM llm.embeddings WHERE input = %s",
                           (text(rng),)).fetchone()
        assert row == (384,), row
    elif kind == "embed_many":
        texts = list({text(rng) for _ in range(rng.randint(20, 100))})
        row = conn.execute("SELECT count(*), sum(vector_dims(embedding)) FROM llm.embeddings "
                           "WHERE input = ANY(%s)", (texts,)).fetchone()
        assert row == (len(texts), 384 * len(texts)), row
    elif kind == "models":
        assert len(conn.execute("SELECT * FROM llm.models").fetchall()) == 2
    elif kind == "usage":
        conn.execute("SELECT * FROM llm.usage").fetchall()
    elif kind == "cancel":
        conn.execute("SET statement_timeout = '200ms'")
        try:
            conn.execute("SELECT completion FROM llm.completions WHERE prompt = %s AND max_tokens = 500",
                         ("Write a very long story about " + prompt(rng),)).fetchall()
            return "not_cancelled"
        except psycopg.errors.QueryCanceled:
            return "ok"
        finally:
            conn.execute(f"SET statement_timeout = '{QUERY_TIMEOUT}'")
    elif kind == "error":
        try:
            conn.execute("SELECT completion FROM llm.completions").fetchall()
            return "not_refused"
        except psycopg.Error as err:
            return "ok" if "prompt" in str(err) else type(err).__name__
    return "ok"


def session(uri: str, seed: int, deadline: float, reconnect_every: int, stats: Stats) -> None:
    rng = random.Random(seed)
    kinds, weights = list(KINDS), list(KINDS.values())
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(uri, autocommit=True, connect_timeout=30) as conn:
                conn.execute(f"SET statement_timeout = '{QUERY_TIMEOUT}'")
                for _ in range(reconnect_every):
                    if time.monotonic() >= deadline:
                        return
                    kind = rng.choices(kinds, weights)[0]
                    try:
                        outcome = run_query(conn, kind, rng)
                    except psycopg.OperationalError as err:
                        stats.add(kind, type(err).__name__)
                        break        # the connection may be gone: open a new one
                    except (psycopg.Error, AssertionError) as err:
                        outcome = type(err).__name__
                    stats.add(kind, outcome)
        except psycopg.OperationalError as err:
            stats.add("connect", type(err).__name__)
            time.sleep(1)


def children(pid: int) -> list[int]:
    """The direct children of `pid` (the sidecar's llama.cpp worker, engines/llama_worker.py)."""
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
            for c in (t / "children").read_text().split()]


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM in MB and the thread count of `pid` and its children, summed (llama.cpp
    runs in a child of the sidecar)."""
    out: dict[str, float] = {}
    for one in [pid, *children(pid)]:
        for line in Path(f"/proc/{one}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = out.get(key, 0) + int(value.split()[0]) / 1024
            elif key == "Threads":
                out[key] = out.get(key, 0) + int(value)
    return out


def growth(curve: list[dict], start_s: float, end_s: float) -> float | None:
    """RSS change in MB between the samples nearest start_s and end_s."""
    pts = [c for c in curve if start_s - 1 <= c["t_s"] <= end_s + 1]
    return round(pts[-1]["rss_mb"] - pts[0]["rss_mb"], 1) if len(pts) >= 2 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--sample-s", type=float, default=30)
    parser.add_argument("--reconnect-every", type=int, default=50, help="queries per connection")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--config", type=Path, default=None,
                        help="sidecar config file (default: the packaged sidecar/llm_sidecar/models.yaml)")
    parser.add_argument("--mix", default="", help="comma-separated kinds to run (default: all), "
                        "e.g. embed_one,embed_many; weights as in KINDS")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "soak.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.mix:
        chosen = [k.strip() for k in args.mix.split(",") if k.strip()]
        unknown = [k for k in chosen if k not in KINDS]
        if unknown:
            parser.error(f"--mix: unknown kinds {unknown}; known: {list(KINDS)}")
        for k in list(KINDS):
            if k not in chosen:
                del KINDS[k]

    layout = scratch_layout("soak")
    stats, curve = Stats(), []
    results: dict = {"minutes": args.minutes, "sessions": args.sessions, "mix": KINDS,
                     "reconnect_every": args.reconnect_every,
                     "config": str(args.config) if args.config else None}
    # a SIGTERM (kill, a time limit) unwinds through the finally below, which stops the sidecar
    # and Postgres this run started
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        uri = embedded.up(layout, port=embedded.free_port(), config=args.config, demo=False)
        pid = embedded.sidecar_pid(layout)
        assert pid is not None, "the sidecar is not running"
        with psycopg.connect(uri, autocommit=True) as conn:   # warm-up: first calls load lazily
            run_query(conn, "complete", random.Random(0))
            run_query(conn, "embed_many", random.Random(0))
        began = time.monotonic()
        deadline = began + args.minutes * 60
        workers = [threading.Thread(target=session, daemon=True, name=f"session-{i}",
                                    args=(uri, args.seed * 1000 + i, deadline, args.reconnect_every, stats))
                   for i in range(args.sessions)]
        for w in workers:
            w.start()

        def sample() -> None:
            st = proc_status(pid)
            done, errors = stats.snapshot()
            t = time.monotonic() - began
            curve.append({"t_s": round(t, 1), "rss_mb": round(st["VmRSS"], 1), "hwm_mb": round(st["VmHWM"], 1),
                          "anon_mb": round(st.get("RssAnon", 0), 1), "file_mb": round(st.get("RssFile", 0), 1),
                          "threads": st["Threads"], "queries": done, "errors": errors})
            unexpected = sum(errors.values())
            print(f"t={t / 60:5.1f} min  rss={st['VmRSS']:7.1f} MB  anon={st.get('RssAnon', 0):7.1f} MB  "
                  f"hwm={st['VmHWM']:7.1f} MB  "
                  f"threads={st['Threads']:3d}  queries={done:6d}  unexpected={unexpected}", flush=True)

        sample()
        next_at = began + args.sample_s
        while time.monotonic() < deadline:
            time.sleep(max(0.0, min(next_at, deadline) - time.monotonic()))
            if time.monotonic() >= next_at:
                sample()
                next_at += args.sample_s
        for w in workers:   # each finishes its query in flight (at most QUERY_TIMEOUT)
            w.join(max(1.0, deadline + 150 - time.monotonic()))
        sample()   # after the last queries finished
        results["still_running_sessions"] = sum(w.is_alive() for w in workers)
        with stats.lock:
            results["queries_by_kind"] = dict(stats.done)
            results["outcomes"] = dict(stats.outcomes)
    finally:
        remove(layout)

    total = curve[-1]["t_s"]
    results["curve"] = curve
    results["rss_start_mb"], results["rss_end_mb"] = curve[0]["rss_mb"], curve[-1]["rss_mb"]
    results["rss_growth_first_half_mb"] = growth(curve, 0, total / 2)
    results["rss_growth_second_half_mb"] = growth(curve, total / 2, total)
    print(f"\n{'minute':>6} {'RSS MB':>8} {'queries':>8}")
    shown = set()
    for c in curve:
        minute = int(c["t_s"] // 60)
        if minute not in shown:
            shown.add(minute)
            print(f"{c['t_s'] / 60:6.1f} {c['rss_mb']:8.1f} {c['queries']:8d}")
    print(f"{curve[-1]['t_s'] / 60:6.1f} {curve[-1]['rss_mb']:8.1f} {curve[-1]['queries']:8d}  (end)")
    print(f"RSS {results['rss_start_mb']} -> {results['rss_end_mb']} MB; growth first half "
          f"{results['rss_growth_first_half_mb']} MB, second half {results['rss_growth_second_half_mb']} MB")
    print(f"queries by kind: {results['queries_by_kind']}")
    print(f"unexpected outcomes: {curve[-1]['errors'] or 'none'}")
    save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
