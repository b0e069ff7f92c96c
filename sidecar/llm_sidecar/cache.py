"""The result cache: answers of deterministic requests, kept in memory and bounded in bytes.

A rerun of the same statement (a classification over a table at temperature 0, embeddings of
texts already embedded) then costs a lookup instead of the model's time.  Only answers that the
same request always gets are kept: every embedding, and a generation at temperature 0 (greedy)
or with a fixed seed (the servicer decides, see servicer._generation_key).

The key is a BLAKE2b digest of the tenant, the model, the model's revision (its weights' path,
size and modification time: a changed file makes new keys) and the whole request as serialized
protobuf minus its RequestContext: every field a request has, the generation parameters and the
constraints included, and any field added later, is part of it without a change here.  The
tenant being part of it, no tenant ever gets another's answer.  An embedding is kept per input
text (the request minus its inputs, plus the text), so a bulk request with a few new texts
computes only those.  Digests, not the requests, are kept: a 1 MB prompt costs 32 bytes of key.

Bounded by `cache.max_bytes` (the sidecar's YAML; 0 turns it off): each entry is charged its
digest, its value and ENTRY_OVERHEAD, and the least recently used entries go first.  It lives
in the sidecar's memory only: a restart (which is how models are reloaded) starts it empty.
Everything runs on the event loop, so no lock is needed.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from llm_sidecar import metrics
from llm_inference.v1 import inference_pb2 as pb

# What an entry costs beyond its digest and value: the dict slot, the key object, the value's
# object and its fields (measured with sys.getsizeof on CPython 3.11: 150-250 bytes).
ENTRY_OVERHEAD = 256
DIGEST_BYTES = 32
# A model's revision is looked up again at most this often (a directory of weights is walked).
REVISION_SECONDS = 1.0


@dataclass(frozen=True)
class CachedGeneration:
    """A finished generation: its whole text, why it ended, and its token counts."""
    text: str
    finish_reason: str
    input_tokens: int
    output_tokens: int

    def size(self) -> int:
        return len(self.text.encode()) + len(self.finish_reason)


@dataclass(frozen=True)
class CachedEmbedding:
    """One text's embedding as the engine returned it (not normalised: the request says)."""
    vector: np.ndarray   # float32, read-only
    input_tokens: int
    truncated: bool
    compute_ns = 0   # no engine time (a class attribute, as the engines' results carry it)

    def size(self) -> int:
        return self.vector.nbytes


class ResultCache:
    """Digest -> answer, least recently used first, at most max_bytes in all."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[bytes, tuple[CachedGeneration | CachedEmbedding, int]] = OrderedDict()
        self._revisions: dict[str, tuple[float, str]] = {}
        self._publish()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> CachedGeneration | CachedEmbedding | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: bytes, value: CachedGeneration | CachedEmbedding) -> None:
        """Keep `value`, evicting the least recently used entries until it fits; a value larger
        than the whole cache is not kept."""
        size = len(key) + value.size() + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        while self._entries and self.bytes + size > self.max_bytes:
            _, (_, freed) = self._entries.popitem(last=False)
            self.bytes -= freed
            metrics.CACHE_EVICTIONS.inc()
        self._entries[key] = (value, size)
        self.bytes += size
        self._publish()

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
        self._publish()

    def _publish(self) -> None:
        metrics.CACHE_BYTES.set(self.bytes)
        metrics.CACHE_ENTRIES.set(len(self._entries))

    def revision(self, path: str) -> str:
        """The weights' revision at `path`, looked up at most every REVISION_SECONDS."""
        now = time.monotonic()
        seen = self._revisions.get(path)
        if seen is None or now - seen[0] > REVISION_SECONDS:
            seen = (now, model_revision(path))
            self._revisions[path] = seen
        return seen[1]


def model_revision(path: str) -> str:
    """Something that changes when the model's files change: the path with the size and
    modification time of the file, or of every file under the directory."""
    try:
        if os.path.isdir(path):
            stamps = []
            for root, _, files in os.walk(path):
                for name in sorted(files):
                    st = os.stat(os.path.join(root, name))
                    stamps.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
            return f"{path}|" + hashlib.blake2b("|".join(stamps).encode(), digest_size=16).hexdigest()
        st = os.stat(path)
        return f"{path}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        return f"{path}|?"   # not a local file (a hub name, say): the path alone


def _digest(tenant: str, model: str, revision: str) -> "hashlib._Hash":
    """A hash that has read the key's fixed part; each part is length-prefixed, so no two
    different (tenant, model, revision) read the same bytes."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for part in (tenant, model, revision):
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h


def generation_key(tenant: str, revision: str, request: pb.GenerateRequest) -> bytes:
    """The key of a Generate request: every field but the context."""
    body = pb.GenerateRequest()
    body.CopyFrom(request)
    body.ClearField("context")
    body.params.SetInParent()   # an absent and an empty GenerationParams mean the same: serialize alike
    h = _digest(tenant, request.model, revision)
    h.update(b"generate")
    h.update(body.SerializeToString(deterministic=True))
    return h.digest()


def embedding_keys(tenant: str, revision: str, request: pb.EmbedRequest) -> list[bytes]:
    """One key per input of an Embed request: every field but the context, the inputs and
    `normalize` (applied to the cached vector on the way out), plus the input's text."""
    body = pb.EmbedRequest()
    body.CopyFrom(request)
    for name in ("context", "inputs", "normalize"):
        body.ClearField(name)
    head = _digest(tenant, request.model, revision)
    fixed = body.SerializeToString(deterministic=True)
    head.update(b"embed")
    head.update(len(fixed).to_bytes(8, "little"))   # so the text that follows cannot read as part of it
    head.update(fixed)
    keys = []
    for text in request.inputs:
        h = head.copy()
        h.update(text.encode("utf-8", "surrogatepass"))
        keys.append(h.digest())
    return keys
