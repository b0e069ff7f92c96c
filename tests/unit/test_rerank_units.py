"""Reranking's pure logic: the engine's batches, the config and engine registry, llm.rerank's
declaration and how its rows pair each document with its score.  No Postgres, no sidecar, no model
(tests/test_rerank.py runs the real ones)."""
from __future__ import annotations

from collections import OrderedDict

import pytest

from llm_inference.v1 import inference_pb2 as pb
from llm_sidecar import engines
from llm_sidecar.config import ModelConfig
from llm_sidecar.engines.cross_encoder import CrossEncoderEngine, batches, first_of_type_one
from llm_tables import errors, tables  # noqa: F401  (tables first: it imports rerank once it is defined)
from llm_tables import rerank as rerank_table
from llm_tables.declarations import RERANK
from multicorn import ColumnDefinition, Qual

KEYS = RERANK.keys("llm.rerank")


@pytest.mark.parametrize("count, size, expected", [
    (0, 8, []), (1, 8, [(0, 1)]), (8, 8, [(0, 8)]), (12, 8, [(0, 8), (8, 12)]), (17, 8, [(0, 8), (8, 16), (16, 17)]),
])
def test_batches_cover_every_pair_in_order(count, size, expected):
    assert batches(count, size) == expected


def test_token_types_go_to_vllm_as_the_position_of_the_first_one():
    assert first_of_type_one([0, 0, 0, 1, 1]) == 3
    assert first_of_type_one([0, 0]) == 2


def test_a_rerank_model_config_builds_the_cross_encoder_engine():
    config = ModelConfig(name="r", task="rerank", engine="cross_encoder", source={"path": "/m"}, max_batch=16)
    assert isinstance(engines.build(config), CrossEncoderEngine)
    with pytest.raises(ValueError, match="engine cross_encoder cannot embed"):
        engines.build(ModelConfig(name="r", task="embed", engine="cross_encoder", source={"path": "/m"}))
    with pytest.raises(ValueError, match="engine sentence_transformers cannot rerank"):
        engines.build(ModelConfig(name="r", task="rerank", engine="sentence_transformers", source={"path": "/m"}))


def test_query_and_document_are_required_and_documents_distinct():
    with pytest.raises(errors.LlmError, match='needs a value for "query"'):
        KEYS.resolve([Qual("document", "=", "d")])
    with pytest.raises(errors.LlmError, match='needs a value for "document"'):
        KEYS.resolve([Qual("query", "=", "q")])
    resolved = KEYS.resolve([Qual("query", "=", "q"), Qual("document", ("=", True), ["b", None, "a", "b"])])
    assert resolved.values["document"] == ["b", "a"]


class FakeClient:
    """Answers each Rerank request with a score per document (its length), and keeps the requests."""

    def __init__(self) -> None:
        self.requests: list[pb.RerankRequest] = []

    def rerank(self, request: pb.RerankRequest) -> pb.RerankResponse:
        self.requests.append(request)
        return pb.RerankResponse(scores=[float(len(d)) for d in request.documents])


def test_rows_pair_each_document_with_its_score_across_parts(monkeypatch):
    monkeypatch.setattr(rerank_table, "RERANK_PART_DOCUMENTS", 2)
    columns = OrderedDict((c.name, ColumnDefinition(c.name)) for c in RERANK.columns)
    table = rerank_table.RerankTable({"address": "unix:///nowhere.sock", "table": "rerank", "model": "m"}, columns)
    table.client = FakeClient()
    documents = ["a", "bbb", "cc", "dddd", "e"]
    rows = list(table.execute([Qual("query", "=", "q"), Qual("document", ("=", True), documents)], set(columns)))
    assert [(r["document"], r["score"], r["query"], r["model"]) for r in rows] == \
        [(d, float(len(d)), "q", "m") for d in documents]
    assert [list(r.documents) for r in table.client.requests] == [["a", "bbb"], ["cc", "dddd"], ["e"]]
