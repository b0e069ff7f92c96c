"""Classification through SQL vs the same engine called directly, and the accuracy of three ways to classify.

    make bench-classify        (or .venv/bin/python bench/bench_classify.py --rows 1000)

Throughput: `rows` reviews classified into positive/negative by
    SELECT ... FROM reviews r CROSS JOIN LATERAL llm.classify_each(r.body, ARRAY[...]) c
(the batched nested loop: one prompt = ANY(...) request per batch of rows), against the sidecar's
own llama.cpp engine (LlamaCppEngine, the sidecar's settings) loaded in this process, given the
very same prompts (llm.classify_prompt's text) and constraint (the labels as choices), with as many
requests in flight as the model has slots.  The two alternate in --rounds rounds over disjoint rows
(so both meet the same machine load, and no result cache answers); the ratio is SQL rows/s over
engine rows/s over all rounds, and is also given per round.  Before the rounds, the engine
answers the accuracy pass's prompts as the sidecar did (llama.cpp's prompt cache then starts
both sides alike: without it the engine's first round ran ~20% slower).

Accuracy, on bench/data/sentiment.csv (80 short reviews we wrote, 40 positive, 40 negative), of:
  classify     llm.classify_each (the template, the labels as choices: always a label);
  plain        the same prompt, no constraint, the answer parsed: the one label it names (a text
               naming none or both counts as wrong, and is also reported as unparsed);
  json_schema  the same prompt under {"label": enum of the labels} (completion_json ->> 'label').
Results go to bench/results/classify.json.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deploy import embedded  # noqa: E402
from bench.common import remove, save, scratch_layout  # noqa: E402

LABELS = ["positive", "negative"]
DATA = REPO / "bench" / "data" / "sentiment.csv"
LABEL_SCHEMA = {"type": "object", "properties": {"label": {"enum": LABELS}}, "required": ["label"],
                "additionalProperties": False}


def labelled() -> list[tuple[str, str]]:
    with DATA.open(newline="", encoding="utf-8") as fh:
        return [(row["text"], row["label"]) for row in csv.DictReader(fh)]


def named_label(text: str) -> str | None:
    """The one label a free-text answer names, or None (none or several)."""
    found = [label for label in LABELS if label in text.lower()]
    return found[0] if len(found) == 1 else None


def accuracy(conn: psycopg.Connection, data: list[tuple[str, str]]) -> dict:
    conn.execute("CREATE TABLE labelled (id int PRIMARY KEY, body text, truth text)")
    with conn.cursor().copy("COPY labelled FROM STDIN") as copy:
        for i, (text, label) in enumerate(data):
            copy.write_row((i, text, label))
    conn.execute("ANALYZE labelled")
    classify = conn.execute("SELECT l.truth, c.label FROM labelled l CROSS JOIN LATERAL "
                            "llm.classify_each(l.body, %s) c", (LABELS,)).fetchall()
    plain = conn.execute("SELECT l.truth, c.completion FROM labelled l JOIN llm.completions c "
                         "ON c.prompt = llm.classify_prompt(l.body, %s) WHERE c.temperature = 0 AND c.max_tokens = 8",
                         (LABELS,)).fetchall()
    schema = conn.execute("SELECT l.truth, c.completion_json ->> 'label' FROM labelled l JOIN llm.completions c "
                          "ON c.prompt = llm.classify_prompt(l.body, %s) WHERE c.temperature = 0 "
                          "AND c.json_schema = %s", (LABELS, Jsonb(LABEL_SCHEMA))).fetchall()
    parsed = [(truth, named_label(text)) for truth, text in plain]
    n = len(data)
    return {
        "rows": n,
        "classify": sum(t == p for t, p in classify) / n,
        "plain_completion_parsed": sum(t == p for t, p in parsed) / n,
        "plain_unparsed": sum(p is None for _, p in parsed) / n,
        "json_schema": sum(t == p for t, p in schema) / n,
        "predicted_positive": {"classify": sum(p == "positive" for _, p in classify) / n,
                               "json_schema": sum(p == "positive" for _, p in schema) / n},
    }


def make_reviews(conn: psycopg.Connection, data: list[tuple[str, str]], rows: int) -> None:
    """`rows` distinct reviews (so that neither side's result cache answers), and the plan check."""
    conn.execute("CREATE TABLE reviews (id int PRIMARY KEY, body text)")
    with conn.cursor().copy("COPY reviews FROM STDIN") as copy:
        for i in range(rows):
            copy.write_row((i, f"{data[i % len(data)][0]} (review {i})"))
    conn.execute("ANALYZE reviews")
    plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (COSTS OFF) " + SQL, (LABELS, 0, rows)))
    assert "LLM Batched Nested Loop" in plan, plan
    print(plan)


SQL = ("SELECT r.id, c.label FROM reviews r CROSS JOIN LATERAL llm.classify_each(r.body, %s) c "
       "WHERE r.id >= %s AND r.id < %s")


def through_sql(conn: psycopg.Connection, first: int, end: int) -> tuple[float, list[str]]:
    """Seconds to classify reviews [first, end) through SQL, and the prompts it sent."""
    started = time.perf_counter()
    got = conn.execute(SQL, (LABELS, first, end)).fetchall()
    seconds = time.perf_counter() - started
    assert len(got) == end - first and all(label in LABELS for _, label in got)
    prompts = [r[0] for r in conn.execute("SELECT llm.classify_prompt(body, %s) FROM reviews "
                                          "WHERE id >= %s AND id < %s ORDER BY id", (LABELS, first, end))]
    return seconds, prompts


class Engine:
    """llama.cpp's server (xllamacpp) in this process, built as the sidecar's engine builds it
    (LlamaCppEngine.settings, llama_worker's own constructor), given the request body the
    sidecar's engine sends (the labels as choices), as many at once as one session may run."""

    def __init__(self) -> None:
        from llm_sidecar.config import load_config
        from llm_sidecar.engines.base import GenerateParams
        from llm_sidecar.engines.llama_cpp import LlamaCppEngine

        self.config = next(m for m in load_config().models if m.task == "generate")
        self.engine = LlamaCppEngine(self.config)
        self.params = GenerateParams({"max_tokens": 128, "temperature": 0.0}, choices=tuple(LABELS))
        self.server = None
        self.directory = ""

    def load(self) -> None:
        from llm_sidecar.engines.llama_worker import build_server

        self.server, self.directory = build_server(self.engine.settings())

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def answer(self, prompt: str) -> str:
        kind, body = self.engine._request(prompt, "", False, self.params)
        parts: list[str] = []

        def on_chunk(chunk: dict) -> bool:
            parts.extend((c.get("delta") or {}).get("content") or "" for c in chunk.get("choices", ()))
            return False
        self.server.handle_chat_completions(body, on_chunk)
        return "".join(parts)

    async def one(self, prompt: str, slots: asyncio.Semaphore) -> str:
        async with slots:
            return await asyncio.to_thread(self.answer, prompt)

    async def seconds(self, prompts: list[str]) -> float:
        """Seconds to answer all the prompts."""
        slots = asyncio.Semaphore(self.config.parallel)
        started = time.perf_counter()
        answers = await asyncio.gather(*(self.one(p, slots) for p in prompts))
        elapsed = time.perf_counter() - started
        assert all(a in LABELS for a in answers)
        return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4, help="alternating SQL / engine rounds over disjoint rows")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "classify.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = labelled()
    bounds = [args.rows * r // args.rounds for r in range(args.rounds + 1)]
    layout = scratch_layout("classify")
    sql_s, engine_s, ratios = [], [], []
    loop = asyncio.new_event_loop()
    loop.set_default_executor(ThreadPoolExecutor(32))   # asyncio's default has 6 threads on 2 CPUs
    engine = Engine()
    try:
        uri = embedded.up(layout, port=embedded.free_port(), demo=False)
        engine.load()
        loop.run_until_complete(engine.seconds(["warm-up"]))
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("SELECT llm.classify('warm-up', %s)", (LABELS,))
            scores = accuracy(conn, data)
            seen = [r[0] for r in conn.execute("SELECT llm.classify_prompt(body, %s) FROM labelled ORDER BY id",
                                               (LABELS,))]
            loop.run_until_complete(engine.seconds(seen))   # what the sidecar's prompt cache has seen
            make_reviews(conn, data, args.rows)
            # alternating rounds on disjoint rows: both sides see the same machine load
            for first, end in zip(bounds, bounds[1:]):
                seconds, prompts = through_sql(conn, first, end)
                sql_s.append(seconds)
                engine_s.append(loop.run_until_complete(engine.seconds(prompts)))
                ratios.append(engine_s[-1] / sql_s[-1])
                print(f"round of {end - first} rows: SQL {seconds:.1f} s, engine {engine_s[-1]:.1f} s, "
                      f"SQL / engine {ratios[-1]:.2f}")
    finally:
        engine.close()
        loop.close()
        remove(layout)
    sql_total, engine_total = sum(sql_s), sum(engine_s)
    results = {
        "rows": args.rows, "rounds": args.rounds, "labels": LABELS, "data": str(DATA.relative_to(REPO)),
        "sql": {"seconds": sql_total, "rows_per_s": args.rows / sql_total, "rounds_s": sql_s},
        "engine": {"seconds": engine_total, "rows_per_s": args.rows / engine_total, "rounds_s": engine_s},
        "sql_vs_engine": engine_total / sql_total,
        "sql_vs_engine_by_round": ratios,
        "load_average_after": os.getloadavg(),
        "accuracy": scores,
    }
    print(f"\nClassifying {args.rows} rows into {LABELS} (SmolLM2-135M, {os.cpu_count()} CPUs)")
    print(f"  SQL (llm.classify_each, batched):  {results['sql']['rows_per_s']:7.1f} rows/s  ({sql_total:.1f} s)")
    print(f"  engine called directly (choices): {results['engine']['rows_per_s']:7.1f} rows/s  ({engine_total:.1f} s)")
    print(f"  SQL / engine: {results['sql_vs_engine']:.2f} "
          f"(by round: {', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"Accuracy on {scores['rows']} labelled reviews ({results['data']}):")
    print(f"  llm.classify (choices)       {scores['classify']:.1%}")
    print(f"  plain completion + parsing   {scores['plain_completion_parsed']:.1%} "
          f"(unparsed {scores['plain_unparsed']:.1%})")
    print(f"  json_schema (enum)           {scores['json_schema']:.1%}")
    save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
