"""The splitter behind the Chunk RPC (sidecar/llm_sidecar/chunking.py), on a WordPiece tokenizer built
here (no model): chunks are exact substrings, fit their token budget as re-tokenized, begin and end
between words, overlap as asked; character chunks cut at the preferred separator.  The same code
with the real model's tokenizer, through SQL: tests/test_vectorizer.py."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from llm_sidecar.chunking import DEFAULT_SEPARATORS, TokenChunker, character_chunks

WORDS = ["the", "light", "keeper", "counted", "ships", "in", "fog", "."]
PIECES = ["##house", "##s", "h", "##o", "##u", "##e"]


class FakeTokenizer:
    """What TokenChunker takes from a Hugging Face tokenizer: its Rust backend, its special tokens."""

    def __init__(self) -> None:
        vocab = {token: i for i, token in enumerate(["[UNK]"] + WORDS + PIECES)}
        self.backend_tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
        self.backend_tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 2


TEXT = " ".join(["the lighthouse keeper counted ships in the fog ."] * 6)


@pytest.mark.parametrize("size, overlap", [(3, 0), (5, 2), (8, 3), (40, 10)])
def test_token_chunks_are_substrings_that_fit_and_cover_the_text(size, overlap):
    chunker = TokenChunker(FakeTokenizer(), context=512)
    (chunks,), read = chunker.chunk([TEXT], size, overlap)
    assert read == chunker.count(TEXT)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert TEXT[c.start:c.end] == c.text and c.tokens == chunker.count(c.text) <= size
        assert not c.text.startswith("house")   # never starts inside "lighthouse"
    covered = set().union(*(range(c.start, c.end) for c in chunks))
    assert covered >= {i for i, ch in enumerate(TEXT) if not ch.isspace()}
    if overlap:
        assert any(b.start < a.end for a, b in zip(chunks, chunks[1:]))


def test_a_text_shorter_than_a_chunk_is_one_chunk_and_a_blank_one_none():
    chunker = TokenChunker(FakeTokenizer(), context=512)
    (one, none), _ = chunker.chunk(["the fog .", "   "], 10, 2)
    assert [(c.text, c.tokens) for c in one] == [("the fog .", 3)] and none == []
    assert chunker.max_tokens == 510


def test_character_chunks_cut_at_the_preferred_separator():
    text = "First paragraph, short.\n\nSecond paragraph. It has two sentences.\nAnd a line."
    chunks = character_chunks(text, 40, 0, DEFAULT_SEPARATORS)
    assert [c.text for c in chunks] == ["First paragraph, short.", "Second paragraph. It has two sentences.",
                                        "And a line."]
    assert all(text[c.start:c.end] == c.text for c in chunks)
    hard = character_chunks("x" * 95, 30, 5, DEFAULT_SEPARATORS)
    assert [len(c.text) for c in hard] == [30, 30, 30, 20] and hard[1].start == 25
