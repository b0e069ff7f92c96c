"""Benchmark: a backend's peak memory for a generation query over 1,000,000 prompts (issue 18 item 3).

    .venv/bin/python bench/bench_prompt_memory.py [--prompts 1000000] [--timeout 20s]

Starts its own Postgres and sidecar (deploy/embedded.py, in a temporary directory), and, as a plain
role (a member of llm_user), runs

    SELECT count(*) FROM llm.completions WHERE prompt = ANY(ARRAY(SELECT 'p' || g FROM
    generate_series(1, N) g)) AND max_tokens = 50

stopped by statement_timeout (it would run for hours).  Reports the backend's peak resident memory
(VmHWM in /proc) after a warm-up query and after the big one, and writes
bench/results/prompt_memory.json.  Reading another process's /proc status needs the same OS user
or root.
"""
from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import remove, save, scratch_layout, status_mib  # noqa: E402
from deploy import embedded  # noqa: E402

ROLE = "bench_prompts"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=1_000_000)
    parser.add_argument("--timeout", default="20s", help="statement_timeout of the big query")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "prompt_memory.json"))
    args = parser.parse_args()
    layout = scratch_layout("bench-prompt-memory")
    try:
        uri = embedded.up(layout, demo=False)
        password = secrets.token_urlsafe(16)   # TCP on 127.0.0.1 asks for one (scram-sha-256)
        with psycopg.connect(uri, autocommit=True) as admin:
            admin.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{password}'")
            admin.execute(f"GRANT llm_user TO {ROLE}")
        with psycopg.connect(make_conninfo(uri, user=ROLE, password=password), autocommit=True) as c:
            pid = c.info.backend_pid
            c.execute("SELECT completion FROM llm.completions WHERE prompt = 'Say hi.' AND max_tokens = 1").fetchall()
            before = status_mib(pid, "VmHWM")
            c.execute(f"SET statement_timeout = '{args.timeout}'")
            try:
                c.execute("SELECT count(*) FROM llm.completions WHERE prompt = ANY(ARRAY(SELECT 'p' || g "
                          "FROM generate_series(1, %s) g)) AND max_tokens = 50", (args.prompts,))
                ended = "finished"
            except psycopg.errors.QueryCanceled:
                ended = "cancelled by statement_timeout"
            after = status_mib(pid, "VmHWM")
    finally:
        remove(layout)
    results = {"prompts": args.prompts, "statement_timeout": args.timeout, "ended": ended,
               "vmhwm_mib_after_warmup": round(before, 1), "vmhwm_mib_after_query": round(after, 1)}
    print(f"{args.prompts:,} prompts ({ended}): backend VmHWM {before:.0f} MiB after a warm-up, "
          f"{after:.0f} MiB after the query")
    save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
