"""One poisoned row among 10,000 (issue 19's size): it fails alone, with its error, and blocks nothing.

The cluster and the plain role `alice` are tests/test_vectorizer.py's (its fixtures, imported);
the drain is CALL llm.run_vectorizer() in batches of the default size (512), so the poisoned row
sits inside one batch that has to be split down to it while the other 19 batches go through.
The texts are short: 10,000 of them embed in tens of seconds on 2 cores.
"""
from __future__ import annotations

from test_vectorizer import alice, chunks, cluster, embedding_of, status, table  # noqa: F401 (fixtures)
from vectors import assert_same_embeddings  # tests/vectors.py

ROWS = 10_000
POISONED = 6_543
POISON = "word " * 250_000   # 1.25 MB: over the sidecar's max_input_bytes (1 MiB)


def test_one_poisoned_row_among_ten_thousand_fails_alone(alice):
    rows = [(i, f"row {i} of the big table") for i in range(1, ROWS + 1)]
    rows[POISONED - 1] = (POISONED, POISON)
    with table(alice, "big", rows), table(alice, "beside", [(1, "another vectorizer's row")]):
        alice.execute("SELECT llm.create_vectorizer('big', 'body', chunking => 'none', hnsw => false)")
        alice.execute("SELECT llm.create_vectorizer('beside', 'body', chunking => 'none', hnsw => false)")
        assert status(alice, "big") == (ROWS, 0)
        alice.execute("CALL llm.run_vectorizer()")
        pending, failed, errors = alice.execute(
            "SELECT pending, failed, errors FROM llm.vectorizers WHERE name = 'big'").fetchone()
        assert (pending, failed) == (0, 1)
        assert "max_input_bytes" in errors[0]
        queue = alice.execute("SELECT id, attempts, next_try > now(), error FROM big_queue").fetchall()
        assert [q[:3] for q in queue] == [(POISONED, 1, True)] and "max_input_bytes" in queue[0][3]
        embedded = alice.execute("SELECT count(*), count(DISTINCT id), bool_or(id = %s), "
                                 "bool_and(chunk = 'row ' || id || ' of the big table') FROM big_chunks",
                                 (POISONED,)).fetchone()
        assert embedded == (ROWS - 1, ROWS - 1, False, True)   # each row once, its own text
        sample = alice.execute("SELECT chunk, embedding FROM big_chunks WHERE id = ANY(%s) ORDER BY id",
                               ([1, POISONED - 1, POISONED + 1, ROWS],)).fetchall()
        assert_same_embeddings([vector for _, vector in sample], [embedding_of(alice, text) for text, _ in sample])
        assert status(alice, "beside") == (0, 0) and chunks(alice, "beside") == {1: ["another vectorizer's row"]}
