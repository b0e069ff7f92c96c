"""Benchmark: how fast a cancel ends an llm query, with other sessions loading the sidecar.

    .venv/bin/python bench/bench_cancel.py [--loads 0,4,8,14] [--cancels 20]

Starts its own Postgres and sidecar (deploy/embedded.py, in a temporary directory).  For each
number of loading sessions (--loads), that many sessions run mixed work in a loop (an embedding
query of 500 texts, a 64-token completion), each from a client process of its own (as other
applications' connections are: threads of this process would make the victim's client wait for
this process's GIL), while one more session runs, --cancels times, one of the victim queries
below and is cancelled with pg_cancel_backend from another connection at a random moment
0.2-1.2 s into it:

  generate    - one completion of up to 1,500 tokens;
  embed_bulk  - `input = ANY(...)` over 200,000 distinct texts (parts of 4,096 to the sidecar);
  join        - a LATERAL join of 4 long completions (the batched nested loop).

The latency is the time from pg_cancel_backend's return to the victim's error at its client
(what a user's Ctrl-C waits for).  Prints median, p90, p99 and max per load and writes
bench/results/cancel.json.  The goal (issue 18): p99 <= 50 ms at every load.  Also given: the
server side of it, from the cancel to the backend's ERROR in the server log (its millisecond
timestamp, written just before the error goes to the client).

Where /proc/<pid>/schedstat of the victim backend is readable (the same OS user as the server, or
root), each cancel's latency is also split into the backend's main thread's time on a CPU and its
time waiting in the run queue for one: on a machine busier than its cores, the wait for a CPU
dominates the tail, and the CPU time is what the code after a cancel costs.
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing
import random
import re
import statistics
import sys
import threading
import time
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import corpus, remove, save, scratch_layout  # noqa: E402
from deploy import embedded  # noqa: E402

LONG = "Write a very long story about a dragon and a knight, with many chapters."
VICTIMS = {
    "generate": ("SELECT completion FROM llm.completions WHERE prompt = %s AND max_tokens = 1500", (LONG,)),
    "embed_bulk": ("SELECT count(*) FROM llm.embeddings WHERE input = ANY(ARRAY("
                   "SELECT 'cancel me ' || g || ' ' || md5(g::text) FROM generate_series(1, 200000) g))", None),
    "join": ("SELECT c.completion FROM generate_series(1, 4) g, LATERAL (SELECT * FROM llm.completions "
             "WHERE prompt = %s || ' Chapter ' || g AND max_tokens = 1500) c", (LONG,)),
}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank), so p99 of 20 samples is the largest."""
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, max(0, int(round(q / 100 * len(ranked) + 0.5)) - 1))]


def load_session(uri: str, stop, errors) -> None:
    """Mixed work until `stop` (a process's Event): an embedding query of 500 texts, then a short
    completion; each failure's first line goes to `errors` (a process's Queue)."""
    texts = corpus(5000)
    with psycopg.connect(uri, autocommit=True) as conn:
        i = 0
        while not stop.is_set():
            try:
                start = (i * 500) % (len(texts) - 500)
                conn.execute("SELECT count(*) FROM llm.embeddings WHERE input = ANY(%s)", (texts[start:start + 500],))
                conn.execute("SELECT completion FROM llm.completions WHERE prompt = %s AND max_tokens = 64",
                             (f"Tell me fact number {i} about databases.",))
            except psycopg.Error as err:
                errors.put(str(err).splitlines()[0])
            i += 1


# Postgres's default log_line_prefix, '%m [%p] ': the time in milliseconds, then the pid.
CANCEL_LOGGED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) (\S+) \[(\d+)\] ERROR:  "
                           r"canceling statement due to user request", re.M)


def server_side_ms(log: str, cancels: list[tuple[int, float]]) -> list[float]:
    """For each (backend pid, wall-clock time pg_cancel_backend returned): milliseconds until
    that backend logged its cancel (the log's UTC timestamps; negative: before the call returned)."""
    logged: dict[int, list[float]] = {}
    for m in CANCEL_LOGGED.finditer(log):
        if m.group(2) == "UTC":
            at = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=datetime.timezone.utc)
            logged.setdefault(int(m.group(3)), []).append(at.timestamp())
    return [(min((t for t in logged.get(pid, ()) if t > sent - 1.0), default=float("nan")) - sent) * 1000
            for pid, sent in cancels]


def schedstat(pid: int) -> tuple[float, float] | None:
    """(ms on a CPU, ms waiting in the run queue) of the backend's main thread so far, or None."""
    try:
        on_cpu, waiting = open(f"/proc/{pid}/task/{pid}/schedstat").read().split()[:2]
    except (OSError, ValueError):
        return None
    return int(on_cpu) / 1e6, int(waiting) / 1e6


def cancel_once(uri: str, kind: str, rng: random.Random) -> tuple[float, tuple[float, float] | None, tuple[int, float]]:
    """Run victim `kind`, cancel it at a random moment: seconds from the cancel to the error, the
    backend's (CPU ms, run-queue ms) over that time when /proc says, and (its pid, the wall-clock
    time the cancel returned) for server_side_ms."""
    sql, params = VICTIMS[kind]
    with psycopg.connect(uri, autocommit=True) as victim, psycopg.connect(uri, autocommit=True) as other:
        pid = victim.info.backend_pid
        victim.execute("SELECT 1 FROM llm.models LIMIT 1")   # the backend's Python and channel are up
        ended: dict[str, float] = {}

        def run() -> None:
            try:
                victim.execute(sql, params)
            except psycopg.errors.QueryCanceled:
                ended["at"] = time.monotonic()

        thread = threading.Thread(target=run)
        thread.start()
        time.sleep(rng.uniform(0.2, 1.2))
        before = schedstat(pid)
        other.execute("SELECT pg_cancel_backend(%s)", (pid,))
        sent, sent_wall = time.monotonic(), time.time()
        thread.join(60)
        if "at" not in ended:
            raise RuntimeError(f"{kind}: the query was not cancelled (finished first, or hung)")
        after = schedstat(pid)
        split = (after[0] - before[0], after[1] - before[1]) if before and after else None
        return ended["at"] - sent, split, (pid, sent_wall)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", default="0,4,8,14", help="numbers of loading sessions, comma-separated")
    parser.add_argument("--cancels", type=int, default=20, help="cancels per load")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "cancel.json"))
    args = parser.parse_args()
    loads = [int(n) for n in args.loads.split(",")]
    rng = random.Random(18)
    processes = multiprocessing.get_context("spawn")
    layout = scratch_layout("bench-cancel")
    results: dict = {"loads": {}}
    try:
        uri = embedded.up(layout, demo=False)
        for load in loads:
            stop, errors = processes.Event(), processes.Queue()
            workers = [processes.Process(target=load_session, args=(uri, stop, errors), daemon=True)
                       for _ in range(load)]
            for w in workers:
                w.start()
            time.sleep(2 if load else 0)
            latencies: dict[str, list[float]] = {kind: [] for kind in VICTIMS}
            splits: list[tuple[float, float]] = []
            sent: list[tuple[int, float]] = []
            try:
                for i in range(args.cancels):
                    kind = list(VICTIMS)[i % len(VICTIMS)]
                    latency, split, cancel = cancel_once(uri, kind, rng)
                    latencies[kind].append(latency)
                    sent.append(cancel)
                    if split:
                        splits.append(split)
            finally:
                stop.set()
                for w in workers:
                    w.join(120)
            load_errors = 0
            while not errors.empty():
                errors.get()
                load_errors += 1
            every = [ms * 1000 for values in latencies.values() for ms in values]
            server = [ms for ms in server_side_ms(layout.pg_log.read_text(errors="replace"), sent) if ms == ms]
            row = {"sessions": load, "cancels": len(every), "median_ms": statistics.median(every),
                   "p90_ms": percentile(every, 90), "p99_ms": percentile(every, 99), "max_ms": max(every),
                   "max_ms_by_kind": {k: max(v) * 1000 for k, v in latencies.items() if v},
                   "load_errors": load_errors}
            if server:
                row.update(server_side_median_ms=statistics.median(server), server_side_p99_ms=percentile(server, 99),
                           server_side_logged=len(server))
            if splits:
                cpu, queue = [c for c, _ in splits], [q for _, q in splits]
                row.update(cpu_ms_median=statistics.median(cpu), cpu_ms_max=max(cpu),
                           runqueue_ms_median=statistics.median(queue), runqueue_ms_max=max(queue))
            results["loads"][str(load)] = row
            print(f"{load:>3} loading sessions: {row['cancels']} cancels, median {row['median_ms']:.1f} ms, "
                  f"p90 {row['p90_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, max {row['max_ms']:.1f} ms "
                  f"(by kind: {', '.join(f'{k} {v:.0f}' for k, v in row['max_ms_by_kind'].items())}; "
                  f"load errors {row['load_errors']})", flush=True)
            if server:
                print(f"      server side (cancel to the backend's logged error): median "
                      f"{row['server_side_median_ms']:.1f} ms, p99 {row['server_side_p99_ms']:.1f} ms "
                      f"({len(server)} of {len(sent)} found in the log)", flush=True)
            if splits:
                print(f"      backend after the cancel: on a CPU median {row['cpu_ms_median']:.1f} ms, max "
                      f"{row['cpu_ms_max']:.1f} ms; waiting for a CPU median {row['runqueue_ms_median']:.1f} ms, "
                      f"max {row['runqueue_ms_max']:.1f} ms", flush=True)
    finally:
        remove(layout)
    save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
