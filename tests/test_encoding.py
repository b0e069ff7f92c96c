"""Text across the FDW host's boundary in UTF8, LATIN1 and SQL_ASCII databases.

Options, column names, quals, results and messages cross between the database encoding and
Python's str (tests/echo_fdw.py and tests/boundary_fdw.py on the Python side). A character the
database encoding cannot hold must be a clear SQL error, never a crashed backend: each test ends by
running SELECT 1 on the same connection. SQL_ASCII is taken as UTF-8, with bytes that are not
UTF-8 passed through unchanged (surrogateescape).
"""
from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

ENCODINGS = ["UTF8", "LATIN1", "SQL_ASCII"]


@pytest.fixture(scope="module", params=ENCODINGS)
def encoded_db(request, pg_server) -> Iterator[tuple[str, str]]:
    """(encoding, dsn) of a fresh database in that encoding with the extension and test tables."""
    encoding = request.param
    name = f"llmfdw_enc_{encoding.lower()}"
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {name} ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' "
                  "TEMPLATE template0")
    dsn = pg_server.dsn(name)
    with psycopg.connect(dsn, autocommit=True, client_encoding="UTF8") as c:
        c.execute("CREATE EXTENSION llmfdw CASCADE")  # and vector
        c.execute("CREATE SERVER echo FOREIGN DATA WRAPPER llmfdw OPTIONS (wrapper 'echo_fdw.EchoFdw')")
        c.execute("CREATE SERVER boundary FOREIGN DATA WRAPPER llmfdw "
                  "OPTIONS (wrapper 'boundary_fdw.BoundaryFdw')")
        c.execute("""CREATE FOREIGN TABLE echo_quals (field text, op text, value text, pytype text,
                     key text, columns text[]) SERVER echo OPTIONS (mode 'quals')""")
        c.execute("""CREATE FOREIGN TABLE opts (name text, value text OPTIONS (note 'crème'))
                     SERVER boundary OPTIONS (mode 'options')""")
        c.execute("""CREATE FOREIGN TABLE cols (name text, value text, "naïve" text)
                     SERVER boundary OPTIONS (mode 'columns', codepoints '233')""")
    yield encoding, dsn
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as c:
        c.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def db(encoded_db) -> Iterator[psycopg.Connection]:
    """A UTF8-client connection to the encoded database; checks the backend survived the test."""
    with psycopg.connect(encoded_db[1], autocommit=True, client_encoding="UTF8") as connection:
        yield connection
        assert connection.execute("SELECT 1").fetchone() == (1,)


def text_table(db: psycopg.Connection, name: str, mode: str, text: str) -> str:
    """A boundary_fdw table whose FDW class produces `text` (given as code points: any encoding)."""
    codepoints = ",".join(str(ord(ch)) for ch in text)
    db.execute(f"DROP FOREIGN TABLE IF EXISTS {name}")
    db.execute(f"CREATE FOREIGN TABLE {name} (name text, value text) SERVER boundary "
               f"OPTIONS (mode '{mode}', codepoints '{codepoints}')")
    return name


def test_non_ascii_table_and_column_options_reach_python(db):
    # ADD note 'café' on a table used to kill a LATIN1 backend with signal 11
    db.execute("ALTER FOREIGN TABLE opts OPTIONS (ADD note 'café')")
    try:
        seen = dict(db.execute("SELECT name, value FROM opts").fetchall())
    finally:
        db.execute("ALTER FOREIGN TABLE opts OPTIONS (DROP note)")
    assert seen == {"mode": "options", "note": "café", "value.note": "crème"}


def test_non_ascii_column_names_reach_python_in_order_and_map_results_back(db):
    rows = db.execute('SELECT name, value, "naïve" FROM cols').fetchall()
    assert rows == [("name", "text", "é"), ("value", "text", "é"), ("naïve", "text", "é")]


def test_non_ascii_quals_round_trip(db):
    rows = db.execute("SELECT field, op, value, pytype, key FROM echo_quals WHERE key = 'café'").fetchall()
    assert rows == [("key", "=", "'café'", "str", "café")]
    with db.cursor() as cur:  # a Param, evaluated at execution
        cur.execute("SELECT value, key FROM echo_quals WHERE key = %s", ("naïve",), prepare=True)
        assert cur.fetchall() == [("'naïve'", "naïve")]


def test_non_ascii_quals_in_explain(db):
    plan = "\n".join(r[0] for r in db.execute("EXPLAIN SELECT * FROM echo_quals WHERE key = 'café'"))
    assert "Multicorn: quals: key = café" in plan


def test_non_ascii_results_come_back(db):
    table = text_table(db, "latin_text", "text", "éüß café")
    assert db.execute(f"SELECT value FROM {table}").fetchall() == [("éüß café",)]


def test_result_the_database_cannot_hold_is_a_clear_error(db, encoded_db):
    table = text_table(db, "wide_text", "text", "€ 漢")
    if encoded_db[0] != "LATIN1":
        assert db.execute(f"SELECT value FROM {table}").fetchall() == [("€ 漢",)]
        return
    with pytest.raises(psycopg.errors.UntranslatableCharacter) as exc:
        db.execute(f"SELECT value FROM {table}")
    assert 'has no equivalent in encoding "LATIN1"' in exc.value.diag.message_primary
    assert 'column "value"' in exc.value.diag.context


def test_non_ascii_error_message_hint_and_detail(db):
    table = text_table(db, "error_text", "error", "café fermé")
    with pytest.raises(psycopg.Error) as exc:
        db.execute(f"SELECT * FROM {table}")
    diag = exc.value.diag
    assert (diag.message_primary, diag.message_hint, diag.message_detail) == ("café fermé",) * 3


def test_error_text_the_database_cannot_hold_is_escaped_not_lost(db, encoded_db):
    table = text_table(db, "error_wide", "error", "closed €")
    with pytest.raises(psycopg.Error) as exc:
        db.execute(f"SELECT * FROM {table}")
    expected = "closed \\u20ac" if encoded_db[0] == "LATIN1" else "closed €"
    assert exc.value.diag.message_primary == expected


def test_non_ascii_warning_reaches_the_client(db):
    notices: list[str] = []
    db.add_notice_handler(lambda d: notices.append(d.message_primary))
    table = text_table(db, "warning_text", "warning", "attention: déjà vu")
    assert db.execute(f"SELECT value FROM {table}").fetchall() == [("attention: déjà vu",)]
    assert "attention: déjà vu" in notices


def test_sql_ascii_passes_bytes_that_are_not_utf8_through_unchanged(db, encoded_db):
    if encoded_db[0] != "SQL_ASCII":
        pytest.skip("only SQL_ASCII stores bytes without an encoding")
    rows = db.execute("""SELECT value, convert_to(key, 'SQL_ASCII') FROM echo_quals
                         WHERE key = convert_from('\\xe9'::bytea, 'SQL_ASCII')""").fetchall()
    assert rows == [("'\\udce9'", b"\xe9")]


def test_nul_in_a_result_is_a_clear_error(db):
    table = text_table(db, "nul_text", "text", "a\x00b")
    with pytest.raises(psycopg.errors.CharacterNotInRepertoire) as exc:
        db.execute(f"SELECT value FROM {table}")
    assert "0x00" in exc.value.diag.message_primary


@pytest.fixture(scope="module")
def sql_ascii_llm(pg_server, sidecar_socket) -> Iterator[str]:
    """DSN of a plain role (member of llm_user) in a SQL_ASCII database with the llm schema."""
    from deploy import embedded

    name = "llmfdw_enc_llm_ascii"
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    embedded.apply_schema(pg_server, name, f"unix://{sidecar_socket}")
    with psycopg.connect(pg_server.dsn(name), autocommit=True) as c:
        c.execute("CREATE ROLE enc_alice LOGIN IN ROLE llm_user")
    yield make_conninfo(pg_server.dsn(name), user="enc_alice", client_encoding="UTF8")
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as c:
        c.execute(f"DROP DATABASE {name} WITH (FORCE)")
        c.execute("DROP ROLE enc_alice")


@pytest.mark.parametrize("query", [
    "SELECT embedding FROM llm.embeddings WHERE input = {bad}",
    "SELECT embedding FROM llm.embeddings WHERE input = ANY(ARRAY['fine', {bad}])",
    "SELECT llm.embed({bad})",
    "SELECT e.embedding FROM (VALUES ('fine'), ({bad})) d(body) JOIN llm.embeddings e ON e.input = d.body",
    "SELECT completion FROM llm.completions WHERE prompt = {bad} AND max_tokens = 1",
])
def test_bytes_that_are_not_utf8_are_a_clear_error_naming_the_column(sql_ascii_llm, query):
    """A SQL_ASCII database keeps any bytes; the models take UTF-8: 0xff is refused with 22021,
    naming the column and the fix, not a Python UnicodeEncodeError."""
    bad = "convert_from('\\x6361ff'::bytea, 'SQL_ASCII')"   # 'ca' and the byte 0xff
    with psycopg.connect(sql_ascii_llm, autocommit=True) as c:
        with pytest.raises(psycopg.errors.CharacterNotInRepertoire) as exc:
            c.execute(query.format(bad=bad))
        column = "prompt" if "completions" in query else "input"
        assert exc.value.diag.message_primary == \
            f'column "{column}" is not valid UTF-8 (byte 0xff at character 3): the models take UTF-8 text'
        assert "SQL_ASCII" in exc.value.diag.message_hint and "ENCODING 'UTF8'" in exc.value.diag.message_hint
        # UTF-8 text is fine in the same database and session
        assert c.execute("SELECT vector_dims(llm.embed('café'))").fetchone() == (384,)
