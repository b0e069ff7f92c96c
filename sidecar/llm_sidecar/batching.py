"""One batching policy for every embedding engine (sentence-transformers, vLLM).

Modelled on Hugging Face TEI's router queue (router/src/queue.rs): requests
wait in a queue, and a batch is taken from it under two budgets, at most
`max_batch` texts and at most `max_batch_tokens` padded tokens (texts times
the longest of them: what a padded forward pass really computes), so a few
long texts make a small batch and many short ones a full one.  A text longer
than the whole token budget still goes, alone.

Fairness between requests: a batch is filled round-robin, one text from each
waiting request in turn, and the next batch starts with the request after the
last one served.  A request of 100,000 texts therefore never holds a request
of 3 behind it: the 3 ride in the next batch (tests/test_embedding_batcher.py).

Length awareness (issue 11): each request's texts are taken in order of
token count (shortest first), so consecutive batches hold texts of similar
length and little of a batch is padding; with one request (the SQL bulk form,
`input = ANY(ARRAY(...))`) this is the same sort that
`SentenceTransformer.encode` does on its whole input.  Sorting happens within
the part of a request that is tokenized: large requests arrive in chunks
(`Request.extend`, CHUNK texts each) so that the first batch runs while the
rest is still being tokenized; each chunk is sorted on its own.

A text is tokenized once, on arrival (TokenIds: the engine's tokenizer, used
from worker threads), and the batch hands the model token ids: `Batch.arrays()` builds
the padded [texts, tokens] id and mask arrays with numpy gathers, no loop
over texts.  The ids of a text longer than the context are cut the way
Hugging Face tokenizers truncate a single sequence: the first
`context - tail` ids, then the `tail` closing special tokens ([SEP]).  Its
`input_tokens` is its full count (of the part kept by readable_part) and it is
reported as truncated.  Vectors come back as one float32 array per batch; each
result's vector is a row (a view) of it.

The queue itself (`Batcher.take`) is synchronous and needs no model, so the
policy is unit-tested on its own; `Batcher.next` adds the waiting (at most
`batch_wait_ms` for a batch that would not be full) and `Batcher.stream` a
request's lifetime (its results as batches finish; its untaken texts dropped
when the caller goes away).
"""
from __future__ import annotations

import asyncio
import copy
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable, Sequence

import numpy as np

from llm_sidecar import hops
from llm_sidecar.engines.base import EmbeddingResult, readable_part
from llm_sidecar.metering import Metered

Group = list[tuple[int, EmbeddingResult]]
# Texts tokenized per step for a large request: its first batch starts after the first chunk,
# while the next chunk is tokenized during that batch's compute.
CHUNK = 1024
# Requests of at most this many texts (the interactive one-row query) are tokenized on the event
# loop: tens of microseconds, less than handing them to a worker thread and back.
INLINE_TEXTS = 8


@dataclass
class Tokens:
    """Some texts as token ids, end to end in one array (see pack())."""
    flat: np.ndarray       # int64, every text's ids (full, not yet cut to the context)
    offsets: np.ndarray    # int64, where each text starts in flat
    counts: np.ndarray     # int64, each text's token count (what input_tokens reports)
    cut: np.ndarray        # bool, readable_part cut the text before tokenizing

    def __len__(self) -> int:
        return len(self.counts)


def pack(ids: Sequence[Sequence[int]], cut: Iterable[bool] | None = None) -> Tokens:
    """Token id lists (what a tokenizer returns) as one Tokens."""
    n = len(ids)
    counts = np.fromiter(map(len, ids), dtype=np.int64, count=n)
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(counts.sum()))
    offsets = np.zeros(n, dtype=np.int64)
    np.cumsum(counts[:-1], out=offsets[1:])
    cuts = np.zeros(n, dtype=bool) if cut is None else np.fromiter(cut, dtype=bool, count=n)
    return Tokens(flat, offsets, counts, cuts)


class TokenIds:
    """A Hugging Face tokenizer as a thread-safe function from texts to Tokens.  A fast
    tokenizer is used through a private copy of its Rust backend with truncation and padding
    off, never changed again (its encode_batch is then safe from several threads at once and
    runs without the GIL); a slow one through a copy per thread (a call sets its state while
    it runs)."""

    def __init__(self, tokenizer: Any, context: int) -> None:
        self.context = context
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self._backend = copy.deepcopy(backend)
            self._backend.no_truncation()
            self._backend.no_padding()
        else:
            self._backend = None
            self._pristine = copy.deepcopy(tokenizer)
            self._copying = threading.Lock()
            self._local = threading.local()
        self.tail = self._tail()

    def ids(self, texts: list[str], special: bool = True) -> list[list[int]]:
        if self._backend is not None:
            return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=special)]
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            with self._copying:
                tokenizer = self._local.tokenizer = copy.deepcopy(self._pristine)
        return tokenizer(texts, add_special_tokens=special, verbose=False)["input_ids"]

    def _tail(self) -> int:
        """How many special tokens the tokenizer closes a text with ([SEP] for BERT: 1): a text
        cut to the context keeps them, as the tokenizer's own truncation does."""
        bare, full = self.ids(["hello"], False)[0], self.ids(["hello"], True)[0]
        for head in range(len(full) - len(bare) + 1):
            if full[head:head + len(bare)] == bare:
                return len(full) - head - len(bare)
        return 0

    def __call__(self, texts: list[str]) -> Tokens:
        """The texts cut to what the model reads (engines/base.readable_part), as token ids."""
        readable = [readable_part(t, self.context) for t in texts]
        return pack(self.ids([t for t, _ in readable]), (cut for _, cut in readable))


def _concat(a: Tokens, b: Tokens) -> Tokens:
    return Tokens(np.concatenate([a.flat, b.flat]), np.concatenate([a.offsets, b.offsets + len(a.flat)]),
                  np.concatenate([a.counts, b.counts]), np.concatenate([a.cut, b.cut]))


@dataclass(eq=False)
class Request:
    """One Embed call's texts inside the batcher."""
    total: int                         # texts in the call (tokenized or not yet)
    usage: Metered
    arrived_ns: int = field(default_factory=time.monotonic_ns)
    tokens: Tokens | None = None       # the texts tokenized so far, in arrival order
    order: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))   # take order
    taken: int = 0                     # texts of `order` already handed to a batch
    started: bool = False              # a batch with its texts has started
    results: asyncio.Queue = field(default_factory=asyncio.Queue)   # Group or Exception
    inflight: set = field(default_factory=set)   # engine tasks computing its texts (cancelled if it leaves)
    marks: hops.Marks | None = None    # its call's per-hop timestamps (hops.py; None unless LLMFDW_HOPS=1)

    @property
    def ready(self) -> int:
        """Texts tokenized and not yet taken."""
        return len(self.order) - self.taken

    def extend(self, tokens: Tokens) -> None:
        """Append the next tokenized chunk of this request's texts (sorted by length in itself)."""
        base = 0 if self.tokens is None else len(self.tokens)
        self.tokens = tokens if self.tokens is None else _concat(self.tokens, tokens)
        self.order = np.concatenate([self.order, base + np.argsort(tokens.counts, kind="stable")])


@dataclass
class Batch:
    """Texts taken together: per request, the indices (into its texts) it contributes."""
    parts: list[tuple[Request, np.ndarray]]
    context: int
    tail: int                # closing special tokens kept at the end of a cut text

    @property
    def size(self) -> int:
        return sum(len(idx) for _, idx in self.parts)

    def lengths(self) -> np.ndarray:
        """Each text's ids as fed to the model (cut to the context), in batch order."""
        return np.concatenate([np.minimum(r.tokens.counts[idx], self.context) for r, idx in self.parts])

    @property
    def padded(self) -> int:
        """Tokens the padded forward pass computes (texts x the longest)."""
        lengths = self.lengths()
        return int(len(lengths) * lengths.max()) if len(lengths) else 0

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Padded input ids and attention mask, int64 [texts, longest]; a text longer than the
        context keeps its first context - tail ids and its last tail ids."""
        kept = self.lengths()
        width = max(1, int(kept.max()))
        j = np.arange(width, dtype=np.int64)[None, :]
        ids = np.empty((len(kept), width), dtype=np.int64)
        row = 0
        for request, idx in self.parts:
            t = request.tokens
            start, count = t.offsets[idx][:, None], t.counts[idx][:, None]
            keep = np.minimum(count, self.context)
            # positions in the last `tail` of a cut text read the text's own last ids
            shift = np.where((count > keep) & (j >= keep - self.tail), count - keep, 0)
            pos = np.clip(start + j + shift, 0, np.maximum(start + count - 1, 0))   # padding reads a valid id...
            ids[row:row + len(idx)] = t.flat[pos] if len(t.flat) else 0
            row += len(idx)
        mask = (j < kept[:, None]).astype(np.int64)
        ids *= mask                                               # ...then becomes 0 (BERT's [PAD])
        return ids, mask

    def id_lists(self) -> list[list[int]]:
        """Each text's ids as fed to the model, unpadded (for engines that take a list per text)."""
        ids, mask = self.arrays()
        return [row[:n] for row, n in zip(ids.tolist(), mask.sum(axis=1).tolist())]

    def start(self) -> None:
        """The engine starts on this batch: a request's queue time ends at its first batch."""
        now = time.monotonic_ns()
        for request, _ in self.parts:
            hops.mark(request.marks, "batch_formed")
            if not request.started:
                request.started = True
                request.usage.queue_ns += now - request.arrived_ns

    def results(self, request: Request, idx: np.ndarray, vectors: np.ndarray,
                compute_ns: int | Sequence[int]) -> Group:
        """(index, result) for the texts idx of request, their vectors being the rows of `vectors`,
        each charged compute_ns (one figure for all, or one per text)."""
        t = request.tokens
        counts = t.counts[idx]
        truncated = (t.cut[idx] | (counts > self.context)).tolist()
        compute = itertools.repeat(compute_ns) if isinstance(compute_ns, int) else compute_ns
        return [(i, EmbeddingResult(v, n, c, ns))
                for i, v, n, c, ns in zip(idx.tolist(), vectors, counts.tolist(), truncated, compute)]

    def deliver(self, vectors: np.ndarray, elapsed_ns: int) -> None:
        """Hand each request its texts' rows of `vectors` (batch order); the batch's time is
        shared equally among its texts."""
        share = elapsed_ns // max(1, self.size)
        row = 0
        for request, idx in self.parts:
            hops.mark(request.marks, "batch_delivered")
            request.results.put_nowait(self.results(request, idx, vectors[row:row + len(idx)], share))
            row += len(idx)

    def mark(self, name: str) -> None:
        """Hop `name` (hops.py) for every request in the batch."""
        if not hops.ENABLED:
            return
        for request, _ in self.parts:
            hops.mark(request.marks, name)

    def fail(self, err: BaseException) -> None:
        for request, _ in self.parts:
            request.results.put_nowait(err)


class Batcher:
    """The queue of requests waiting for an embedding engine, and the batch policy."""

    def __init__(self, *, max_batch: int, max_batch_tokens: int, context: int, wait_ms: float = 0.0,
                 tail: int = 1, depth: Any = None) -> None:
        self.max_batch, self.max_batch_tokens = max_batch, max_batch_tokens
        self.context, self.tail, self.wait = context, tail, wait_ms / 1000
        self._waiting: deque[Request] = deque()   # requests with tokenized texts not yet taken
        self._arrived = asyncio.Event()
        self._depth = depth                        # a metrics gauge of texts waiting (or None)

    # -- the queue (synchronous: unit-tested with no model) --

    def add(self, request: Request, tokens: Tokens) -> None:
        """Queue (more of) a request's texts."""
        request.extend(tokens)
        hops.mark(request.marks, "queued")
        if request not in self._waiting:
            self._waiting.append(request)
        if self._depth is not None:
            self._depth.inc(len(tokens))
        self._arrived.set()

    def drop(self, request: Request) -> None:
        """The caller left: its texts not yet taken are dropped."""
        if request in self._waiting:
            self._waiting.remove(request)
            if self._depth is not None:
                self._depth.dec(request.ready)

    def pending(self) -> int:
        return sum(r.ready for r in self._waiting)

    def take(self) -> Batch | None:
        """The next batch: round-robin over the waiting requests (one text each in turn, each
        request's texts shortest first) while the batch stays within max_batch texts and
        max_batch_tokens padded tokens.  The next batch starts with the request after the
        last one served here."""
        requests = list(self._waiting)
        if not requests:
            return None
        width = self.max_batch
        # candidates[r, k]: the padded length of request r's k-th next text (0: none)
        lengths = np.zeros((len(requests), width), dtype=np.int64)
        for r, request in enumerate(requests):
            nxt = request.order[request.taken:request.taken + width]
            lengths[r, :len(nxt)] = np.minimum(request.tokens.counts[nxt], self.context)
        # round-robin order: round k takes the k-th next text of each request still holding one
        which = np.broadcast_to(np.arange(len(requests))[:, None], lengths.shape).T.ravel()
        seq = lengths.T.ravel()
        keep = seq > 0
        which, seq = which[keep][:width], seq[keep][:width]
        padded = np.arange(1, len(seq) + 1) * np.maximum.accumulate(seq)
        over = np.flatnonzero(padded > self.max_batch_tokens)
        n = max(1, int(over[0]) if len(over) else len(seq))   # a text over the whole budget goes alone
        counts = np.bincount(which[:n], minlength=len(requests))
        parts = []
        for request, k in zip(requests, counts.tolist()):
            if k:
                parts.append((request, request.order[request.taken:request.taken + k]))
                request.taken += k
        # the request after the last one served goes first next time; drained requests leave
        last = int(which[n - 1])
        self._waiting = deque(r for r in requests[last + 1:] + requests[:last + 1] if r.ready)
        if self._depth is not None:
            self._depth.dec(n)
        return Batch(parts, self.context, self.tail)

    # -- waiting and request lifetimes (asyncio) --

    async def next(self) -> Batch:
        """Wait for texts and take a batch.  Texts that were waiting already (they came while the
        engine computed: it is busy) give a batch that would not be full up to wait_ms to fill;
        a text that wakes an idle engine goes at once, as TEI's router does: waiting would add
        wait_ms to every one-row query and batch nothing (texts that come while it computes
        make the next batch)."""
        while True:
            busy = bool(self._waiting)
            await self._arrived.wait()
            self._arrived.clear()
            if not self._waiting:
                continue
            deadline = time.monotonic() + (self.wait if busy else 0.0)
            while self.pending() < self.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                    self._arrived.clear()
                except asyncio.TimeoutError:
                    break
            batch = self.take()
            if self._waiting:
                self._arrived.set()   # more is waiting: the next batch need not wait for an arrival
            if batch is not None:
                return batch

    async def stream(self, request: Request, feed: AsyncIterator[Tokens] | None) -> AsyncIterator[Group]:
        """Queue a request's texts as `feed` tokenizes them (chunk by chunk), and yield its
        results as the batches holding them finish.  With no feed the request's texts are queued
        already (Batcher.add): its results are awaited with no feeder task beside them, one
        asyncio hand-off less per batch (the one-row query's path).  When the caller goes away,
        its untaken texts are dropped and the engine tasks computing its texts are cancelled."""
        async def feeding() -> None:
            async for tokens in feed:
                self.add(request, tokens)

        feeder = asyncio.create_task(feeding()) if feed is not None else None
        delivered = 0
        try:
            while delivered < request.total:
                if feeder is None or feeder.done():
                    if feeder is not None and feeder.exception() is not None:   # tokenizing failed
                        raise feeder.exception()
                    group = await request.results.get()
                else:
                    getter = asyncio.ensure_future(request.results.get())
                    await asyncio.wait({getter, feeder}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        continue
                    group = getter.result()
                if isinstance(group, BaseException):
                    raise group
                delivered += len(group)
                yield group
        finally:
            if feeder is not None:
                feeder.cancel()
            self.drop(request)
            for task in list(request.inflight):
                task.cancel()

    async def embed(self, texts: list[str], usage: Metered,
                    tokenize: Callable[[list[str]], Tokens]) -> AsyncIterator[Group]:
        """One caller's texts through the queue (what every embedding engine's embed() is):
        tokenized CHUNK texts at a time in a worker thread, so that the first batch runs while
        the rest is tokenized, and yielded as the batches holding them finish.  A request of at
        most INLINE_TEXTS texts is tokenized and queued here, on the event loop: a thread hop
        and a feeder task would cost more than the tokenizing."""
        request = Request(len(texts), usage, marks=hops.current())
        if len(texts) <= INLINE_TEXTS:
            self.add(request, tokenize(texts))
            stream = self.stream(request, None)
        else:
            async def feed() -> AsyncIterator[Tokens]:
                for start in range(0, len(texts), CHUNK):
                    yield await asyncio.to_thread(tokenize, texts[start:start + CHUNK])
            stream = self.stream(request, feed())
        try:
            async for group in stream:
                yield group
        finally:
            await stream.aclose()
