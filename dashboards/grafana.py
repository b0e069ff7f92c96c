"""What Grafana does to a panel's query before it runs it, without Grafana.

Used by tests/test_dashboards.py and tests/test_prometheus.py (each panel's query, run for real)
and by dashboards/render_png.py (the PNGs in docs/).

The PostgreSQL data source's macros, as Grafana defines them: the "Macros" table of
https://grafana.com/docs/grafana/latest/datasources/postgres/query-editor/ and their
implementation, pkg/tsdb/grafana-postgresql-datasource/macros.go (postgresMacroEngine.evaluateMacro;
a macro is `$name(args)`, args split on commas, no nested parentheses):

    $__time(col)                  col AS "time"
    $__timeEpoch(col)             extract(epoch from col) as "time"
    $__timeFilter(col)            col BETWEEN '<from, RFC 3339 UTC>' AND '<to>'
    $__timeFrom()  $__timeTo()    '<from>'  '<to>'
    $__timeGroup(col, '5m'[, fill])       floor(extract(epoch from col)/300)*300
    $__timeGroupAlias(col, '5m'[, fill])  the same AS "time"
    $__unixEpochFilter(col)       col >= <from, Unix s> AND col <= <to, Unix s>
    $__unixEpochNanoFilter(col)   the same in nanoseconds; $__unixEpochNanoFrom() / To()
    $__unixEpochGroup(col, '5m')  floor((col)/300)*300; $__unixEpochGroupAlias adds AS "time"

(fill only tells Grafana how to fill gaps afterwards: it does not change the SQL.)  Template
variables are interpolated first, as Grafana's frontend does: a multi-value variable in a SQL
query becomes its values single-quoted and comma-separated ('a','b'; quotes doubled), in a
Prometheus query a regex alternation (a|b), or the variable's allValue when "All" is selected
(https://grafana.com/docs/grafana/latest/dashboards/variables/variable-syntax/).  $__interval and
$__rate_interval are given by the caller (Grafana derives them from the panel width and the
scrape interval).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

# The dashboards live in the Helm chart, which can only read files inside itself (its ConfigMap
# for Grafana's dashboard sidecar ships them); this directory has the scripts and provisioning.
DASHBOARDS = Path(__file__).resolve().parent.parent / "helm" / "files" / "dashboards"
_MACRO = re.compile(r"\$([_a-zA-Z0-9]+)\(([^\)]*)\)")   # macros.go's sExpr
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def interval_seconds(text: str) -> float:
    """Grafana's interval syntax ('1m', '30s', '500ms'), in seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)", text.strip().strip("'"))
    if not m:
        raise ValueError(f"not a Grafana interval: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _rfc3339(t: datetime) -> str:
    """Go's time.RFC3339Nano of a UTC time: no trailing zeros in the fraction, 'Z'."""
    t = t.astimezone(timezone.utc)
    frac = f"{t.microsecond:06d}".rstrip("0")
    return t.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


def _seconds(text: str) -> str:
    s = interval_seconds(text)
    return f"{s:g}"


def expand_sql_macros(sql: str, start: datetime, end: datetime) -> str:
    """The PostgreSQL data source's macros (see the module docstring)."""

    def one(m: re.Match) -> str:
        name, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
        if name == "__timeGroup" and sql[m.end():m.end() + 1] == ",":   # pre-5.3 use: adds the alias
            name = "__timeGroupAlias"
        if name == "__time":
            return f'{args[0]} AS "time"'
        if name == "__timeEpoch":
            return f'extract(epoch from {args[0]}) as "time"'
        if name == "__timeFilter":
            return f"{args[0]} BETWEEN '{_rfc3339(start)}' AND '{_rfc3339(end)}'"
        if name == "__timeFrom":
            return f"'{_rfc3339(start)}'"
        if name == "__timeTo":
            return f"'{_rfc3339(end)}'"
        if name in ("__timeGroup", "__timeGroupAlias"):
            s = _seconds(args[1])
            group = f"floor(extract(epoch from {args[0]})/{s})*{s}"
            return group + (' AS "time"' if name == "__timeGroupAlias" else "")
        if name == "__unixEpochFilter":
            return f"{args[0]} >= {int(start.timestamp())} AND {args[0]} <= {int(end.timestamp())}"
        if name == "__unixEpochNanoFilter":
            return f"{args[0]} >= {_ns(start)} AND {args[0]} <= {_ns(end)}"
        if name == "__unixEpochNanoFrom":
            return str(_ns(start))
        if name == "__unixEpochNanoTo":
            return str(_ns(end))
        if name in ("__unixEpochGroup", "__unixEpochGroupAlias"):
            s = _seconds(args[1])
            group = f"floor(({args[0]})/{s})*{s}"
            return group + (' AS "time"' if name == "__unixEpochGroupAlias" else "")
        raise ValueError(f"unknown macro ${name}")

    return _MACRO.sub(one, sql)


def _ns(t: datetime) -> int:
    return int(t.timestamp()) * 10**9 + t.microsecond * 1000


def interpolate(query: str, values: dict[str, list[str] | str], dialect: str,
                all_values: dict[str, str] | None = None) -> str:
    """Template variables ($name, ${name}, [[name]]) -> their values formatted for `dialect`
    ("sql" or "promql").  values[name] == "$__all" selects the variable's allValue when it has
    one (all_values), else all of its values."""
    def fmt(name: str) -> str:
        value = values[name]
        if value == "$__all" and all_values and all_values.get(name):
            return all_values[name]
        items = [value] if isinstance(value, str) else list(value)
        if dialect == "sql":
            return ",".join("'" + v.replace("'", "''") + "'" for v in items)
        return items[0] if len(items) == 1 else "(" + "|".join(re.escape(v) for v in items) + ")"

    names = sorted(values, key=len, reverse=True)
    for name in names:
        query = query.replace("${" + name + "}", fmt(name)).replace("[[" + name + "]]", fmt(name))
        query = re.sub(r"\$" + re.escape(name) + r"\b", lambda _m: fmt(name), query)
    return query


@dataclass
class PanelQuery:
    dashboard: str
    panel: str
    panel_type: str
    ref: str
    query: str          # rawSql or expr, as written in the JSON
    format: str         # "time_series" | "table" (SQL); "time_series" (PromQL)


def load(name: str) -> dict:
    return json.loads((DASHBOARDS / name).read_text())


def panel_queries(dashboard: dict) -> Iterable[PanelQuery]:
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            continue
        for target in panel.get("targets", []):
            query = target.get("rawSql") or target.get("expr")
            yield PanelQuery(dashboard["title"], panel["title"], panel["type"], target.get("refId", "A"),
                             query, target.get("format", "time_series"))


def variables(dashboard: dict) -> list[dict]:
    return dashboard.get("templating", {}).get("list", [])
