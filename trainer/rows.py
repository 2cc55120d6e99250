"""FlagEmbedding's training-row contract, read and written with line-numbered errors.

One JSON object a line: `{query, pos[], neg[], pos_scores[], neg_scores[]}` (scores optional and, when
present, aligned one-to-one with `pos`/`neg`). Optional extras the trainer understands: `group`
(intent id, for splits), `query_id`, `pos_ids[]`, `neg_ids[]` (corpus ids, for mining). Chinese is
written as UTF-8, never as \\u escapes, so the files stay greppable and diffable.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from semsearch.errors import InvalidInputError

MAX_REPORTED_ERRORS = 10
_SPACES = re.compile(r"\s+")


class RowError(InvalidInputError):
    """Bad input rows, each named by file and line."""

    def __init__(self, path: Path | str, problems: Sequence[tuple[int, str]], total: int | None = None) -> None:
        self.path = str(path)
        self.problems = list(problems)
        total = total if total is not None else len(self.problems)
        lines = [f"{self.path}:{line}: {reason}" for line, reason in self.problems[:MAX_REPORTED_ERRORS]]
        if total > MAX_REPORTED_ERRORS:
            lines.append(f"... and {total - MAX_REPORTED_ERRORS} more bad rows in {self.path}")
        super().__init__("\n".join(lines))


def normalize_text(text: str) -> str:
    """The identity of a text for dedup and positive checks: NFKC (full-width ASCII folds), trimmed,
    inner whitespace collapsed. Case is kept: models here are cased or lowercase on their own."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text)).strip()


class TrainRow(BaseModel):
    model_config = ConfigDict(extra="allow")

    query: str = Field(min_length=1)
    pos: list[str] = Field(min_length=1)
    neg: list[str] = Field(default_factory=list)
    pos_scores: list[float] | None = None
    neg_scores: list[float] | None = None
    group: str | None = None
    query_id: str | None = None
    pos_ids: list[str] | None = None
    neg_ids: list[str] | None = None

    @field_validator("query")
    @classmethod
    def _query_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("query is blank")
        return value

    @field_validator("pos", "neg")
    @classmethod
    def _texts_not_blank(cls, value: list[str]) -> list[str]:
        for i, text in enumerate(value):
            if not text.strip():
                raise ValueError(f"item {i} is blank")
        return value

    @model_validator(mode="after")
    def _aligned(self) -> TrainRow:
        for texts, other, name in (
            (self.pos, self.pos_scores, "pos_scores"),
            (self.neg, self.neg_scores, "neg_scores"),
            (self.pos, self.pos_ids, "pos_ids"),
            (self.neg, self.neg_ids, "neg_ids"),
        ):
            if other is not None and len(other) != len(texts):
                field = name.split("_")[0]
                raise ValueError(f"{name} has {len(other)} items but {field} has {len(texts)}")
        return self

    def to_json(self, *, contract_only: bool = False) -> str:
        data = self.model_dump(exclude_none=True)
        if contract_only:
            data = {k: data[k] for k in ("query", "pos", "neg", "pos_scores", "neg_scores") if k in data}
        return json.dumps(data, ensure_ascii=False)

    def without_scores(self) -> TrainRow:
        return self.model_copy(update={"pos_scores": None, "neg_scores": None})


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def iter_jsonl(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, stripped line) of every non-empty line."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if line:
                yield number, line


def read_rows(path: Path | str, *, require_neg: bool = False, require_scores: bool = False) -> list[TrainRow]:
    """All rows of a JSONL file; every bad row is reported with its line number in one RowError."""
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(f"training data not found: {path}")
    rows: list[TrainRow] = []
    problems: list[tuple[int, str]] = []
    for number, line in iter_jsonl(path):
        try:
            data: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append((number, f"not JSON ({exc.msg})"))
            continue
        if not isinstance(data, dict):
            problems.append((number, "not a JSON object"))
            continue
        try:
            row = TrainRow.model_validate(data)
        except ValidationError as exc:
            problems.append((number, _describe(exc)))
            continue
        if require_neg and not row.neg:
            problems.append((number, "neg is empty (mine hard negatives first)"))
            continue
        if require_scores and (row.pos_scores is None or row.neg_scores is None):
            problems.append(
                (
                    number,
                    "pos_scores/neg_scores missing (run `semsearch train score`, or turn off distillation)",
                )
            )
            continue
        rows.append(row)
    if problems:
        raise RowError(path, problems)
    return rows


def write_rows(path: Path | str, rows: Iterable[TrainRow], *, contract_only: bool = False) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(row.to_json(contract_only=contract_only) + "\n")
            count += 1
    return count


def file_hash(paths: Sequence[Path | str]) -> str:
    """Content hash of data files (order matters): what a model manifest's `data_hash` refers to."""
    digest = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:16]


def distinct_texts(texts: Iterable[str]) -> list[str]:
    """First occurrence of each normalized text, in input order."""
    seen: set[str] = set()
    out: list[str] = []
    for text in texts:
        key = normalize_text(text)
        if key and key not in seen:
            seen.add(key)
            out.append(text)
    return out


def candidate_texts(rows: Iterable[TrainRow]) -> list[str]:
    """Every pos and neg text of the rows, deduplicated: the default candidate pool."""
    return distinct_texts(text for row in rows for text in (*row.pos, *row.neg))
