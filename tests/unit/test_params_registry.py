"""The generation parameters' registry (llm_inference.v1.params.PARAMS) and everything derived from
it: the proto's GenerationParams fields, llm.completions' request columns, the sidecar's YAML
defaults and request handling, each engine's mapping, helm/values.schema.json and README.md's
table.  Each test fails when one of them drifts from the registry."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from google.protobuf.descriptor import FieldDescriptor
from pydantic import ValidationError

from deploy import params_reference
from llm_inference.v1 import inference_pb2 as pb
from llm_inference.v1.params import BY_NAME, PARAMS, Param
from llm_sidecar.config import ModelConfig, RequestDefaults
from llm_sidecar.engines.base import GenerateParams
from llm_sidecar.engines.llama_cpp import LlamaCppEngine
from llm_sidecar.engines.vllm import sampling_kwargs
from llm_sidecar.servicer import BadArgument, InferenceServicer
from llm_tables.declarations import COMPLETIONS

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto" / "llm_inference" / "v1" / "inference.proto"
# A request column's SQL type -> the proto field type of the same width
PROTO_TYPES = {"integer": FieldDescriptor.TYPE_INT32, "bigint": FieldDescriptor.TYPE_INT64,
               "double precision": FieldDescriptor.TYPE_DOUBLE}
FIELDS = [f for f in pb.GenerationParams.DESCRIPTOR.fields if f.name != "stop"]


def inside(p: Param) -> list[int | float]:
    """Values in the range: its edges (the low one only when included) and a middle one."""
    low = p.low if not p.low_open else p.low + (1 if p.kind is int else 1e-9)
    high = p.low + 1000 if p.open_above else p.high
    return [low, high, p.kind((low + high) / 2)]


def outside(p: Param) -> list[float]:
    return [p.low - 1, p.low if p.low_open else p.low - 1, p.high + 1, float("nan")]


def proto_comments() -> dict[str, str]:
    """GenerationParams' field name -> the comment lines above it in inference.proto."""
    message = re.search(r"message GenerationParams \{(.*?)\n\}", PROTO.read_text(), re.S).group(1)
    comments, pending = {}, []
    for line in message.splitlines():
        line = line.strip()
        if line.startswith("//"):
            pending.append(line[2:].strip())
        elif line:
            comments[line.split("=")[0].split()[-1]] = " ".join(pending)
            pending = []
    return comments


def test_the_registry_and_the_proto_fields_agree():
    """Names in field-number order, one optional field each, of the SQL type's width."""
    assert [f.name for f in sorted(FIELDS, key=lambda f: f.number)] == [p.name for p in PARAMS]
    for field in FIELDS:
        param = BY_NAME[field.name]
        assert field.type == PROTO_TYPES[param.sql_type], field.name
        assert field.has_presence, f"{field.name} is not optional (an unset field must read as unset)"


def test_each_proto_field_is_documented_with_the_registrys_range_and_default():
    comments = proto_comments()
    for p in PARAMS:
        assert f"Valid: {p.range}." in comments[p.name], (p.name, comments[p.name])
        if p.default is not None:
            assert f"Default: {p.default:g}." in comments[p.name], (p.name, comments[p.name])


def test_each_parameter_is_a_request_column_of_completions_settable_as_an_option():
    columns = {c.name: c for c in COMPLETIONS.request_columns}
    for p in PARAMS:
        column = columns[p.name]
        assert (column.sql_type, column.option, column.param) == (p.sql_type, True, p)
    assert list(COMPLETIONS.params) == [p.name for p in PARAMS]


@pytest.mark.parametrize("param", PARAMS, ids=lambda p: p.name)
def test_each_range_is_checked_the_same_everywhere(param):
    """The registry's check and the YAML's (pydantic, built from the registry) agree on each side
    of every edge."""
    for value in inside(param):
        assert param.problem(value) is None, value
        assert getattr(RequestDefaults(**{param.name: value}), param.name) == value
    for value in outside(param):
        assert param.problem(value).startswith(f"{param.name} must be"), value
        with pytest.raises(ValidationError):
            RequestDefaults(**{param.name: value})
    assert set(RequestDefaults.model_fields) == set(BY_NAME)


def engine(defaults: dict | None = None, context_length: int = 2048) -> SimpleNamespace:
    config = ModelConfig(name="g", task="generate", engine="llama_cpp", source={"path": "/x"},
                         context_length=context_length, defaults=defaults or {})
    return SimpleNamespace(config=config)


def test_the_servicer_takes_each_field_then_the_yaml_default_then_the_registrys():
    requested = {p.name: inside(p)[0] for p in PARAMS}
    got = InferenceServicer._params(engine(), pb.GenerationParams(**requested, stop=["."]))
    assert got.values == requested and got.stop == ["."]
    yaml = {p.name: inside(p)[1] for p in PARAMS if p.name != "max_tokens"}
    assert InferenceServicer._params(engine(yaml), pb.GenerationParams()).values == {"max_tokens": 128, **yaml}
    registry = {p.name: p.default for p in PARAMS if p.default is not None}
    assert InferenceServicer._params(engine(), pb.GenerationParams()).values == registry == \
        {"max_tokens": 128, "temperature": 0.0}


@pytest.mark.parametrize("param", PARAMS, ids=lambda p: p.name)
def test_the_servicer_refuses_each_value_out_of_range_with_the_registrys_words(param):
    for value in outside(param):
        if param.kind is int and not math.isfinite(value):
            continue   # an integer field cannot hold NaN
        value = param.kind(value)
        if param.open_above and value > param.high:
            continue   # nor a value wider than itself (the FDW refuses it first: `fits`)
        with pytest.raises(BadArgument) as err:
            InferenceServicer._params(engine(), pb.GenerationParams(**{param.name: value}))
        assert str(err.value) == param.problem(value)


def test_max_tokens_is_also_held_to_the_models_context():
    with pytest.raises(BadArgument, match="at most the model's context length 64, got 128"):
        InferenceServicer._params(engine(context_length=64), pb.GenerationParams())


def test_llama_cpp_gets_each_parameter_under_its_own_name():
    params = GenerateParams({p.name: inside(p)[0] for p in PARAMS}, stop=["."])
    config = ModelConfig(name="g", task="generate", engine="llama_cpp", source={"path": "/x"})
    kind, body = LlamaCppEngine(config)._request("Hi", "", False, params)
    sent = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "messages")}
    expected = {("repeat_penalty" if name == "repetition_penalty" else name): value
                for name, value in params.values.items()}
    assert kind == "chat" and sent == {**expected, "stop": ["."]}
    _, body = LlamaCppEngine(config)._request("Hi", "", True, GenerateParams({"max_tokens": 3, "temperature": 0.0}))
    assert "repeat_penalty" not in body and "top_p" not in body and body["prompt"] == "Hi"   # unset: llama.cpp's


def test_vllm_gets_each_parameter_as_a_samplingparams_keyword():
    """The mapping only: vLLM itself runs in `make test-vllm` (tests/test_vllm.py), not here."""
    values = {p.name: inside(p)[0] for p in PARAMS}
    assert sampling_kwargs(GenerateParams(values, stop=["."])) == {**values, "stop": ["."]}
    assert sampling_kwargs(GenerateParams({"max_tokens": 3, "temperature": 0.0})) == \
        {"max_tokens": 3, "temperature": 0.0, "stop": None}


def test_the_helm_schema_and_the_readme_table_are_what_the_registry_gives():
    """Run `.venv/bin/python -m deploy.params_reference` to rewrite them when this fails."""
    assert params_reference.drifted() == []
    schema = json.loads(params_reference.HELM_SCHEMA.read_text())
    assert schema["definitions"]["model"]["properties"]["defaults"] == params_reference.defaults_schema()
    table = params_reference.README.read_text()
    for p in PARAMS:
        assert f"| `{p.name}` | {p.sql_type} |" in table
