"""The batched join's grouping and matching (fdw/multicorn/_batchjoin.py), which the C node
(fdw/src/batchjoin_exec.c) calls once per batch and once per returned row.  The node itself, in
real Postgres: tests/test_batch_join.py and tests/test_encoding_join.py."""
from __future__ import annotations

import pytest

from multicorn import Qual
from multicorn._batchjoin import BatchMatcher


def shown(requests: list[list[Qual]]) -> list[list[tuple]]:
    return [[(q.field_name, q.operator, q.value) for q in quals] for quals in requests]


def test_one_request_per_group_of_the_other_keys_with_the_distinct_first_values():
    matcher = BatchMatcher(("input", "model"), (0, 2))
    restriction = Qual("dims", "=", 8)
    requests = matcher.new_batch([restriction], [("a", "m1"), ("b", "m1"), ("a", "m1"), ("c", "m2")])
    assert shown(requests) == [
        [("dims", "=", 8), ("input", ("=", True), ["a", "b"]), ("model", "=", "m1")],
        [("dims", "=", 8), ("input", ("=", True), ["c"]), ("model", "=", "m2")],
    ]


def test_rows_with_a_null_key_are_left_out_and_match_nothing():
    matcher = BatchMatcher(("input",), (0,))
    assert shown(matcher.new_batch([], [None, ("a",), None])) == [[("input", ("=", True), ["a"])]]
    assert matcher.rows_for({"input": "a"}) == [1]
    assert matcher.rows_for({"input": None}) == []


def test_a_returned_row_finds_every_outer_row_of_its_key_as_dict_or_sequence():
    matcher = BatchMatcher(("input", "model"), (0, 2))
    matcher.new_batch([], [("a", "m1"), ("b", "m1"), ("a", "m1")])
    assert matcher.rows_for({"input": "a", "model": "m1", "embedding": [0.5]}) == [0, 2]
    assert matcher.rows_for(("b", [0.5], "m1")) == [1]
    assert matcher.rows_for({"input": "a", "model": "m2"}) == []


def test_array_keys_match_by_value():
    matcher = BatchMatcher(("stop",), (0,))
    requests = matcher.new_batch([], [(["x", ["y"]],)])
    assert requests[0][0].value == [["x", ["y"]]]  # sent as the query gave it
    assert matcher.rows_for({"stop": ["x", ["y"]]}) == [0]


def test_a_new_batch_forgets_the_last():
    matcher = BatchMatcher(("input",), (0,))
    matcher.new_batch([], [("a",)])
    matcher.new_batch([], [("b",)])
    assert matcher.rows_for({"input": "a"}) == []


def test_a_row_without_its_key_is_a_clear_error():
    matcher = BatchMatcher(("input", "model"), (0, 2))
    matcher.new_batch([], [("a", "m1")])
    with pytest.raises(ValueError, match='lacks key column "model".*join_batch_size = 0'):
        matcher.rows_for({"input": "a"})
    with pytest.raises(ValueError, match='lacks key column "model"'):
        matcher.rows_for(("a",))
