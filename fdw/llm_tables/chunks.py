"""llm.chunks: texts split into pieces an embedding model reads whole.

One row per chunk.  ``input = ANY(array)`` sends the whole array to the sidecar
(Chunk RPC, in parts of at most EMBED_PART_BYTES), which counts tokens with the
model's own tokenizer, so a chunk embedded with that model is never truncated
(the vectorizer, fdw/llmfdw--0.2.0--0.3.0.sql, chunks and embeds this way).
Each chunk is an exact substring of its input.
"""
from __future__ import annotations

from typing import Any, Iterator

from multicorn import Qual

from llm_tables.declarations import CHUNKS
from llm_tables.tables import SidecarTable, embed_parts
from llm_inference.v1 import inference_pb2 as pb

_MODES = {"tokens": pb.CHUNK_MODE_TOKENS, "characters": pb.CHUNK_MODE_CHARACTERS}
# request column -> ChunkRequest field it sets when given (else the sidecar's default)
_SIZES = ("max_tokens", "overlap_tokens", "max_chars", "overlap_chars")


class ChunksTable(SidecarTable):
    """One row per chunk of each distinct input."""

    spec = CHUNKS

    def get_rel_size(self, quals: list[Qual], columns: set[str]) -> tuple[float, int]:
        rows, width = super().get_rel_size(quals, columns)
        return (rows * 4, width)   # a few chunks per input

    def execute(self, quals: list[Qual], columns: set[str], **kwargs: Any) -> Iterator[dict[str, Any]]:
        resolved = self.resolve(quals)
        if resolved.empty:
            return
        model = self.model_for(resolved)
        inputs = resolved.values["input"]
        template = pb.ChunkRequest(model=model, mode=_MODES[self.param(resolved, "mode") or "tokens"])
        for name in _SIZES:
            value = self.param(resolved, name)
            if value is not None:
                setattr(template, name, value)
        separators = resolved.one("separators")
        if separators:
            template.separators.extend(separators if isinstance(separators, list) else [separators])
        for start, end in embed_parts(inputs):
            request = pb.ChunkRequest()
            request.CopyFrom(template)
            request.inputs.extend(inputs[start:end])
            request.context.CopyFrom(self.context())
            for result in self.client.chunk(request).results:
                echoed = self.echo(resolved, input=inputs[start + result.index])
                for c in result.chunks:
                    yield {**echoed, "model": model, "chunk_seq": c.chunk_seq, "chunk": c.text,
                           "tokens": c.tokens if template.mode == pb.CHUNK_MODE_TOKENS else None}
