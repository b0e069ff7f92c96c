"""Fast unit tests of the FDW side's logic: key columns, option levels' Python half, the
client's back-off and size checks, gRPC status -> SQL error.  No Postgres, no model."""
from __future__ import annotations

import grpc
import pytest

from llm_tables import client, errors, tables
from llm_tables.declarations import COMPLETIONS, EMBEDDINGS
from llm_tables.options import check_server_options, check_table_options, parse_options
from llm_inference.v1 import inference_pb2 as pb, params
from multicorn import ColumnDefinition, Qual

KEYS = COMPLETIONS.keys("llm.completions")


def test_any_of_null_is_no_row():
    assert KEYS.resolve([Qual("prompt", ("=", True), None)]).empty


def test_duplicates_and_nulls_in_any_are_dropped_in_order():
    resolved = KEYS.resolve([Qual("prompt", ("=", True), ["b", None, "a", "b"])])
    assert resolved.values["prompt"] == ["b", "a"] and not resolved.empty


def test_a_list_of_distinct_values_is_kept_not_copied():
    """The scan keeps its values as long as it runs: a copy of `input = ANY(<200,000 texts>)`
    cost a cancelled scan's backend milliseconds to drop (fdw/src/rowsource.c frees the host's
    own list after the transaction)."""
    given = ["b", "a", "c"]
    resolved = KEYS.resolve([Qual("prompt", ("=", True), given)])
    assert resolved.values["prompt"] is given
    assert tables._window(given, {}) is given and tables._window(given, {"limit": 5}) is given
    assert tables._window(given, {"offset": 1}) == ["a", "c"] and given == ["b", "a", "c"]


@pytest.mark.parametrize("qual, words", [
    (Qual("max_tokens", "=", 2**31), ["2147483648 is out of range for max_tokens, a column of type integer"]),
    (Qual("seed", "=", 2**63), ["out of range for seed, a column of type bigint"]),
    (Qual("stop", "=", ["a", None]), ["stop", "NULL"]),
    (Qual("stop", "=", [""]), ["stop", "empty"]),
    (Qual("max_tokens", ">", 5), ["only supports =", "not >"]),
])
def test_bad_values_name_the_column(qual, words):
    with pytest.raises(errors.LlmError) as err:
        KEYS.resolve([Qual("prompt", "=", "hi"), qual])
    assert err.value.sqlstate == errors.INVALID_PARAMETER_VALUE
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("param, good, bad", [
    (params.BY_NAME["max_tokens"], [1, 2048, 2**31 - 1], [0, -5, 2**31, 1.5, "3", True]),
    (params.BY_NAME["temperature"], [0, 0.0, 0.7, 2, 2.0], [-0.5, 2.01, float("nan"), float("inf"), -float("inf"), "0.5"]),
    (params.BY_NAME["top_p"], [1e-9, 0.5, 1], [0, 0.0, 1.5, float("nan"), float("inf")]),
    (params.BY_NAME["seed"], [0, 42, 2**31 - 1], [-1, 2**31, 2**40, 0.5]),
    (params.BY_NAME["frequency_penalty"], [-2, 0, 1.5, 2.0], [-2.01, 2.5, float("nan"), "1"]),
    (params.BY_NAME["repetition_penalty"], [1e-9, 1, 2.0], [0, 0.0, -1, 2.01, float("inf")]),
])
def test_the_parameter_table_gives_each_range_once(param, good, bad):
    """The one definition the FDW (options, quals) and the sidecar (servicer, YAML) all read."""
    for value in good:
        assert param.problem(value) is None, value
    for value in bad:
        problem = param.problem(value)
        assert problem and problem.startswith(f"{param.name} must be"), value
    assert params.BY_NAME["temperature"].problem(float("nan")) == "temperature must be in [0, 2] (0 = greedy), got nan"
    assert params.BY_NAME["max_tokens"].problem(-5, "option default_max_tokens") == \
        "option default_max_tokens must be at least 1, got -5"
    assert set(params.BY_NAME) == set(COMPLETIONS.params) == \
        set(pb.GenerationParams.DESCRIPTOR.fields_by_name) - {"stop"}


@pytest.mark.parametrize("qual, words", [
    (Qual("temperature", "=", float("nan")), "temperature must be in [0, 2] (0 = greedy), got nan"),
    (Qual("temperature", "=", float("inf")), "temperature must be in [0, 2] (0 = greedy), got inf"),
    (Qual("top_p", "=", 0.0), "top_p must be in (0, 1], got 0"),
    (Qual("max_tokens", "=", 0), "max_tokens must be at least 1, got 0"),
    (Qual("seed", "=", -1), "seed must be in [0, 2147483647], got -1"),
    (Qual("frequency_penalty", "=", 2.5), "frequency_penalty must be in [-2, 2], got 2.5"),
    (Qual("repetition_penalty", "=", 0.0), "repetition_penalty must be in (0, 2], got 0"),
])
def test_a_parameter_out_of_range_is_refused_before_any_request(qual, words):
    with pytest.raises(errors.LlmError) as err:
        KEYS.resolve([Qual("prompt", "=", "hi"), qual])
    assert str(err.value) == words
    assert err.value.sqlstate == errors.INVALID_PARAMETER_VALUE
    assert err.value.hint.startswith(f"{qual.field_name}: ")


@pytest.mark.parametrize("options, words", [
    ({"temperature": "NaN"}, "option temperature must be in [0, 2] (0 = greedy), got nan"),
    ({"default_temperature": "Infinity"}, "option default_temperature must be in [0, 2] (0 = greedy), got inf"),
    ({"default_max_tokens": "-5"}, "option default_max_tokens must be at least 1, got -5"),
    ({"top_p": "0"}, "option top_p must be in (0, 1], got 0"),
    ({"seed": "-1"}, "option seed must be in [0, 2147483647], got -1"),
    ({"default_presence_penalty": "-3"}, "option default_presence_penalty must be in [-2, 2], got -3"),
])
def test_option_defaults_out_of_range_fail_when_the_ddl_runs(options, words):
    server = {k: v for k, v in options.items() if k.startswith("default_")}
    with pytest.raises(errors.LlmError) as err:
        if server:
            check_server_options(server)
        else:
            check_table_options({"table": "completions", **options})
    assert str(err.value) == words and err.value.sqlstate == errors.INVALID_PARAMETER_VALUE
    assert err.value.hint
    check_server_options({"default_temperature": "0.7", "default_max_tokens": "16", "default_top_p": "1"})


def test_text_that_is_not_utf8_names_the_column():
    # a SQL_ASCII database's byte 0xff reaches Python as U+DCFF (surrogateescape)
    with pytest.raises(errors.LlmError) as err:
        KEYS.resolve([Qual("prompt", ("=", True), ["fine", "bad \udcff"])])
    assert str(err.value).startswith('column "prompt" is not valid UTF-8 (byte 0xff at character 5)')
    assert err.value.sqlstate == "22021" and "SQL_ASCII" in err.value.hint
    with pytest.raises(errors.LlmError, match='column "stop" is not valid UTF-8'):
        KEYS.resolve([Qual("prompt", "=", "hi"), Qual("stop", "=", ["\udce9"])])


def column(name: str, base_type_name: str) -> ColumnDefinition:
    return ColumnDefinition(name, base_type_name=base_type_name)


def test_column_types_are_checked_against_the_declaration():
    ok = {"input": column("input", "character varying"), "embedding": column("embedding", "extensions.vector"),
          "dimensions": column("dimensions", "bigint"), "mine": column("mine", "uuid")}
    EMBEDDINGS.check_column_types(ok)
    EMBEDDINGS.check_column_types({"embedding": ColumnDefinition("embedding")})   # a host without types
    with pytest.raises(errors.LlmError) as err:
        EMBEDDINGS.check_column_types({"input": column("input", "text"), "embedding": column("embedding", "uuid"),
                                        "truncated": column("truncated", "text")})
    assert str(err.value) == 'column "embedding" is uuid, but an llmfdw embeddings table declares it vector'
    assert err.value.sqlstate == "42804"
    assert "ALTER COLUMN embedding TYPE vector" in err.value.hint
    assert 'column "truncated" is text' in err.value.detail
    with pytest.raises(errors.LlmError, match='column "max_tokens" is text, but .* declares it integer'):
        COMPLETIONS.check_column_types({"max_tokens": column("max_tokens", "text")})
    with pytest.raises(errors.LlmError, match='column "temperature" is real'):
        COMPLETIONS.check_column_types({"temperature": column("temperature", "real")})


def test_missing_required_column_names_it():
    with pytest.raises(errors.LlmError, match='needs a value for "prompt"'):
        KEYS.resolve([Qual("max_tokens", "=", 3)])


def test_unknown_option_is_an_error():
    with pytest.raises(errors.LlmError, match="unknown option 'colour'"):
        parse_options(EMBEDDINGS, {"address": "unix:///x", "colour": "blue"})


def test_options_come_from_the_declaration():
    conn, defaults = parse_options(COMPLETIONS, {"address": "unix:///x", "timeout": "5", "max_tokens": "7",
                                                 "default_temperature": "0.5", "default_max_tokens": "9"})
    assert conn == {"address": "unix:///x", "timeout": 5.0}
    assert defaults == {"max_tokens": 7, "temperature": 0.5}   # the table option wins over the server's
    # a server default meant for another table kind is not an error for this one
    assert parse_options(EMBEDDINGS, {"default_max_tokens": "9"})[1] == {}
    with pytest.raises(errors.LlmError, match="max_tokens must be an integer"):
        parse_options(COMPLETIONS, {"max_tokens": "lots"})
    with pytest.raises(errors.LlmError, match="timeout must be a positive"):
        parse_options(COMPLETIONS, {"timeout": "0"})


def test_table_options_are_checked_against_the_declaration():
    check_table_options({"table": "embeddings", "model": "m"})
    with pytest.raises(errors.LlmError, match="unknown llmfdw table kind 'embedding'"):
        check_table_options({"table": "embedding"})
    with pytest.raises(errors.LlmError, match="unknown option 'colour' for an llmfdw embeddings table"):
        check_table_options({"table": "embeddings", "colour": "blue"})


class FakeRpcError(grpc.RpcError):
    """The three methods of a failed call that error handling reads."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing=()) -> None:
        self._code, self._details, self._trailing = code, details, tuple(trailing)

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


def test_queue_full_is_recognised_only_with_the_sidecars_mark():
    full = FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "tenant is full",
                        [(errors.REJECTED_KEY, client.QUEUE_FULL)])
    assert client._queue_full(full)
    assert not client._queue_full(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "tenant is full"))
    assert not client._queue_full(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "x",
                                               [(errors.REJECTED_KEY, client.QUEUE_FULL)]))


@pytest.mark.parametrize("sizes, max_bytes, max_inputs, parts", [
    ([1, 1, 1], 10, 10, [(0, 3)]),                       # one request
    ([1] * 5, 100, 2, [(0, 2), (2, 4), (4, 5)]),         # by count
    ([4, 4, 4, 4], 8, 10, [(0, 2), (2, 4)]),             # by bytes, a part filled exactly
    ([3, 20, 3], 8, 10, [(0, 1), (1, 2), (2, 3)]),       # an input over the bytes alone
    ([20], 8, 10, [(0, 1)]),
])
def test_embed_parts_cover_the_inputs_in_order_within_both_bounds(sizes, max_bytes, max_inputs, parts):
    from llm_tables.tables import embed_parts

    assert embed_parts(["x" * n for n in sizes], max_bytes, max_inputs) == parts


def test_embed_parts_counts_utf8_bytes():
    from llm_tables.tables import embed_parts

    assert embed_parts(["é" * 3, "é" * 3], 8, 10) == [(0, 1), (1, 2)]   # 6 bytes each, not 3


def test_oversized_request_fails_before_sending():
    request = pb.EmbedRequest(model="m", inputs=["x" * (client.MAX_MESSAGE_BYTES + 1)])
    with pytest.raises(errors.LlmError, match="limited to 64 MiB") as err:
        client._check_size(request)
    assert err.value.sqlstate == errors.PROGRAM_LIMIT_EXCEEDED


@pytest.mark.parametrize("code, details, trailing, sqlstate, words", [
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", (),
     errors.FDW_UNABLE_TO_ESTABLISH_CONNECTION, ["not reachable"]),
    (grpc.StatusCode.UNAVAILABLE, "model 'x' is still loading; retry shortly",
     [(errors.UNAVAILABLE_KEY, "loading")], errors.CANNOT_CONNECT_NOW, ["still loading"]),
    (grpc.StatusCode.UNAVAILABLE, "the sidecar is shutting down and takes no new requests",
     [(errors.UNAVAILABLE_KEY, "draining")], errors.CANNOT_CONNECT_NOW, ["shutting down"]),
    (grpc.StatusCode.UNAVAILABLE, "model 'x': llama.cpp's process exited (status -9) while running this request; "
     "a new one is starting, retry shortly", [(errors.UNAVAILABLE_KEY, "restarting")], errors.CANNOT_CONNECT_NOW,
     ["exited (status -9)", "retry shortly"]),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (70000000 vs. 67108864)", (),
     errors.PROGRAM_LIMIT_EXCEEDED, ["too large"]),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "tenant 'x' already has 2 requests running",
     [(errors.REJECTED_KEY, client.QUEUE_FULL)], errors.TOO_MANY_CONNECTIONS, ["at its limit for this tenant"]),
    (grpc.StatusCode.INVALID_ARGUMENT, "stop strings must not be empty", (), errors.INVALID_PARAMETER_VALUE,
     ["stop strings"]),
])
def test_status_codes_become_sql_errors(code, details, trailing, sqlstate, words):
    err = errors.error_from_rpc(FakeRpcError(code, details, trailing), "unix:///run/sidecar.sock")
    assert err.sqlstate == sqlstate
    for word in words:
        assert word in str(err)
    if "not reachable" not in words:
        assert "not reachable" not in str(err)


def test_a_restarting_engine_tells_the_user_to_run_the_statement_again():
    err = errors.error_from_rpc(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "model 'x': ... exited",
                                             [(errors.UNAVAILABLE_KEY, "restarting")]), "unix:///s.sock")
    assert err.sqlstate == errors.CANNOT_CONNECT_NOW and "Run the statement again" in err.hint


# the sidecar's mark decides, never the message text (the proto's status contract)
@pytest.mark.parametrize("code, details, trailing, sqlstate, reachable", [
    # the message says "model ..." but without the mark it is gRPC's own UNAVAILABLE
    (grpc.StatusCode.UNAVAILABLE, "model 'x' is still loading", (), errors.FDW_UNABLE_TO_ESTABLISH_CONNECTION, False),
    (grpc.StatusCode.UNAVAILABLE, "anything", [("llmfdw-unavailable", "loading")], errors.CANNOT_CONNECT_NOW, True),
    (grpc.StatusCode.UNAVAILABLE, "anything", [("llmfdw-unavailable", "overloaded")], errors.CANNOT_CONNECT_NOW, True),
    (grpc.StatusCode.UNAVAILABLE, "x", [("llmfdw-rejected", "queue-full")], errors.FDW_UNABLE_TO_ESTABLISH_CONNECTION, False),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "tenant 'x' is full", [("llmfdw-rejected", "queue-full")],
     errors.TOO_MANY_CONNECTIONS, True),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (70000000 vs. 67108864)", (),
     errors.PROGRAM_LIMIT_EXCEEDED, True),
])
def test_the_mark_not_the_message_decides(code, details, trailing, sqlstate, reachable):
    err = errors.error_from_rpc(FakeRpcError(code, details, trailing), "unix:///run/sidecar.sock")
    assert err.sqlstate == sqlstate
    assert ("not reachable" not in str(err)) == reachable


def test_a_forked_child_gets_a_session_of_its_own():
    """Backends forked from a postmaster that preloaded llm_tables (llmfdw.preload_python) must
    not share their parent's session id: the sidecar's fairness is per session."""
    import os

    parent = client.session_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, client.session_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    os.close(read)
    assert child and child != parent
    assert client.session_id() == parent


def test_multicorn2_meeting_our_multicorn_module_is_told_what_to_set():
    import multicorn

    with pytest.raises(RuntimeError, match="llmfdw.preload_python = off"):
        multicorn.get_class("llm_tables.tables.SidecarTables")
