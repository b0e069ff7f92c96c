"""EXPLAIN output of llm.* scans and joins, compared whole with a golden file, as pg_regress does for
postgres_fdw: tests/golden/explain.sql runs against the session's database, and the plans of its
EXPLAIN statements must equal tests/golden/explain.out line for line.  The sidecar's address (a
temporary path) reads as unix://SIDECAR.

After an intended change of the output, rewrite the file and read the diff before committing it:
    LLMFDW_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_explain_golden.py
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "golden"


def statements(sql: str) -> list[str]:
    """The statements of a script whose statements end with ';' at the end of a line."""
    body = "\n".join(line for line in sql.splitlines() if not line.startswith("--"))
    return [s.strip() for s in re.split(r";\s*$", body, flags=re.M) if s.strip()]


def test_explain_output_matches_the_golden_file(conn, sidecar_socket):
    out: list[str] = []
    with conn.transaction():
        for statement in statements((GOLDEN / "explain.sql").read_text()):
            cursor = conn.execute(statement)
            if statement.upper().startswith("EXPLAIN"):
                out += [statement + ";", *(row[0] for row in cursor.fetchall()), ""]
        conn.execute("DROP TABLE docs")
    got = "\n".join(out).replace(f"unix://{sidecar_socket}", "unix://SIDECAR")
    expected_file = GOLDEN / "explain.out"
    if os.environ.get("LLMFDW_UPDATE_GOLDEN"):
        expected_file.write_text(got)
    expected = expected_file.read_text()
    diff = "\n".join(difflib.unified_diff(expected.splitlines(), got.splitlines(), "explain.out", "got",
                                          lineterm=""))
    assert got == expected, f"EXPLAIN output differs from tests/golden/explain.out:\n{diff}"
