"""Typed answers (issue 21, items 1-3): constrained output, the warehouse-style functions, per-row errors.

llm.completions takes json_schema (jsonb) or choices (text[]) and the engine constrains decoding,
so completion_json always holds a value that parses and validates; a schema that is not valid, or
that uses a keyword the engines would not enforce, fails before any token is spent (22023 in the
FDW, INVALID_ARGUMENT in the sidecar).  on_error = 'null' turns a row's own failure into a row
with its error.  llm.classify / extract / filter / generate_* are SQL over the table; their _each
forms inline into a join that the batched nested loop runs.  Everything runs as a plain role (a
member of llm_user) on the CPU model (SmolLM2-135M): validity is tested, accuracy is measured in
bench/bench_classify.py.
"""
from __future__ import annotations

import json

import grpc
import jsonschema
import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

from llm_inference.v1 import inference_pb2 as pb
from llm_inference.v1 import inference_pb2_grpc as pb_grpc
from sidecar_process import sample, scrape

GEN_MODEL = "smollm2-135m-instruct"
ROLE = "typed_alice"
NODE = "LLM Batched Nested Loop"
PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Dakar", "Hanoi", "Perth", "Bern"]


@pytest.fixture(scope="module")
def alice(pg_dsn):
    """A connection of a plain role that may query the llm tables and call the functions."""
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f"CREATE ROLE {ROLE} LOGIN IN ROLE llm_user")
        c.execute(f"GRANT CREATE ON SCHEMA public TO {ROLE}")
    with psycopg.connect(make_conninfo(pg_dsn, user=ROLE), autocommit=True) as conn:
        yield conn
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f"DROP OWNED BY {ROLE}")
        c.execute(f"DROP ROLE {ROLE}")


def generate_work(port: int) -> tuple[float, float]:
    """(Generate requests, tokens decoded) so far, from the sidecar's metrics."""
    samples = scrape(port)
    return (sample(samples, "llmfdw_requests_total", rpc="Generate"),
            sample(samples, "llmfdw_engine_tokens_total", model=GEN_MODEL))


def person_prompts(n: int) -> list[str]:
    return [f"Make up a person who lives in {CITIES[i % 10]} (number {i}): give a name and an age."
            for i in range(n)]


def parses_and_validates(text: str, schema: dict) -> bool:
    try:
        return jsonschema.Draft202012Validator(schema).is_valid(json.loads(text))
    except ValueError:
        return False


def test_200_prompts_under_a_json_schema_all_parse_and_validate(alice):
    prompts = person_prompts(200)
    constrained = alice.execute(
        "SELECT prompt, completion, completion_json, finish_reason FROM llm.completions "
        "WHERE prompt = ANY(%s) AND json_schema = %s AND max_tokens = 80", (prompts, Jsonb(PERSON))).fetchall()
    free = alice.execute("SELECT prompt, completion, completion_json FROM llm.completions "
                         "WHERE prompt = ANY(%s) AND max_tokens = 80", (prompts,)).fetchall()
    assert sorted(r[0] for r in constrained) == sorted(prompts) == sorted(r[0] for r in free)
    valid = [r for r in constrained if parses_and_validates(r[1], PERSON)]
    free_valid = [r for r in free if parses_and_validates(r[1], PERSON)]
    print(f"\nparse+validate rate over {len(prompts)} prompts: json_schema {len(valid) / len(prompts):.0%}, "
          f"unconstrained {len(free_valid) / len(prompts):.0%}; e.g. {constrained[0][1]!r} vs {free[0][1][:80]!r}")
    assert len(valid) == len(prompts)
    for _, completion, value, _ in constrained:
        assert value == json.loads(completion) and set(value) == {"name", "age"}
    assert all(r[2] is None for r in free)   # no constraint: no completion_json
    assert len(free_valid) < len(prompts) // 2   # why constraining matters (measured: 0%)


def test_choices_always_return_one_of_the_labels(alice):
    labels = ["red", "green", "blue", 'dark "navy" \\ blue']
    prompts = [f"What colour is thing number {i}? Answer in a sentence." for i in range(40)]
    rows = alice.execute("SELECT completion, completion_json FROM llm.completions "
                         "WHERE prompt = ANY(%s) AND choices = %s", (prompts, labels)).fetchall()
    assert len(rows) == 40
    for completion, value in rows:
        assert completion in labels and value == completion


def test_an_invalid_schema_fails_before_any_token_is_spent(alice, sidecar_metrics_port):
    before = generate_work(sidecar_metrics_port)
    cases = [
        ('{"type": "strnig"}', "is not a valid JSON Schema"),
        ('{"type": "object", "required": "name"}', "is not a valid JSON Schema"),
        ('[1, 2]', "must be a JSON object"),
        ('{"type": "string", "not": {"const": "x"}}', "'not' at #"),
        ('{"type": "object", "properties": {"n": {"type": "number", "minimum": 0}}}',
         "'minimum' at #/properties/n"),
        ('{"type": "string", "format": "email"}', "format 'email'"),
        ('{"type": "string", "pattern": "[0-9]+"}', "not anchored"),
        ('{"$ref": "#/$defs/missing"}', "points at nothing"),
    ]
    for schema, words in cases:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=words) as err:
            alice.execute("SELECT completion FROM llm.completions WHERE prompt = 'Hi' AND json_schema = %s",
                          (schema,)).fetchall()
        assert err.value.diag.message_hint and "Supported keywords" in err.value.diag.message_hint
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="lists 'a' twice"):
        alice.execute("SELECT completion FROM llm.completions WHERE prompt = 'Hi' AND choices = '{a,b,a}'").fetchall()
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="cannot both be given"):
        alice.execute("SELECT completion FROM llm.completions WHERE prompt = 'Hi' AND choices = '{a,b}' "
                      "AND json_schema = '{\"type\": \"string\"}'").fetchall()
    assert generate_work(sidecar_metrics_port) == before   # no request, no token


def test_the_sidecar_refuses_an_invalid_schema_itself(sidecar_socket, sidecar_metrics_port):
    """A client that skips the FDW's check (another version, a hand-made request) gets
    INVALID_ARGUMENT naming the problem, and no token is decoded."""
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"unix://{sidecar_socket}"))
    tokens = generate_work(sidecar_metrics_port)[1]
    for fields, words in [({"json_schema": '{"type": "strnig"}'}, "not a valid JSON Schema"),
                          ({"json_schema": '{"type": "integer", "multipleOf": 3}'}, "'multipleOf'"),
                          ({"json_schema": '{"type": "array", "prefixItems": [{"type": "string"}], '
                                           '"items": false}'}, "boolean schema false at #/items"),
                          ({"choices": ["a", ""]}, "empty strings"),
                          ({"choices": ["a"], "json_schema": '{"type": "string"}'}, "cannot both")]:
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(pb.GenerateRequest(model=GEN_MODEL, prompt="Hi", **fields), timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details(), \
            err.value.details()
    assert generate_work(sidecar_metrics_port)[1] == tokens


def test_an_answer_cut_short_is_the_rows_error(alice):
    """max_tokens too small for the JSON: 'abort' fails the statement (22032), 'null' returns the
    row with its error and NULL outputs."""
    sql = ("SELECT completion, completion_json, error, finish_reason FROM llm.completions "
           "WHERE prompt = 'Describe a person.' AND json_schema = %s AND max_tokens = 3")
    with pytest.raises(psycopg.errors.InvalidJsonText, match="not valid JSON"):
        alice.execute(sql, (Jsonb(PERSON),)).fetchall()
    ((completion, value, error, finish),) = alice.execute(sql + " AND on_error = 'null'", (Jsonb(PERSON),)).fetchall()
    assert completion is None and value is None and finish == "length"
    assert error.startswith("the answer ") and "is not valid JSON" in error


@pytest.fixture
def long_timeout(pg_dsn):
    """The server's timeout option (the deadline of a whole statement's calls) raised for a
    statement of 10,000 requests on 2 shared cores, then put back."""
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        had = c.execute("SELECT option_value FROM pg_foreign_server s, pg_options_to_table(s.srvoptions) "
                        "WHERE s.srvname = 'llm_sidecar' AND option_name = 'timeout'").fetchone()
        c.execute(f"ALTER SERVER llm_sidecar OPTIONS ({'SET' if had else 'ADD'} timeout '3600')")
        yield
        c.execute(f"ALTER SERVER llm_sidecar OPTIONS ({'SET timeout ' + repr(had[0]) if had else 'DROP timeout'})")


def test_10000_rows_with_3_poisoned_give_3_error_rows_and_no_abort(alice, long_timeout):
    """Three prompts the sidecar refuses (over the model's context), among 10,000: with
    on_error = 'null' they come back with their error, the 9,997 others with their answer."""
    poison = {17: "word " * 14000, 4711: "x" * 70000, 9998: "word " * 14001}   # > 2048 tokens / 65,536 chars
    prompts = [poison.get(i, f"n{i}") for i in range(10000)]
    rows = alice.execute("SELECT prompt, completion, error FROM llm.completions "
                         "WHERE prompt = ANY(%s) AND max_tokens = 1 AND on_error = 'null'", (prompts,)).fetchall()
    assert len(rows) == 10000
    errors = {r[0]: r[2] for r in rows if r[2] is not None}
    assert set(errors) == set(poison.values())
    assert all("context" in e for e in errors.values()), errors
    assert all(r[1] is not None for r in rows if r[2] is None)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="context"):   # 'abort', the default
        alice.execute("SELECT completion FROM llm.completions WHERE prompt = ANY(%s) AND max_tokens = 1",
                      (["n1", poison[4711]],)).fetchall()


def test_on_error_takes_abort_or_null_only(alice):
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="on_error must be 'abort' or 'null'"):
        alice.execute("SELECT completion FROM llm.completions WHERE prompt = 'Hi' AND on_error = 'skip'").fetchall()


@pytest.fixture(scope="module")
def reviews(alice):
    """1,000 short reviews (statistics gathered, so the planner knows their number)."""
    alice.execute("CREATE TABLE reviews (id int PRIMARY KEY, body text)")
    alice.execute("INSERT INTO reviews SELECT g, (ARRAY['I love it', 'It broke at once', 'Great value', "
                  "'Awful support'])[g % 4 + 1] || ' (order ' || g || ')' FROM generate_series(1, 1000) g")
    alice.execute("ANALYZE reviews")
    return "reviews"


BATCHED_FORMS = {
    "classify": "llm.classify_each(r.body, ARRAY['positive', 'negative'])",
    "filter": "llm.filter_each(r.body, 'Is the customer happy?')",
    "extract": "llm.extract_each(r.body, '[\"product\", \"problem\"]')",
    "generate_bool": "llm.generate_bool_each('Is this a complaint? ' || r.body)",
    "generate_int": "llm.generate_int_each('How many stars (1-5) does this review give? ' || r.body)",
    "generate_double": "llm.generate_double_each('Rate this review from 0 to 1: ' || r.body)",
}


@pytest.mark.parametrize("name", BATCHED_FORMS)
def test_each_function_over_a_1000_row_table_runs_as_one_request_per_batch(alice, reviews, name):
    """EXPLAIN: the _each form inlines into a join with llm.completions that the batched nested
    loop runs (prompt = ANY(...) for a batch of rows), not a request per row."""
    sql = f"SELECT r.id, f.* FROM {reviews} r CROSS JOIN LATERAL {BATCHED_FORMS[name]} f"
    plan = "\n".join(row[0] for row in alice.execute(f"EXPLAIN (COSTS OFF) {sql}"))
    assert NODE in plan and "Function Scan" not in plan, plan
    print(f"\n{name}:\n{plan}")


def test_classify_over_rows_returns_labels_in_one_batch(alice, reviews):
    """EXPLAIN ANALYZE: 24 rows classified in one batch, one execute() (one prompt = ANY(...))."""
    labels = ["positive", "negative"]
    sql = (f"SELECT r.id, c.label, c.error FROM {reviews} r CROSS JOIN LATERAL "
           f"llm.classify_each(r.body, ARRAY['positive', 'negative']) c WHERE r.id <= 24")
    plan = "\n".join(row[0] for row in alice.execute(
        f"EXPLAIN (ANALYZE, COSTS OFF, SUMMARY OFF, TIMING OFF, BUFFERS OFF) {sql}"))
    assert NODE in plan and "Batches: 1" in plan and "Requests: 1" in plan, plan
    rows = alice.execute(sql).fetchall()
    assert len(rows) == 24 and all(label in labels and error is None for _, label, error in rows)


def test_the_scalar_functions_return_typed_values(alice):
    one = alice.execute(
        "SELECT llm.classify('I love this phone', ARRAY['positive', 'negative']),"
        "       llm.classify('The screen broke', ARRAY['hardware', 'billing'], ARRAY['a device fault', 'a charge']),"
        "       llm.filter('The parcel never arrived', 'Is this a complaint?'),"
        "       llm.extract('Ana lives in Lima', '[\"name\", \"city\"]'),"
        "       llm.extract('Ana is 31', %s),"
        "       llm.generate_bool('Is Paris in France?'),"
        "       llm.generate_int('How many legs does a cat have?'),"
        "       llm.generate_double('What is half of 3?')", (Jsonb(PERSON),)).fetchone()
    positive, topic, complaint, fields, person, yes, legs, half = one
    assert positive in ("positive", "negative") and topic in ("hardware", "billing")
    assert isinstance(complaint, bool) and isinstance(yes, bool)
    assert set(fields) == {"name", "city"} and all(isinstance(v, str) for v in fields.values())
    assert jsonschema.Draft202012Validator(PERSON).is_valid(person)
    assert isinstance(legs, int) and isinstance(half, float)
    print(f"\n{one}")


def test_a_where_filter_over_a_table(alice, reviews):
    rows = alice.execute(f"SELECT r.id FROM {reviews} r CROSS JOIN LATERAL "
                         f"llm.filter_each(r.body, 'Is the customer happy?') f WHERE f.answer AND r.id <= 8").fetchall()
    assert {r[0] for r in rows} <= set(range(1, 9))
    scalar = alice.execute(f"SELECT count(*) FROM {reviews} r WHERE r.id <= 3 "
                           f"AND llm.filter(r.body, 'Is the customer happy?') IS NOT NULL").fetchone()[0]
    assert scalar == 3
