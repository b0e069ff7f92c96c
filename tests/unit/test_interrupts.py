"""The FDW's long Python loops stay cancellable (llm_tables/interrupts.py), and two ANY lists on one
column intersect in linear time: no Postgres (a fake host says when a cancel is pending)."""
from __future__ import annotations

import pytest

from llm_tables import interrupts, keycolumns
from llm_tables.errors import QueryCanceled
from llm_tables.keycolumns import KeyColumn, KeyColumns
from llm_tables.tables import embed_parts
from multicorn import Qual


class FakeHost:
    """Says a cancel is pending from the `after`-th question on, and counts the questions."""

    def __init__(self, after: int) -> None:
        self.after, self.asked = after, 0

    def interrupt_pending(self) -> bool:
        self.asked += 1
        return self.asked > self.after


@pytest.fixture
def host(monkeypatch):
    fake = FakeHost(after=3)
    monkeypatch.setattr(interrupts, "_host", fake)
    return fake


def keys() -> KeyColumns:
    return KeyColumns("llm.embeddings", [KeyColumn("input", required=True, many=True)], "example")


def test_resolving_a_long_list_stops_at_a_cancel(host):
    values = [f"text {i}" for i in range(100_000)]
    with pytest.raises(QueryCanceled):
        keys().resolve([Qual("input", ("=", True), values)])
    assert host.asked == 4   # the fourth check, 3 x 4,096 values in: not at the end of the list


def test_splitting_a_long_list_into_parts_stops_at_a_cancel(host):
    with pytest.raises(QueryCanceled):
        embed_parts([f"text {i}" for i in range(100_000)])
    assert host.asked == 4


def test_the_distinct_values_of_a_long_list_stop_at_a_cancel(host):
    """Hashing 200,000 texts takes tens of milliseconds: it goes in slices, asking in between."""
    with pytest.raises(QueryCanceled):
        keycolumns._distinct([f"text {i}" for i in range(100_000)])
    assert host.asked == 4


def test_without_a_cancel_nothing_changes(monkeypatch):
    monkeypatch.setattr(interrupts, "_host", FakeHost(after=10**9))
    values = [f"t{i % 50_000}" for i in range(100_000)]
    resolved = keys().resolve([Qual("input", ("=", True), values)])
    assert resolved.values["input"] == [f"t{i}" for i in range(50_000)]


def test_two_long_lists_on_one_column_intersect_in_order_and_fast():
    a = [f"t{i}" for i in range(200_000)]
    b = list(reversed(a[100_000:])) + ["other"]
    resolved = keys().resolve([Qual("input", ("=", True), a), Qual("input", ("=", True), b)])
    assert resolved.values["input"] == a[100_000:]   # in the first list's order
    # unhashable values (a stop list's arrays) still intersect
    assert keycolumns._intersection([["a"], ["b"]], [["b"]]) == [["b"]]
