"""llm.rerank: how relevant each document is to a query, by a cross-encoder (a rerank model).

One row per distinct document.  ``document = ANY(array)`` sends the whole array in one Rerank
request (in parts of at most RERANK_PART_DOCUMENTS documents and EMBED_PART_BYTES), and a join
(``ON r.document = d.body AND r.query = '...'``) goes through the batched path as llm.embeddings
does: one request per batch of outer rows.  llm.search (fdw/llmfdw--0.2.0--0.3.0.sql) reorders
its fused candidates by this score when given a rerank model.
"""
from __future__ import annotations

from typing import Any, Iterator

from multicorn import Qual

from llm_tables.declarations import RERANK
from llm_tables.tables import SidecarTable, embed_parts
from llm_inference.v1 import inference_pb2 as pb

# The sidecar's MAX_RERANK_DOCUMENTS: a longer list goes in several requests.
RERANK_PART_DOCUMENTS = 10_000


class RerankTable(SidecarTable):
    """One row per distinct document: its score against the query."""

    spec = RERANK

    def execute(self, quals: list[Qual], columns: set[str], **kwargs: Any) -> Iterator[dict[str, Any]]:
        resolved = self.resolve(quals)
        if resolved.empty:
            return
        model = self.model_for(resolved)
        query = resolved.one("query")
        documents = resolved.values["document"]
        for start, end in embed_parts(documents, max_inputs=RERANK_PART_DOCUMENTS):
            request = pb.RerankRequest(model=model, query=query, documents=documents[start:end],
                                       context=self.context())
            scores = self.client.rerank(request).scores
            for document, score in zip(documents[start:end], scores):
                yield {**self.echo(resolved, document=document), "model": model, "score": score}
