"""The PostgreSQL dashboard (helm/files/dashboards/llmfdw-postgres.json), run as Grafana would run it.

Grafana is on no package registry this project can use, so the test does what its PostgreSQL data
source does with each panel: interpolate the template variables (values from the variables' own
queries, "All" selected), expand the macros as Grafana defines them (dashboards/grafana.py cites
the definitions), and run the SQL against the real database after real traffic, as a LOGIN role
that has only llm_dashboard (what the provisioned data source logs in as).  Each query must
succeed, return rows, and have the shape its panel needs: a time series has a "time" column first
(epoch seconds or a timestamp), then numbers (and a "metric" text column at most).
"""
from __future__ import annotations

import datetime as dt
import sys
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg.conninfo import make_conninfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dashboards import grafana  # noqa: E402

DASHBOARD = grafana.load("llmfdw-postgres.json")
QUERIES = list(grafana.panel_queries(DASHBOARD))
NUMBERS = (int, float, Decimal)


@pytest.fixture(scope="module")
def traffic(pg_dsn):
    """A few completions (more prompts than one session may run at once: some wait), embeddings,
    a failing request, and the listings."""
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        prompts = [f"Count to {i}." for i in range(10)]
        c.execute("SELECT completion FROM llm.completions WHERE prompt = ANY(%s) AND max_tokens = 6",
                  (prompts,)).fetchall()
        c.execute("SELECT completion FROM llm.completions WHERE prompt = 'Say hi.' AND max_tokens = 8").fetchall()
        c.execute("SELECT embedding FROM llm.embeddings WHERE input = ANY(%s)",
                  ([f"text {i}" for i in range(20)],)).fetchall()
        with pytest.raises(psycopg.Error):
            c.execute("SELECT completion FROM llm.completions WHERE prompt = 'x' AND model = 'no-such-model'")
        c.execute("SELECT * FROM llm.models").fetchall()
        c.execute("SELECT * FROM llm.usage").fetchall()


@pytest.fixture(scope="module")
def dashboard_dsn(pg_dsn, traffic):
    """A LOGIN role with llm_dashboard and nothing else, as the provisioned data source uses."""
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("CREATE ROLE grafana_test LOGIN IN ROLE llm_dashboard")
    yield make_conninfo(pg_dsn, user="grafana_test")
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("DROP ROLE grafana_test")


def time_range() -> tuple[dt.datetime, dt.datetime]:
    end = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)
    return end - dt.timedelta(hours=1), end     # the dashboard's default range, now-1h to now


def variable_values(conn) -> dict[str, list[str]]:
    values = {}
    start, end = time_range()
    for var in grafana.variables(DASHBOARD):
        sql = grafana.expand_sql_macros(var["query"], start, end)
        values[var["name"]] = [r[0] for r in conn.execute(sql).fetchall()]
    return values


def run_panel(dsn: str, q: grafana.PanelQuery) -> tuple[list[str], list[tuple], str]:
    with psycopg.connect(dsn, autocommit=True) as c:
        values = variable_values(c)
        start, end = time_range()
        sql = grafana.expand_sql_macros(grafana.interpolate(q.query, values, "sql"), start, end)
        cur = c.execute(sql)
        return [d.name for d in cur.description], cur.fetchall(), sql


def test_the_variables_list_values(dashboard_dsn):
    with psycopg.connect(dashboard_dsn, autocommit=True) as c:
        values = variable_values(c)
    assert set(values["model"]) == {"smollm2-135m-instruct", "all-minilm-l6-v2"}
    assert values["tenant"] == ["llmfdw_test"]


@pytest.mark.parametrize("q", QUERIES, ids=[q.panel for q in QUERIES])
def test_panel_query_runs_and_has_its_shape(dashboard_dsn, q):
    assert "$__" not in grafana.expand_sql_macros(q.query, *time_range())
    columns, rows, sql = run_panel(dashboard_dsn, q)
    assert rows, f"panel {q.panel!r} returned no rows:\n{sql}"
    if q.format == "time_series":
        assert q.panel_type == "timeseries"
        assert columns[0] == "time", columns
        for row in rows:
            assert isinstance(row[0], (*NUMBERS, dt.datetime)), row
            for name, value in zip(columns[1:], row[1:]):
                kinds = str if name == "metric" else NUMBERS
                assert value is None or isinstance(value, kinds), (name, value)
        assert any(isinstance(v, NUMBERS) for row in rows for v in row[1:]), rows
        assert [r[0] for r in rows] == sorted(r[0] for r in rows)   # ORDER BY time, as Grafana wants
    else:
        assert q.format == "table" and q.panel_type == "table"
        if "time" in columns:
            assert all(isinstance(r[columns.index("time")], dt.datetime) for r in rows)


def test_panels_over_llm_requests_send_their_time_range(dashboard_dsn):
    """$__timeFilter(at) becomes at BETWEEN ... AND ...: both bounds travel in the request."""
    checked = 0
    for q in QUERIES:
        if "llm.requests" not in q.query:
            continue
        assert "$__timeFilter(at)" in q.query, q.panel
        with psycopg.connect(dashboard_dsn, autocommit=True) as c:
            start, end = time_range()
            sql = grafana.expand_sql_macros(grafana.interpolate(q.query, variable_values(c), "sql"), start, end)
            plan = "\n".join(r[0] for r in c.execute("EXPLAIN " + sql).fetchall())
        assert "time range sent: at >= " in plan and ", at <= " in plan, plan
        checked += 1
    assert checked >= 6


def test_macros_expand_as_grafana_defines_them():
    start = dt.datetime(2017, 4, 21, 5, 1, 17, tzinfo=dt.timezone.utc)
    end = dt.datetime(2017, 4, 21, 5, 6, 17, 500000, tzinfo=dt.timezone.utc)
    x = grafana.expand_sql_macros
    assert x("$__timeFilter(at)", start, end) == "at BETWEEN '2017-04-21T05:01:17Z' AND '2017-04-21T05:06:17.5Z'"
    assert x("$__timeGroupAlias(at, '5m')", start, end) == 'floor(extract(epoch from at)/300)*300 AS "time"'
    assert x("$__timeGroup(at, '1m', 0)", start, end) == "floor(extract(epoch from at)/60)*60"
    assert x("SELECT $__timeGroup(at,'1h'), 1", start, end) == 'SELECT floor(extract(epoch from at)/3600)*3600 AS "time", 1'
    assert x("$__timeFrom() $__timeTo()", start, end) == "'2017-04-21T05:01:17Z' '2017-04-21T05:06:17.5Z'"
    assert x("$__unixEpochFilter(t)", start, end) == "t >= 1492750877 AND t <= 1492751177"
    assert x("$__time(at)", start, end) == 'at AS "time"'
    assert x("$__timeEpoch(at)", start, end) == 'extract(epoch from at) as "time"'
    assert x("$__unixEpochGroupAlias(t, '5m')", start, end) == 'floor((t)/300)*300 AS "time"'
    assert grafana.interpolate("model IN ($model)", {"model": ["a", "o'b"]}, "sql") == "model IN ('a','o''b')"
    assert grafana.interpolate('{model=~"$model"}', {"model": "$__all"}, "promql", {"model": ".*"}) == '{model=~".*"}'


def test_datasources_are_provisioned_with_the_uids_the_dashboards_use():
    root = Path(grafana.__file__).resolve().parent
    provisioned = yaml.safe_load((root / "provisioning" / "datasources" / "llmfdw.yaml").read_text())
    uids = {d["uid"]: d["type"] for d in provisioned["datasources"]}
    for name in ("llmfdw-postgres.json", "llmfdw-prometheus.json"):
        board = grafana.load(name)
        for panel in board["panels"]:
            ds = panel["datasource"]
            assert uids.get(ds["uid"]) == ds["type"], (name, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"] == ds
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))
    providers = yaml.safe_load((root / "provisioning" / "dashboards" / "llmfdw.yaml").read_text())
    assert providers["providers"][0]["type"] == "file"
