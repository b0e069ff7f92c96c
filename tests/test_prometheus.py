"""The Prometheus dashboard (helm/files/dashboards/llmfdw-prometheus.json) against a real Prometheus.

Prometheus is Debian's package (`make prometheus` installs it; `make test` depends on that).  The
test starts one with a config of its own in a temporary directory: it scrapes the session
sidecar's metrics port on 127.0.0.1 every second, and a real postgres_exporter
(tests/postgres_exporter.py) that serves the vectorizer metrics of a database with a vectorizer
whose rows wait, and serves its HTTP API on a free port.  After real traffic through SQL
(completions, some of which wait for a slot, embeddings, a failing request), every PromQL
expression of the dashboard, with its variables and $__rate_interval expanded as Grafana would
(dashboards/grafana.py), must return data through /api/v1/query.

With LLMFDW_RENDER_DOCS=<dir> set (`make docs`), the last test also draws both dashboards from
these real results into <dir>/*.png (dashboards/render_png.py).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dashboards import grafana  # noqa: E402
from deploy import embedded  # noqa: E402
from http_process import serving  # noqa: E402 (tests/http_process.py)
from postgres_exporter import running  # noqa: E402 (tests/postgres_exporter.py)

DASHBOARD = grafana.load("llmfdw-prometheus.json")
EXPRESSIONS = [(f"{q.panel} [{q.ref}]", q.query) for q in grafana.panel_queries(DASHBOARD)]
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
VECTORIZER_DB = "promvec"     # a database with a vectorizer, served by the exporter
RATE_INTERVAL = "1m"     # Grafana: max(4 x scrape interval, $__interval + scrape interval); 1 m covers the test


def api(url: str, path: str, **params: str) -> dict:
    query = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{url}{path}?{query}", timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def sql_traffic(dsn: str, tag: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        prompts = [f"{tag}: count to {i}." for i in range(10)]   # more than one session may run at once
        c.execute("SELECT completion FROM llm.completions WHERE prompt = ANY(%s) AND max_tokens = 6",
                  (prompts,)).fetchall()
        c.execute("SELECT embedding FROM llm.embeddings WHERE input = ANY(%s)",
                  ([f"{tag} {i}" for i in range(16)],)).fetchall()
        with pytest.raises(psycopg.Error):
            c.execute("SELECT completion FROM llm.completions WHERE prompt = 'x' AND model = 'no-such-model'")
        c.execute("SELECT * FROM llm.models").fetchall()


@pytest.fixture(scope="module")
def vectorizer_exporter(pg_server, sidecar_socket, work_dir):
    """A plain role's vectorizer whose rows wait (nothing drains this database), and a
    postgres_exporter over it logged in as a monitoring role (llm_dashboard only); yields its port."""
    embedded.create_database(pg_server, VECTORIZER_DB)
    embedded.apply_schema(pg_server, VECTORIZER_DB, f"unix://{sidecar_socket}")
    with psycopg.connect(pg_server.dsn(VECTORIZER_DB), autocommit=True) as c:
        c.execute("CREATE ROLE prom_owner LOGIN IN ROLE llm_user")
        c.execute("CREATE ROLE prom_monitor LOGIN PASSWORD 'prom-monitor' IN ROLE llm_dashboard")
        c.execute("CREATE SCHEMA prom_owner AUTHORIZATION prom_owner")
    with psycopg.connect(make_conninfo(pg_server.dsn(VECTORIZER_DB), user="prom_owner"), autocommit=True) as c:
        c.execute("CREATE TABLE prom_owner.notes (id int PRIMARY KEY, body text)")
        c.execute("INSERT INTO prom_owner.notes SELECT i, 'note ' || i FROM generate_series(1, 5) i")
        c.execute("SELECT llm.create_vectorizer('prom_owner.notes', 'body', chunking => 'none', hnsw => false)")
    port = embedded.free_port()
    dsn = f"postgresql://prom_monitor:prom-monitor@127.0.0.1:{pg_server.port}/{VECTORIZER_DB}?sslmode=disable"
    try:
        with running(dsn, [VECTORIZER_DB], port, work_dir / "log" / "prometheus-exporter.log"):
            yield port
    finally:
        with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as c:
            c.execute(f"DROP DATABASE {VECTORIZER_DB} WITH (FORCE)")
            c.execute("DROP ROLE prom_owner")
            c.execute("DROP ROLE prom_monitor")


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, sidecar_metrics_port, sidecar_socket, vectorizer_exporter):
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.fail("prometheus is not installed: run `make prometheus` (apt-get install prometheus)")
    work = tmp_path_factory.mktemp("prometheus")
    (work / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: llmfdw-sidecar\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{sidecar_metrics_port}']}}]\n"
        "  - job_name: llmfdw-vectorizers\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{vectorizer_exporter}']}}]\n")
    port = embedded.free_port()
    url = f"http://127.0.0.1:{port}"
    with serving([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
                  f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                 f"{url}/-/ready", work / "prometheus.log"):
        yield url


def wait_scraped(url: str, timeout: float = 30) -> None:
    """Until Prometheus has scraped the sidecar and the exporter, then once more."""
    deadline = time.monotonic() + timeout
    while True:
        up = api(url, "/api/v1/query", query="up")["result"]
        if len(up) == 2 and all(u["value"][1] == "1" for u in up):
            break
        assert time.monotonic() < deadline, f"the sidecar and the exporter were not scraped: {up}"
        time.sleep(0.5)
    time.sleep(2)


@pytest.fixture(scope="module")
def scraped(prometheus, pg_dsn):
    """Traffic before the first scrape (the series exist) and after it (they increase)."""
    sql_traffic(pg_dsn, "before")
    wait_scraped(prometheus)
    sql_traffic(pg_dsn, "after")
    time.sleep(3)     # a few scrapes of the increase
    return prometheus


def expand(expr: str, model: str = "$__all") -> str:
    all_values = {v["name"]: v.get("allValue") for v in grafana.variables(DASHBOARD)}
    expr = grafana.interpolate(expr, {"model": model}, "promql", all_values)
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__interval", "15s")


def test_the_sidecar_and_the_exporter_are_scraped(scraped):
    targets = api(scraped, "/api/v1/targets")["activeTargets"]
    assert sorted((t["labels"]["job"], t["health"]) for t in targets) == [
        ("llmfdw-sidecar", "up"), ("llmfdw-vectorizers", "up")], targets


def test_the_vectorizer_panels_show_the_waiting_rows(scraped):
    lag = api(scraped, "/api/v1/query", query=f'llmfdw_vectorizer_lag_seconds{{datname="{VECTORIZER_DB}"}}')["result"]
    assert [r["metric"]["vectorizer"] for r in lag] == ["notes"] and float(lag[0]["value"][1]) > 0
    pending = api(scraped, "/api/v1/query", query="llmfdw_vectorizer_pending")["result"]
    assert [float(r["value"][1]) for r in pending] == [5]


def test_the_model_variable_lists_the_models(scraped):
    definition = grafana.variables(DASHBOARD)[0]["definition"]
    assert definition == "label_values(llmfdw_requests_total, model)"
    values = api(scraped, "/api/v1/label/model/values", **{"match[]": "llmfdw_requests_total"})
    assert {"smollm2-135m-instruct", "all-minilm-l6-v2"} <= set(values)


@pytest.mark.parametrize("name, expr", EXPRESSIONS, ids=[e[0] for e in EXPRESSIONS])
def test_panel_expression_returns_data(scraped, name, expr):
    query = expand(expr)
    assert "$" not in query, query
    data = api(scraped, "/api/v1/query", query=query)
    assert data["resultType"] == "vector" and data["result"], f"{name}: no data for {query}"
    values = [float(r["value"][1]) for r in data["result"]]
    assert any(math.isfinite(v) for v in values), (name, query, data["result"])


def test_a_selected_model_narrows_the_series(scraped):
    expr = next(e for n, e in EXPRESSIONS if n.startswith("Requests per second"))
    rows = api(scraped, "/api/v1/query", query=expand(expr, ["all-minilm-l6-v2"]))["result"]
    assert rows and {r["metric"]["rpc"] for r in rows} == {"Embed"}


def test_render_docs_pngs(scraped, pg_dsn):
    """`make docs`: draw both dashboards from these real results (skipped otherwise)."""
    out = os.environ.get("LLMFDW_RENDER_DOCS")
    if not out:
        pytest.skip("set LLMFDW_RENDER_DOCS=<dir> to draw the dashboards (make docs)")
    from dashboards import render_png

    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("CREATE ROLE grafana_docs LOGIN IN ROLE llm_dashboard")
    try:
        extra = int(os.environ.get("LLMFDW_RENDER_TRAFFIC_MINUTES", "0"))
        render_png.traffic(pg_dsn, minutes=extra)
        paths = render_png.render_all(make_conninfo(pg_dsn, user="grafana_docs"), scraped, Path(out),
                                      rate_interval=RATE_INTERVAL)
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as c:
            c.execute("DROP ROLE grafana_docs")
    assert all(p.stat().st_size > 10_000 for p in paths)
