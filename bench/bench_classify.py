"""Classification through SQL vs the same engine called directly, and the accuracy of three ways to classify.

    make bench-classify        (or .venv/bin/python bench/bench_classify.py --rows 1000)

Throughput: `rows` reviews classified into positive/negative by
    SELECT ... FROM reviews r CROSS JOIN LATERAL llm.classify_each(r.body, ARRAY[...]) c
(the batched nested loop: one prompt = ANY(...) request per batch of rows), against the sidecar's
own llama.cpp engine (LlamaCppEngine) loaded in this process after the deployment is gone, given
the very same prompts (llm.classify_prompt's text) and constraint (the labels as choices), with
as many requests in flight as the model has slots.  The ratio is SQL rows/s over engine rows/s.

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
import sys
import time
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


def through_sql(conn: psycopg.Connection, data: list[tuple[str, str]], rows: int) -> tuple[float, list[str]]:
    """Seconds to classify `rows` distinct reviews through SQL, and the prompts it sent."""
    conn.execute("CREATE TABLE reviews (id int PRIMARY KEY, body text)")
    with conn.cursor().copy("COPY reviews FROM STDIN") as copy:
        for i in range(rows):
            copy.write_row((i, f"{data[i % len(data)][0]} (review {i})"))
    conn.execute("ANALYZE reviews")
    sql = "SELECT r.id, c.label FROM reviews r CROSS JOIN LATERAL llm.classify_each(r.body, %s) c"
    plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (COSTS OFF) " + sql, (LABELS,)))
    assert "LLM Batched Nested Loop" in plan, plan
    print(plan)
    started = time.perf_counter()
    got = conn.execute(sql, (LABELS,)).fetchall()
    seconds = time.perf_counter() - started
    assert len(got) == rows and all(label in LABELS for _, label in got)
    prompts = [r[0] for r in conn.execute("SELECT llm.classify_prompt(body, %s) FROM reviews ORDER BY id", (LABELS,))]
    return seconds, prompts


async def engine_alone(prompts: list[str]) -> float:
    """Seconds for the sidecar's llama.cpp engine, in this process, to answer the prompts under
    the same constraint, as many at once as the model has slots."""
    from llm_sidecar.config import load_config
    from llm_sidecar.engines.base import GenerateParams
    from llm_sidecar.engines.llama_cpp import LlamaCppEngine
    from llm_sidecar.metering import Metered

    config = next(m for m in load_config().models if m.task == "generate")
    engine = LlamaCppEngine(config)
    await engine.load()
    params = GenerateParams({"max_tokens": 128, "temperature": 0.0}, choices=tuple(LABELS))
    slots = asyncio.Semaphore(config.parallel)

    async def one(prompt: str) -> str:
        async with slots:
            return "".join([e async for e in engine.generate(prompt, "", False, params, Metered())
                            if isinstance(e, str)])

    try:
        await one("warm-up")
        started = time.perf_counter()
        answers = await asyncio.gather(*(one(p) for p in prompts))
        seconds = time.perf_counter() - started
    finally:
        await engine.close()
    assert all(a in LABELS for a in answers)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "classify.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = labelled()
    layout = scratch_layout("classify")
    try:
        uri = embedded.up(layout, port=embedded.free_port(), demo=False)
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("SELECT llm.classify('warm-up', %s)", (LABELS,))
            scores = accuracy(conn, data)
            sql_s, prompts = through_sql(conn, data, args.rows)
    finally:
        remove(layout)
    engine_s = asyncio.run(engine_alone(prompts))
    results = {
        "rows": args.rows, "labels": LABELS, "data": str(DATA.relative_to(REPO)),
        "sql": {"seconds": sql_s, "rows_per_s": args.rows / sql_s},
        "engine": {"seconds": engine_s, "rows_per_s": args.rows / engine_s},
        "sql_vs_engine": engine_s / sql_s,
        "accuracy": scores,
    }
    print(f"\nClassifying {args.rows} rows into {LABELS} (SmolLM2-135M, {os.cpu_count()} CPUs)")
    print(f"  SQL (llm.classify_each, batched):  {results['sql']['rows_per_s']:7.1f} rows/s  ({sql_s:.1f} s)")
    print(f"  engine called directly (choices): {results['engine']['rows_per_s']:7.1f} rows/s  ({engine_s:.1f} s)")
    print(f"  SQL / engine: {results['sql_vs_engine']:.2f}")
    print(f"Accuracy on {scores['rows']} labelled reviews ({results['data']}):")
    print(f"  llm.classify (choices)       {scores['classify']:.1%}")
    print(f"  plain completion + parsing   {scores['plain_completion_parsed']:.1%} "
          f"(unparsed {scores['plain_unparsed']:.1%})")
    print(f"  json_schema (enum)           {scores['json_schema']:.1%}")
    save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
