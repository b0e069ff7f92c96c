"""Draw each dashboard as a PNG from real query results, so a reader sees what the panels show
without a Grafana (docs/llmfdw-postgres.png, docs/llmfdw-prometheus.png).

Every panel's own query runs as Grafana would run it (dashboards/grafana.py: variables with "All"
selected, macros expanded): the SQL panels against PostgreSQL (as a role with llm_dashboard), the
PromQL panels over /api/v1/query_range of a Prometheus that scrapes the sidecar.  Then a grid of
panels: time series as lines (or bars where the panel draws bars), tables as tables.

    make docs     # the test cluster: tests/test_prometheus.py renders into docs/ (LLMFDW_RENDER_DOCS)
    .venv/bin/python dashboards/render_png.py --dsn postgresql://grafana:PASSWORD@127.0.0.1:5432/llmfdw \\
        --prometheus http://127.0.0.1:9090 --out docs      # against `make up` and your Prometheus

Needs matplotlib (requirements-docs.txt), which `make test` does not install.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import textwrap
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dashboards import grafana  # noqa: E402

UTC = dt.timezone.utc


def _when(value) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromtimestamp(float(value), tz=UTC)


def _number(value):
    return float(value) if isinstance(value, (int, float, Decimal)) else None


def sql_panels(dsn: str, start: dt.datetime, end: dt.datetime) -> list[dict]:
    """Each panel of the PostgreSQL dashboard with its result: {panel, series | table}."""
    import psycopg

    board = grafana.load("llmfdw-postgres.json")
    out = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        values = {}
        for var in grafana.variables(board):
            values[var["name"]] = [r[0] for r in conn.execute(
                grafana.expand_sql_macros(var["query"], start, end)).fetchall()]
        for panel in board["panels"]:
            target = panel["targets"][0]
            sql = grafana.expand_sql_macros(grafana.interpolate(target["rawSql"], values, "sql"), start, end)
            cur = conn.execute(sql)
            columns, rows = [d.name for d in cur.description], cur.fetchall()
            item = {"panel": panel}
            if target.get("format") == "table":
                item["table"] = (columns, rows)
            else:
                series: dict[str, list] = defaultdict(list)
                if "metric" in columns:           # long format: time, metric, value
                    m, v = columns.index("metric"), next(i for i, c in enumerate(columns) if c not in ("time", "metric"))
                    for row in rows:
                        series[row[m]].append((_when(row[0]), _number(row[v])))
                else:                              # wide format: time, one column per series
                    for row in rows:
                        for name, value in zip(columns[1:], row[1:]):
                            series[name].append((_when(row[0]), _number(value)))
                item["series"] = dict(series)
            out.append(item)
    return out


def prometheus_panels(url: str, start: dt.datetime, end: dt.datetime, rate_interval: str = "1m",
                      step: float = 5) -> list[dict]:
    board = grafana.load("llmfdw-prometheus.json")
    all_values = {v["name"]: v.get("allValue") for v in grafana.variables(board)}
    out = []
    for panel in board["panels"]:
        series = {}
        for target in panel["targets"]:
            expr = grafana.interpolate(target["expr"], {"model": "$__all"}, "promql", all_values)
            expr = expr.replace("$__rate_interval", rate_interval).replace("$__interval", f"{step:g}s")
            query = urllib.parse.urlencode({"query": expr, "start": start.timestamp(), "end": end.timestamp(),
                                            "step": step})
            with urllib.request.urlopen(f"{url}/api/v1/query_range?{query}", timeout=30) as response:
                body = json.loads(response.read())
            for result in body["data"]["result"]:
                legend = target.get("legendFormat") or json.dumps(result["metric"])
                for key, value in result["metric"].items():
                    legend = legend.replace("{{" + key + "}}", value)
                points = [(_when(t), float(v)) for t, v in result["values"]]
                series[legend] = points
        out.append({"panel": panel, "series": series})
    return out


def draw(title: str, results: list[dict], path: Path, subtitle: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    charts = [r for r in results if "series" in r]
    tables = [r for r in results if "table" in r]
    cols = 3
    chart_rows = -(-len(charts) // cols)
    heights = [3.2] * chart_rows + [0.6 + 0.28 * min(len(r["table"][1]) + 1, 14) for r in tables]
    fig = plt.figure(figsize=(19, sum(heights) + 1.2), dpi=100)
    grid = fig.add_gridspec(len(heights), cols, height_ratios=heights, hspace=0.55, wspace=0.18)
    fig.suptitle(f"{title}\n{subtitle}", fontsize=14, y=0.995)
    for i, item in enumerate(charts):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        panel = item["panel"]
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        bars = panel.get("fieldConfig", {}).get("defaults", {}).get("custom", {}).get("drawStyle") == "bars"
        ax.set_title(f"{panel['title']}" + (f"  [{unit}]" if unit and unit != "short" else ""), fontsize=10)
        drawn = 0
        bottoms: dict = defaultdict(float)
        for name, points in sorted(item["series"].items()):
            points = [(t, v) for t, v in points if v is not None and v == v]
            if not points:
                continue
            times, values = zip(*points)
            if bars:
                ax.bar(times, values, width=40 / 86400, bottom=[bottoms[t] for t in times], label=name)
                for t, v in points:
                    bottoms[t] += v
            else:
                ax.plot(times, values, marker="o" if len(points) < 4 else None, markersize=3, label=name)
            drawn += 1
        if drawn:
            ax.legend(fontsize=7, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=UTC))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    for j, item in enumerate(tables):
        ax = fig.add_subplot(grid[chart_rows + j, :])
        ax.axis("off")
        ax.set_title(item["panel"]["title"], fontsize=10, loc="left")
        columns, rows = item["table"]
        rows = rows[:13]
        cells = [[_cell(v) for v in row] for row in rows] or [["(no rows)"] + [""] * (len(columns) - 1)]
        table = ax.table(cellText=cells, colLabels=columns, loc="upper left", cellLoc="left")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        table.auto_set_column_width(list(range(len(columns))))
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _cell(value) -> str:
    if isinstance(value, dt.datetime):
        return value.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3]
    if isinstance(value, float):
        return f"{value:.1f}"
    return textwrap.shorten(str(value), 40) if value is not None else ""


def traffic(dsn: str, minutes: float = 0) -> None:
    """Some requests (as the tests make), for `minutes` more when asked: a chart needs a few minutes."""
    import psycopg

    deadline = time.monotonic() + minutes * 60
    i = 0
    with psycopg.connect(dsn, autocommit=True) as c:
        while True:
            n = 4 + i % 7
            c.execute("SELECT completion FROM llm.completions WHERE prompt = ANY(%s) AND max_tokens = %s",
                      ([f"Round {i}: name a colour ({k})." for k in range(n)], 4 + 4 * (i % 3))).fetchall()
            c.execute("SELECT embedding FROM llm.embeddings WHERE input = ANY(%s)",
                      ([f"round {i} text {k}" for k in range(8 + 8 * (i % 4))],)).fetchall()
            if i % 3 == 0:
                try:
                    c.execute("SELECT completion FROM llm.completions WHERE prompt = 'x' AND model = 'no-such-model'")
                except psycopg.Error:
                    pass
            c.execute("SELECT * FROM llm.usage").fetchall()
            i += 1
            if time.monotonic() >= deadline:
                break
            time.sleep(2)


def render_all(dsn: str, prometheus: str | None, out: Path, rate_interval: str = "1m",
               minutes: float = 10) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    end = dt.datetime.now(UTC) + dt.timedelta(seconds=1)
    start = end - dt.timedelta(minutes=minutes)
    when = f"real results, {start:%Y-%m-%d %H:%M} to {end:%H:%M} UTC"
    paths = [draw("llmfdw: requests (PostgreSQL)", sql_panels(dsn, start, end), out / "llmfdw-postgres.png",
                  f"helm/files/dashboards/llmfdw-postgres.json, {when}")]
    if prometheus:
        paths.append(draw("llmfdw: sidecar (Prometheus)", prometheus_panels(prometheus, start, end, rate_interval),
                          out / "llmfdw-prometheus.png", f"helm/files/dashboards/llmfdw-prometheus.json, {when}"))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True, help="a role with llm_dashboard, e.g. postgresql://grafana:PASSWORD@127.0.0.1/llmfdw")
    parser.add_argument("--prometheus", help="Prometheus URL that scrapes the sidecar (omit: PostgreSQL only)")
    parser.add_argument("--out", default="docs", type=Path)
    parser.add_argument("--minutes", type=float, default=10, help="the time range drawn (default 10)")
    parser.add_argument("--traffic-minutes", type=float, default=None,
                        help="make requests first, for this many minutes (the DSN's role must have llm_user)")
    args = parser.parse_args()
    if args.traffic_minutes is not None:
        traffic(args.dsn, args.traffic_minutes)
    for path in render_all(args.dsn, args.prometheus, args.out, minutes=args.minutes):
        print(path)


if __name__ == "__main__":
    main()
