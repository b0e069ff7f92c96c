"""Constrained output without a model: the checks both sides run (llm_inference.v1.constraints),
the grammar of a choice list, and what each engine is handed (llama.cpp's request body, vLLM's
StructuredOutputsParams keywords: vLLM itself runs only in `make test-vllm`, so its mapping is
tested here and its decoding is untested on this machine)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import grpc
import pytest

from llm_inference.v1 import inference_pb2 as pb
from llm_inference.v1.constraints import (ConstraintError, check_choices, choices_grammar, gbnf_literal,
                                          load_schema)
from llm_sidecar.config import ModelConfig
from llm_sidecar.engines.base import GenerateParams
from llm_sidecar.engines.llama_cpp import LlamaCppEngine
from llm_sidecar.engines.vllm import sampling_kwargs, structured_outputs
from llm_sidecar.servicer import BadArgument, InferenceServicer
from llm_tables.client import per_row_error
from llm_tables.declarations import COMPLETIONS
from llm_tables.errors import LlmError

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"$ref": "#/$defs/age"}},
          "required": ["name", "age"], "additionalProperties": False,
          "$defs": {"age": {"type": "integer", "minimum": 0, "maximum": 120}}, "title": "a person"}


@pytest.mark.parametrize("schema", [
    PERSON,
    {"type": "array", "items": {"type": "string", "format": "date"}, "minItems": 1, "maxItems": 3},
    {"anyOf": [{"type": "boolean"}, {"const": "maybe"}, {"enum": ["a", 1, None]}]},
    {"type": "string", "pattern": "^[a-z]+$"},
    {"type": ["string", "null"]},
    {"type": "integer", "minimum": -(2**53 - 1), "maximum": 2**53 - 1},
])
def test_schemas_the_engines_enforce_are_taken(schema):
    assert load_schema(json.dumps(schema)) == schema


@pytest.mark.parametrize("schema, words", [
    ("{nope", "is not valid JSON"),
    ('"string"', "must be a JSON object"),
    ({"type": "strnig"}, "is not a valid JSON Schema: 'strnig' is not valid under any of the given schemas (at #/type)"),
    ({"type": "object", "required": "a"}, "is not a valid JSON Schema"),
    ({"not": {"type": "string"}}, "'not' at #, which the engines do not enforce"),
    ({"oneOf": [{"type": "string"}]}, "use anyOf"),
    ({"allOf": [{"type": "string"}]}, "'allOf'"),
    ({"type": "object", "properties": {"n": {"type": "number", "maximum": 1}}},
     "'maximum' at #/properties/n, where the type is number"),
    ({"type": "integer", "multipleOf": 2}, "'multipleOf'"),
    ({"type": "array", "uniqueItems": True}, "'uniqueItems'"),
    ({"type": "object", "minProperties": 1}, "'minProperties'"),
    ({"type": "string", "format": "email"}, "format 'email'"),
    ({"type": "string", "pattern": "[0-9]"}, "not anchored"),
    ({"type": "array", "prefixItems": [{"type": "string"}], "items": False}, "boolean schema false at #/items"),
    ({"$ref": "#/$defs/x"}, "points at nothing"),
    ({"$ref": "https://example.com/s.json"}, "nothing is fetched"),
    ({"type": "integer", "minimum": -2**63}, "integer bounds"),
    ({"type": "integer", "maximum": 10**18 - 1}, "integer bounds"),
    ({"type": "integer", "maximum": 1.5}, "whole numbers"),
    ({"type": "object", "x-extra": 1}, "'x-extra'"),
])
def test_schemas_they_would_not_enforce_are_refused_naming_the_problem(schema, words):
    with pytest.raises(ConstraintError, match=None) as err:
        load_schema(schema if isinstance(schema, str) else json.dumps(schema))
    assert words in str(err.value)


def test_choices_are_checked():
    assert check_choices(["a", "b"]) == ["a", "b"]
    for bad, words in [([], "at least one"), (["a", None], "NULL"), (["a", ""], "empty"),
                       (["a", "b", "a"], "'a' twice"), ([str(i) for i in range(1001)], "at most 1,000")]:
        with pytest.raises(ConstraintError, match=words):
            check_choices(bad)


def test_choices_become_a_grammar_of_escaped_literals():
    assert choices_grammar(["positive", "negative"]) == 'root ::= "positive" | "negative"'
    assert gbnf_literal('say "hi"\\') == r'"say \"hi\"\\"'
    assert gbnf_literal("a\nb\tc\r\x01\x7f") == r'"a\nb\tc\r\x01\x7F"'
    assert gbnf_literal("café 日本") == '"café 日本"'


def body(**constraint) -> dict:
    config = ModelConfig(name="g", task="generate", engine="llama_cpp", source={"path": "/x"})
    params = GenerateParams({"max_tokens": 5, "temperature": 0.0}, **constraint)
    return LlamaCppEngine(config)._request("Hi", "", False, params)[1]


def test_llama_cpp_gets_the_schema_as_json_schema_and_choices_as_a_grammar():
    assert body(json_schema=PERSON)["json_schema"] == PERSON and "grammar" not in body(json_schema=PERSON)
    assert body(choices=("yes", 'n"o'))["grammar"] == r'root ::= "yes" | "n\"o"'
    assert "json_schema" not in body() and "grammar" not in body()


def test_vllm_gets_structured_outputs():
    """The mapping only: vLLM runs in `make test-vllm` (tests/test_vllm.py), untested here."""
    plain = GenerateParams({"max_tokens": 5})
    assert structured_outputs(GenerateParams({"max_tokens": 5}, json_schema=PERSON)) == {"json": PERSON}
    assert structured_outputs(GenerateParams({"max_tokens": 5}, choices=("a", "b"))) == {"choice": ["a", "b"]}
    assert structured_outputs(plain) is None
    assert "structured_outputs" not in sampling_kwargs(plain)


def servicer() -> InferenceServicer:
    return SimpleNamespace(config=SimpleNamespace(max_input_bytes=1 << 20),
                           _check_size=lambda text, what: None)


def test_the_servicer_checks_the_constraint_as_the_fdw_does():
    params = GenerateParams({"max_tokens": 5})
    got = InferenceServicer._constrained(servicer(), params, pb.GenerateRequest(json_schema=json.dumps(PERSON)))
    assert got.json_schema == PERSON and got.values == params.values
    got = InferenceServicer._constrained(servicer(), params, pb.GenerateRequest(choices=["a", "b"]))
    assert got.choices == ("a", "b")
    assert InferenceServicer._constrained(servicer(), params, pb.GenerateRequest()) is params
    for request, words in [(pb.GenerateRequest(json_schema='{"not": {}}'), "'not'"),
                           (pb.GenerateRequest(choices=["a", "a"]), "twice"),
                           (pb.GenerateRequest(choices=["a"], json_schema="{}"), "cannot both")]:
        with pytest.raises(BadArgument, match=words):
            InferenceServicer._constrained(servicer(), params, request)


def test_the_fdw_refuses_a_bad_constraint_with_22023_and_a_hint():
    keys = COMPLETIONS.keys("llm.completions")
    for column, value, words in [("json_schema", '{"type": "strnig"}', "not a valid JSON Schema"),
                                 ("choices", ["a", ""], "empty strings"),
                                 ("on_error", "skip", "'abort' or 'null'")]:
        with pytest.raises(LlmError, match=words) as err:
            keys.check(keys.columns[column], value)
        assert err.value.sqlstate == "22023" and err.value.hint


class _Err(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, metadata=()) -> None:
        self._code, self._metadata = code, metadata

    def code(self) -> grpc.StatusCode:
        return self._code

    def trailing_metadata(self):
        return self._metadata


def test_which_failures_are_a_rows_own():
    """on_error = 'null' reports these in the row; all others fail the statement."""
    own = [_Err(grpc.StatusCode.INVALID_ARGUMENT), _Err(grpc.StatusCode.INTERNAL),
           _Err(grpc.StatusCode.RESOURCE_EXHAUSTED)]
    statement = [_Err(grpc.StatusCode.UNAVAILABLE), _Err(grpc.StatusCode.UNAVAILABLE, (("llmfdw-unavailable", "loading"),)),
                 _Err(grpc.StatusCode.CANCELLED), _Err(grpc.StatusCode.DEADLINE_EXCEEDED),
                 _Err(grpc.StatusCode.UNAUTHENTICATED), _Err(grpc.StatusCode.PERMISSION_DENIED),
                 _Err(grpc.StatusCode.NOT_FOUND), _Err(grpc.StatusCode.FAILED_PRECONDITION),
                 _Err(grpc.StatusCode.RESOURCE_EXHAUSTED, (("llmfdw-rejected", "queue-full"),))]
    assert all(per_row_error(e) for e in own)
    assert not any(per_row_error(e) for e in statement)


def test_a_schema_nested_past_pythons_limits_is_a_clear_refusal():
    """Found by a hostile pass: 5,000 nested arrays gave a raw RecursionError through SQL."""
    deep = '{"type": "array", "items": ' * 5000 + "{}" + "}" * 5000
    with pytest.raises(ConstraintError, match="nests too deeply"):
        load_schema(deep)
