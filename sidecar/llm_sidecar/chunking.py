"""Splitting texts into chunks an embedding model reads whole (the Chunk RPC).

An embedding model reads at most its context of tokens and silently drops the
rest (Embed reports `truncated`).  Chunks counted in characters cannot promise
anything about tokens, so TOKENS mode counts with the model's own tokenizer:
each chunk spans at most `max_tokens` tokens (the special tokens the model adds
are not counted, they come on top), and neighbours share `overlap` tokens so a
sentence cut at a boundary is still seen whole by one of them.

Every chunk is an exact substring of its input, taken through the tokenizer's
offset mapping, so a caller can show it, search it with full-text search, or
find it in the source.  Chunks begin and end between words (the tokenizer's
word ids) unless one word is longer than a chunk: a piece that starts inside
a word tokenizes differently (WordPiece's "##ing" becomes "ing").  Each chunk
is tokenized again all the same and shortened until it really fits; its
`tokens` is that count, what the model will read.

CHARACTERS mode needs no model: chunks of at most `max_chars` characters, cut
at the most preferred separator that leaves a piece that fits.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

DEFAULT_SEPARATORS = ("\n\n", "\n", ". ", " ")
DEFAULT_MAX_CHARS = 1000


@dataclass(frozen=True)
class Chunk:
    seq: int
    text: str
    start: int   # input[start:end] == text
    end: int
    tokens: int


class TokenChunker:
    """A model's fast (Rust) tokenizer, copied with truncation and padding off so that calls
    from worker threads never change it (its encode_batch then runs without the GIL)."""

    def __init__(self, tokenizer: Any, context: int) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError("this model's tokenizer has no offset mapping (not a fast tokenizer): it cannot chunk")
        self._backend = copy.deepcopy(backend)
        self._backend.no_truncation()
        self._backend.no_padding()
        # what the model reads of a text: its context less the special tokens it adds ([CLS], [SEP])
        self.max_tokens = context - tokenizer.num_special_tokens_to_add(pair=False)

    def chunk(self, texts: Sequence[str], max_tokens: int, overlap: int) -> tuple[list[list[Chunk]], int]:
        """Each text's chunks, and the tokens read in all (for metering)."""
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        out, read = [], 0
        for text, enc in zip(texts, encodings):
            read += len(enc.offsets)
            out.append(self._split(text, enc.offsets, enc.word_ids, max_tokens, overlap))
        return out, read

    def count(self, text: str) -> int:
        return len(self._backend.encode(text, add_special_tokens=False).ids)

    def _split(self, text: str, offsets: list[tuple[int, int]], words: list[int | None], max_tokens: int,
               overlap: int) -> list[Chunk]:
        """Windows of max_tokens tokens, cut between words where a window holds more than one
        word (so a chunk re-tokenizes as it was counted), `overlap` tokens repeated."""
        spans = [(s, e, w) for (s, e), w in zip(offsets, words) if e > s]   # tokens that cover characters
        n = len(spans)
        # starts[i]: token i begins a word (or is the end of the text)
        starts = [i == 0 or spans[i][2] is None or spans[i][2] != spans[i - 1][2] for i in range(n)] + [True]
        chunks: list[Chunk] = []
        first = 0
        while first < n:
            last = min(first + max_tokens, n)
            cut = next((c for c in range(last, first, -1) if starts[c]), last)
            last = cut
            while True:
                start, end = spans[first][0], spans[last - 1][1]
                tokens = self.count(text[start:end])
                if tokens <= max_tokens or last - first == 1:
                    break
                last -= 1   # re-tokenized, the piece is longer (it starts inside a word): shorten it
            chunks.append(Chunk(len(chunks), text[start:end], start, end, tokens))
            if last == n:
                break
            first = max(first + 1, last - overlap)
            while first < last and not starts[first]:
                first += 1   # the overlap starts at a word
        return chunks


def character_chunks(text: str, max_chars: int, overlap: int, separators: Sequence[str]) -> list[Chunk]:
    """Chunks of at most max_chars characters, each cut just after the most preferred separator
    in its window (else hard at max_chars), surrounding whitespace left out; the next starts
    up to `overlap` characters before the cut, after a separator when one is there."""
    chunks: list[Chunk] = []
    start = done = 0   # done: where the text covered so far ends
    while done < len(text):
        while start < len(text) and text[start].isspace():
            start += 1
        if start >= len(text):
            break
        end = min(start + max_chars, len(text))
        if end < len(text):
            end = _cut(text, max(done, start) + 1, end, separators)   # past `done`: always progress
        piece_end = end
        while piece_end > start and text[piece_end - 1].isspace():
            piece_end -= 1
        chunks.append(Chunk(len(chunks), text[start:piece_end], start, piece_end, 0))
        done = end
        back = max(start + 1, end - overlap) if overlap else end
        if back < end:
            after = _cut(text, back, end, separators, earliest=True)
            back = after if after < end else back
        start = back
    return chunks


def _cut(text: str, low: int, high: int, separators: Sequence[str], earliest: bool = False) -> int:
    """Just after the last occurrence in text[low:high] of the most preferred separator that
    occurs there (with earliest: the first that ends before `high`); `high` when none does."""
    for sep in separators:
        at = text.find(sep, low, high - 1) if earliest else text.rfind(sep, low, high)
        if at >= low:
            return at + len(sep)
    return high
