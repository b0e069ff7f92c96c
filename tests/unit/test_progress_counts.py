"""Progress: the sidecar's book of running statements (sidecar/llm_sidecar/progress.py) and the FDW's
statement tracking (fdw/llm_tables/statements.py).  No Postgres, no model; through SQL with a second
session is tests/test_progress.py."""
from __future__ import annotations

import time

from llm_sidecar.metering import Metered
from llm_sidecar.progress import ProgressBook
from llm_tables import statements
from llm_inference.v1 import inference_pb2 as pb


def test_counts_grow_and_stay_per_tenant():
    book = ProgressBook()
    a = [Metered() for _ in range(3)]
    keys = [book.started("acme", 42, "s1", 3, i, 1, a[i], embeds=False, model="m") for i in range(3)]
    book.started("globex", 42, "s1", 5, 99, 1, Metered(), embeds=False, model="m")
    a[0].output_tokens = 5   # live tokens of a running request are seen
    (row,) = book.rows("acme")
    assert (row.done, row.output_tokens, len(row.stmt.running), row.stmt.total) == (0, 5, 3, 3)
    assert row.remaining_ns is None
    book.finished(keys[0], 0, "OK")
    book.finished(keys[1], 1, "CANCELLED")   # sent again by the FDW: not done
    (row,) = book.rows("acme")
    assert (row.done, row.stmt.requests, row.stmt.errors, row.output_tokens) == (1, 2, 1, 5)
    assert row.remaining_ns is not None and row.remaining_ns >= 0
    assert [r.stmt.tenant for r in book.rows("globex")] == ["globex"]
    assert book.started("acme", 0, "", 1, 5, 1, Metered(), embeds=False, model="m") is None, "untracked"


def test_embed_texts_count_as_they_come_back_and_never_go_back():
    book = ProgressBook()
    usage = Metered()
    key = book.started("t", 1, "s", 100, 1, 100, usage, embeds=True, model="e")
    usage.embedded_inputs, usage.cache_hits = 40, 10   # cache hits are among the texts returned
    assert next(book.rows("t")).done == 40
    book.finished(key, 1, "CANCELLED")   # cancelled after 40 texts, sent again
    usage2 = Metered()
    book.started("t", 1, "s", 100, 2, 100, usage2, embeds=True, model="e")
    assert next(book.rows("t")).done == 40, "the high-water mark holds"
    usage2.embedded_inputs = 100
    assert next(book.rows("t")).done == 100, "capped at the total"


def test_quiet_statements_expire_and_entries_are_bounded():
    book = ProgressBook(quiet_seconds=0.05, max_entries=3)
    key = book.started("t", 1, "old", 1, 1, 1, Metered(), embeds=False, model="m")
    book.finished(key, 1, "OK")
    time.sleep(0.1)
    book.started("t", 2, "new", 1, 2, 1, Metered(), embeds=False, model="m")
    assert [r.stmt.statement for r in book.rows("t")] == ["new"]
    for pid in range(3, 10):
        book.started("t", pid, "s", 1, pid, 1, Metered(), embeds=False, model="m")
    assert len(book) == 3


class _Table:
    _scan = None

    @statements.tracked
    def execute(self, quals, columns, **kwargs):
        self._scan.plan(len(quals))
        for q in quals:
            ctx = pb.RequestContext()
            statements.stamp(ctx, self._scan)
            yield {"ctx": ctx, "output_tokens": 2, "compute_ms": 1.5}


def test_a_statement_spans_rescans_until_end_scan():
    outer, inner = _Table(), _Table()
    statements.planning()
    rows = [r["ctx"] for r in outer.execute([1, 2], set())]
    rows += [r["ctx"] for r in inner.execute([1], set())]   # a rescan of another node: same statement
    rows += [r["ctx"] for r in inner.execute([1], set())]
    assert len({c.statement for c in rows}) == 1
    assert rows[-1].statement_total == 4, "the totals of the statement's scans add up"
    counts = statements.counts(inner)
    assert (counts.rows, counts.output_tokens) == (2, 4) and "model time: 3.0 ms" in counts.lines()[0]
    statements.end_scan(outer)
    statements.end_scan(inner)
    assert statements.counts(inner) is None, "plain EXPLAIN after the end shows no counts"
    (after,) = [r["ctx"] for r in outer.execute([1], set())]
    assert after.statement != rows[0].statement
    statements.end_scan(outer)


def test_an_aborted_statement_is_forgotten_at_the_next_planning():
    table = _Table()
    scan = table.execute([1, 2], set())
    first = next(scan)["ctx"].statement
    scan.close()            # the host drops the generator of an aborted query: no end_scan
    statements.planning()   # the next statement is planned
    (again,) = [r["ctx"] for r in table.execute([1], set())]
    assert again.statement != first
    statements.end_scan(table)


def test_cache_choice_reaches_the_context():
    table = _Table()
    gen = table.execute([1], set())
    next(gen)
    table._scan.cache = False
    ctx = pb.RequestContext()
    statements.stamp(ctx, table._scan)
    assert ctx.no_cache
    gen.close()
    statements.end_scan(table)
