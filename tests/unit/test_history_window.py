"""The request history's window (sidecar/llm_sidecar/history.py) and its config, and the FDW's
reading of time bounds for llm.requests: no Postgres, no model.  The same window through SQL is
tests/test_requests_table.py."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from llm_sidecar.config import ConfigError, load_config
from llm_sidecar.history import METADATA_ROWS, Bounds, History, Record
from llm_tables.keycolumns import Range, range_hint
from multicorn import Qual

GEN = "smollm2-135m-instruct"


def test_range_hint_reads_bounds():
    t = [datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(minutes=i) for i in range(4)]
    quals = [Qual("at", ">", t[0]), Qual("at", ">=", t[1]), Qual("at", "<", t[3]), Qual("at", "<=", t[3]),
             Qual("at", "<>", t[2]), Qual("at", ("=", True), [t[2]]), Qual("model", ">", "a")]
    assert range_hint(quals, "at") == Range(t[1], True, t[3], False)
    assert range_hint([Qual("at", "=", t[2])], "at") == Range(t[2], True, t[2], True)
    assert range_hint([Qual("at", ">", None), Qual("at", ">", "unreadable")], "at",
                      lambda v: v if isinstance(v, datetime) else None) == Range()
    assert not range_hint([], "at").bounded


def test_timestamptz_text_is_read_to_the_microsecond():
    from llm_tables.tables import _timestamptz, _unix_ns

    assert _unix_ns("2026-05-01 12:00:00.123456+00") == 1777636800123456000
    assert _unix_ns("2026-05-01 14:00:00.123456+02") == 1777636800123456000
    assert _unix_ns("infinity") is None and _unix_ns("Fri May 01 12:00:00 2026 UTC") is None
    assert _unix_ns(datetime(2026, 5, 1)) is None   # no zone: which instant is unknown
    assert _unix_ns(_timestamptz(1777636800123456000)) == 1777636800123456000


# ---- the window's bounds ----------------------------------------------------------------------

def record(at: int, tenant: str = "t", kind: str = "generate") -> Record:
    return Record(at, tenant, GEN, kind, "OK", 0, None, 1, 1, 1, 0, 1, f"r{at}")


def test_the_window_is_bounded_by_count_and_age():
    now = [0]
    window = History(max_rows=3, max_age_seconds=10, clock=lambda: now[0])
    for i in range(5):
        now[0] = i * 10**9
        window.record(record(i))
    assert [r.at_unix_ns for r in window.rows("t")] == [2, 3, 4]   # count
    now[0] = 12 * 10**9 + 1
    assert [r.at_unix_ns for r in window.rows("t")] == [3, 4]        # age: the first was recorded at 2 s, over 10 s ago
    assert window.rows("other") == []
    assert [r.at_unix_ns for r in window.rows("t", Bounds(after=3))] == [4]
    assert [r.at_unix_ns for r in window.rows("t", Bounds(before=3, before_inclusive=True))] == [3]


def test_no_tenant_pushes_out_anothers_rows():
    window = History(max_rows=3, clock=lambda: 0)
    for i in range(3):
        window.record(record(i, "victim"))
    for i in range(1000):
        window.record(record(100 + i, "flood"))
        window.record(record(100 + i, "flood", "list_models"))
    assert [r.at_unix_ns for r in window.rows("victim")] == [0, 1, 2]
    flood = window.rows("flood")
    assert [r.at_unix_ns for r in flood if r.kind == "generate"] == [1097, 1098, 1099]
    assert sum(r.kind == "list_models" for r in flood) == METADATA_ROWS


def test_metadata_reads_cannot_crowd_out_model_requests():
    window = History(max_rows=3, clock=lambda: 0)
    window.record(record(0, kind="generate"))
    window.record(record(1, kind="embed"))
    for i in range(500):
        window.record(record(10 + i, kind=("list_models", "usage")[i % 2]))
    rows = window.rows("t")
    assert [r.kind for r in rows[:2]] == ["generate", "embed"]
    assert len(rows) == 2 + METADATA_ROWS and rows[-1].at_unix_ns == 509   # the last reads, by arrival


def test_the_least_recently_written_tenant_loses_its_window_first():
    window = History(max_rows=2, max_tenants=3, clock=lambda: 0)
    for tenant in "abc":
        window.record(record(0, tenant))
    window.record(record(1, "a"))       # a is now the most recently written
    window.record(record(2, "d"))       # takes b's window
    assert window.tenants() == ["c", "a", "d"] and window.rows("b") == []
    window.rows("c")                    # a read is not a write
    window.record(record(3, "e"))
    assert window.tenants() == ["a", "d", "e"]
    for i in range(10_000):             # made-up names: memory stays bounded
        window.record(record(i, f"name{i}"))
        window.record(record(i, f"name{i}", "usage"))
    assert len(window.tenants()) == 3 and len(window) <= 3 * (2 + METADATA_ROWS)


def test_made_up_names_never_take_a_configured_tenants_window():
    window = History(max_rows=2, max_tenants=2, configured={"acme", "globex", "initech"}, clock=lambda: 0)
    window.record(record(0, "acme"))
    for i in range(1000):
        window.record(record(i, f"db{i}"))
    assert [r.at_unix_ns for r in window.rows("acme")] == [0] and window.tenants() == ["acme", "db999"]
    window.record(record(1, "globex"))      # a configured tenant takes an unconfigured one's window
    assert window.tenants() == ["acme", "globex"]
    window.record(record(2, "db1000"))      # every window is a configured tenant's: not recorded
    assert window.tenants() == ["acme", "globex"] and window.rows("db1000") == []
    window.record(record(3, "initech"))     # configured: the least recently written configured one goes
    assert window.tenants() == ["globex", "initech"]


def test_a_window_whose_records_all_expired_goes():
    now = [0]
    window = History(max_rows=5, max_age_seconds=10, clock=lambda: now[0])
    window.record(record(0, "old"))
    window.record(record(0, "old", "list_models"))
    now[0] = 11 * 10**9
    window.record(record(1, "new"))
    assert window.tenants() == ["new"] and len(window) == 1


@pytest.mark.parametrize("history, words", [
    ("{max_rows: 0}", "history.max_rows: must be >= 1, not 0"),
    ("{max_rows: '10'}", "history.max_rows"),
    ("{max_rows: 2000000}", "history.max_rows: must be <= 1,000,000, not 2000000"),
    ("{max_age_seconds: 0}", "history.max_age_seconds: must be > 0, not 0"),
    ("{max_age_seconds: .nan}", "history.max_age_seconds"),
    ("{max_age: 60}", "history: unknown keys ['max_age']"),
    ("{max_tenants: 0}", "history.max_tenants: must be >= 1, not 0"),
    ("{max_rows: 100000, max_tenants: 101}",
     "history.max_tenants: max_rows x max_tenants must be <= 10,000,000 records"),
])
def test_bad_history_config_is_refused(tmp_path, history, words):
    path = tmp_path / "c.yaml"
    path.write_text(f"history: {history}\nmodels:\n  - {{name: m, task: generate, engine: llama_cpp, "
                    f"source: {{path: x}}}}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert words in str(exc.value)


def test_history_config_is_read(tmp_path):
    path = tmp_path / "c.yaml"
    models = "models:\n  - {name: m, task: generate, engine: llama_cpp, source: {path: x}}\n"
    path.write_text("history: {max_rows: 50, max_age_seconds: 90.5}\n" + models)   # the keys of old
    config = load_config(path)
    assert (config.history.max_rows, config.history.max_age_seconds, config.history.max_tenants) == (50, 90.5, 32)
    path.write_text("history: {max_tenants: 7}\n" + models)
    config = load_config(path)
    assert (config.history.max_rows, config.history.max_tenants) == (10_000, 7)
