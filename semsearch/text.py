"""Text rules: how text is normalised and split into sentences before it is chunked and embedded.

The same rules apply to a collection's documents and to the queries searched against it, so they
are versioned and each collection records the version it was written with (collection property
`semsearch.text_rules`, next to the model record). Changing them changes chunks and vectors: a new
version means a new collection, never a silent mix in an old one.

- version 1 (legacy; collections without the record): text as given, a boundary after each end
  punctuation mark.
- version 2: `normalize` below; runs of end punctuation with their closing quotes and brackets are
  one boundary (`semsearch.chunking.split_sentences`). No Unicode normalisation form (NFKC): on the
  BQ retrieval task it had no consistent effect (MRR@10 -2.5% and +2.0% on two samples) while
  rewriting full-width Chinese punctuation (`，` → `,`) in a third of the texts (bench/RESULTS.md,
  "Text normalisation").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from semsearch.chunking import SplitSentences, split_sentences, split_sentences_legacy

# Control (Cc) characters other than tab and newline, and format (Cf) characters, of Unicode 14:
# zero-width space/non-joiner/joiner (U+200B-D), word joiner (U+2060), BOM (U+FEFF), soft hyphen,
# bidi marks... BERT tokenizers drop all of them before embedding, so removing them changes no
# vector, only what is stored and what a query must match. Written out rather than read from
# `unicodedata`, so that the rules do not change with the Python version.
INVISIBLE_RANGES = (
    (0x0000, 0x0008), (0x000B, 0x001F), (0x007F, 0x009F), (0x00AD, 0x00AD), (0x0600, 0x0605),
    (0x061C, 0x061C), (0x06DD, 0x06DD), (0x070F, 0x070F), (0x0890, 0x0891), (0x08E2, 0x08E2),
    (0x180E, 0x180E), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x2064), (0x2066, 0x206F),
    (0xFEFF, 0xFEFF), (0xFFF9, 0xFFFB), (0x110BD, 0x110BD), (0x110CD, 0x110CD), (0x13430, 0x13438),
    (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0001, 0xE0001), (0xE0020, 0xE007F),
)
_REMOVE: dict[int, None] = {code: None for first, last in INVISIBLE_RANGES for code in range(first, last + 1)}


def normalize(text: str) -> str:
    """Version-2 normalisation: CR LF and lone CR become LF; invisible characters are removed."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.translate(_REMOVE)


def _as_given(text: str) -> str:
    return text


@dataclass(frozen=True)
class TextRules:
    version: str
    normalize: Callable[[str], str]
    split_sentences: SplitSentences


LEGACY_TEXT_RULES = TextRules("1", _as_given, split_sentences_legacy)
TEXT_RULES = TextRules("2", normalize, split_sentences)  # what new collections are written with
KNOWN_TEXT_RULES = {rules.version: rules for rules in (LEGACY_TEXT_RULES, TEXT_RULES)}
