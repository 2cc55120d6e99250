"""Split long documents into chunks that fit the model's token limit, on Chinese sentence boundaries."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# A sentence ends after a run of end punctuation (`……`, `？！` are one boundary) together with the
# closing quotes and brackets that follow it (`可以退款。”` stays whole), or after a newline.
END_PUNCTUATION = "。！？；…!?;"
CLOSERS = "”’」』）)】〕〗〉》]}\"'"
SENTENCE_END = re.compile(f"[{re.escape(END_PUNCTUATION)}]+[{re.escape(CLOSERS)}]*|\n")
# The rule of text-rules version 1 (collections made before the rule above): a boundary after each
# end punctuation mark, closers moved to the next sentence. Kept so those collections chunk as before.
LEGACY_SENTENCE_END = re.compile(r"(?<=[。！？；…!?;])|(?<=\n)")

CountTokens = Callable[[Sequence[str]], list[int]]
SplitSentences = Callable[[str], list[str]]


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str
    start: int  # character offset of `text` in the document


def reassemble(chunks: Sequence[tuple[int, str]]) -> str:
    """The document from its (start, text) chunks, overlaps removed."""
    text = ""
    for start, piece in sorted(chunks):
        text = text[:start] + piece
    return text


def _canonical(value: Any) -> Any:
    # The API's metadata (a protobuf Struct) has only doubles: 1.0 there is 1 in a JSONL file.
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {key: _canonical(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_canonical(item) for item in value]
    return value


def content_hash(text: str, metadata: dict[str, Any] | None = None) -> str:
    """Identity of a document's content: same text and metadata, same hash, whichever way it came."""
    payload = json.dumps([text, _canonical(metadata or {})], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def split_sentences(text: str) -> list[str]:
    """Contiguous pieces that concatenate back to `text`, each ending at a sentence boundary."""
    pieces: list[str] = []
    start = 0
    for match in SENTENCE_END.finditer(text):
        pieces.append(text[start : match.end()])
        start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def split_sentences_legacy(text: str) -> list[str]:
    """Version-1 splitting, for collections chunked before the current rule."""
    return [piece for piece in LEGACY_SENTENCE_END.split(text) if piece]


class Chunker:
    """Greedy packing of whole sentences up to `max_tokens`, with `overlap_tokens` of the previous
    chunk's trailing sentences repeated at the start of the next; over-long sentences are cut."""

    def __init__(self, count_tokens: CountTokens, max_tokens: int, overlap_tokens: int = 0,
                 safety_margin: int = 8, split: SplitSentences = split_sentences) -> None:
        self._count = count_tokens
        self._split = split
        special = count_tokens([""])[0]  # [CLS] and [SEP]
        self.budget = max_tokens - special - safety_margin
        if self.budget <= 0:
            raise ValueError(f"max_tokens {max_tokens} leaves no room for text")
        if not 0 <= overlap_tokens < self.budget:
            raise ValueError(f"overlap must be between 0 and {self.budget - 1} tokens")
        self.overlap_tokens = overlap_tokens
        self._special = special

    def _tokens(self, pieces: Sequence[str]) -> list[int]:
        return [n - self._special for n in self._count(pieces)]

    def chunk(self, text: str) -> list[Chunk]:
        if self._tokens([text])[0] <= self.budget:
            return [Chunk(0, text, 0)]
        # (text, tokens, start offset) of contiguous pieces that each fit the budget
        pieces: list[tuple[str, int, int]] = []
        position = 0
        sentences = self._split(text)
        for sentence, tokens in zip(sentences, self._tokens(sentences), strict=True):
            for piece, piece_tokens in [(sentence, tokens)] if tokens <= self.budget else self._cut(sentence, tokens):
                pieces.append((piece, piece_tokens, position))
                position += len(piece)
        groups: list[list[tuple[str, int, int]]] = []
        current: list[tuple[str, int, int]] = []
        used = 0
        for entry in pieces:
            if current and used + entry[1] > self.budget:
                groups.append(current)
                current = self._overlap_tail(current, room=self.budget - entry[1])
                used = sum(p[1] for p in current)
            current.append(entry)
            used += entry[1]
        if current:
            groups.append(current)
        return [Chunk(i, "".join(p[0] for p in group), group[0][2]) for i, group in enumerate(groups)]

    def _overlap_tail(self, previous: list[tuple[str, int, int]], room: int) -> list[tuple[str, int, int]]:
        tail: list[tuple[str, int, int]] = []
        used = 0
        for piece in reversed(previous):
            if used + piece[1] > min(self.overlap_tokens, room):
                break
            tail.insert(0, piece)
            used += piece[1]
        return tail

    def _cut(self, sentence: str, tokens: int) -> list[tuple[str, int]]:
        """Cut a sentence longer than the budget into pieces that fit, by characters."""
        out: list[tuple[str, int]] = []
        rest = sentence
        while rest:
            size = max(1, len(rest) * self.budget // max(tokens, 1))
            piece = rest[:size]
            piece_tokens = self._tokens([piece])[0]
            while piece_tokens > self.budget and size > 1:
                size = max(1, size * 3 // 4)
                piece = rest[:size]
                piece_tokens = self._tokens([piece])[0]
            out.append((piece, piece_tokens))
            rest = rest[size:]
            tokens = self._tokens([rest])[0] if rest else 0
        return out
