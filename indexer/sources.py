"""Input files to documents: JSONL (also stdin), CSV/TSV and Parquet, streamed record by record,
and document files (Markdown, text, HTML, PDF, Word), one document each (indexer/documents.py).

Every record gets a `Position` (file, records consumed, byte offset, line): the checkpoint stores
the position after the last durably written batch, and a resumed job starts reading there.
A record becomes a `SourceDoc` or a `Reject` (with file, line and reason); bad rows never raise.
A document file's id is its path relative to the root it was found under (the directory given,
or the directory of a file given), so it stays the same across runs.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

import structlog

from semsearch.ingest import IngestError, check_id, check_metadata, check_text

log = structlog.get_logger(__name__)

Format = Literal["jsonl", "csv", "tsv", "parquet", "markdown", "text", "html", "pdf", "docx"]
STDIN = "-"
PARQUET_READ_ROWS = 1024

_SUFFIXES: dict[str, Format] = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet",
    ".md": "markdown", ".markdown": "markdown", ".txt": "text", ".html": "html", ".htm": "html",
    ".xhtml": "html", ".pdf": "pdf", ".docx": "docx",
}
# One document per file (indexer/documents.py); the others hold one document per record.
DOCUMENT_FORMATS: frozenset[str] = frozenset({"markdown", "text", "html", "pdf", "docx"})


class InputError(Exception):
    """The input as a whole cannot be read as asked (missing file, unknown format, no text column)."""


@dataclass(frozen=True)
class FieldMap:
    """Which source fields make a document."""

    id: str = "id"
    text: str = "text"
    title: str | None = "title"
    metadata: tuple[str, ...] = ()  # copied into metadata under their own name
    metadata_object: str | None = "metadata"  # a JSON object whose keys are merged into metadata

    def columns(self) -> list[str]:
        names = [self.id, self.text, self.title, self.metadata_object, *self.metadata]
        return list(dict.fromkeys(name for name in names if name))


@dataclass(frozen=True)
class Limits:
    max_metadata_bytes: int = 16384
    max_doc_chars: int = 1_000_000


@dataclass(frozen=True)
class SourceFile:
    path: str  # absolute path, or "-" for stdin
    format: Format
    size: int  # bytes; 0 when unknown (stdin)
    mtime_ns: int = 0
    root: str = ""  # document files: the directory their id is relative to (absolute)

    @property
    def display(self) -> str:
        return "<stdin>" if self.path == STDIN else self.path

    @property
    def seekable(self) -> bool:
        return self.path != STDIN and not self.path.endswith(".gz")

    def fingerprint(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "size": self.size, "mtime_ns": self.mtime_ns}

    @property
    def relative(self) -> str:
        """The path below its root, with "/" on every system: a document file's id."""
        return Path(self.path).relative_to(self.root).as_posix() if self.root else Path(self.path).name


@dataclass(frozen=True, order=True)
class Position:
    """Where reading stands: `ordinal` records of file `file_index` consumed, ending at byte `offset`
    (line `line`); files before `file_index` are finished."""

    file_index: int = 0
    ordinal: int = 0
    offset: int = 0
    line: int = 0

    def to_json(self) -> dict[str, int]:
        return {"file_index": self.file_index, "ordinal": self.ordinal, "offset": self.offset, "line": self.line}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Position:
        return cls(int(data["file_index"]), int(data["ordinal"]), int(data["offset"]), int(data["line"]))


@dataclass(frozen=True)
class SourceDoc:
    doc_id: str
    text: str
    metadata: dict[str, Any]
    file: str
    line: int
    position: Position
    page_starts: tuple[int, ...] = ()  # PDF: where each page starts in `text` (chunks cite their page)
    unhashed: tuple[str, ...] = ()  # metadata keys the content hash leaves out (a file's `modified`)


@dataclass(frozen=True)
class Reject:
    file: str
    line: int
    kind: str  # short machine-readable reason, summarized in the final report
    reason: str
    raw: str = ""
    doc_id: str | None = None  # when the row had a usable id: --prune keeps that document
    position: Position = field(default_factory=Position)

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "kind": self.kind, "reason": self.reason,
                "id": self.doc_id, "raw": self.raw}


Record = SourceDoc | Reject


class RowError(Exception):
    def __init__(self, kind: str, reason: str, doc_id: str | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.doc_id = doc_id


# ---------------------------------------------------------------------------------------- discovery
@dataclass
class Discovery:
    files: list[SourceFile]
    unsupported: Counter[str] = field(default_factory=Counter)  # extension -> files skipped

    def unsupported_note(self) -> str | None:
        """The skipped files, once per extension: `skipped 3 files of unsupported types: .png (2), .zip (1)`."""
        if not self.unsupported:
            return None
        listing = ", ".join(f"{ext} ({count})" for ext, count in sorted(self.unsupported.items()))
        total = sum(self.unsupported.values())
        return f"skipped {total} file{'s' if total != 1 else ''} of unsupported types: {listing}"


def format_for(path: str, forced: str | None) -> Format | None:
    if forced and forced != "auto":
        return forced  # type: ignore[return-value]
    lowered = path.lower()
    name = lowered.removesuffix(".gz")
    for suffix, fmt in _SUFFIXES.items():
        if name.endswith(suffix):
            return None if fmt in DOCUMENT_FORMATS and lowered.endswith(".gz") else fmt
    return None


def _extension(path: Path) -> str:
    return path.suffix.lower() or "(no extension)"


def path_filter(include: Sequence[str] = (), exclude: Sequence[str] = ()) -> Any:
    """Whether a path below a root (with "/") is wanted: it matches an --include pattern (when there
    are any) and no --exclude pattern; patterns are .gitignore's (`*.md`, `drafts/`, `docs/**/*.pdf`)."""
    import pathspec

    included = pathspec.PathSpec.from_lines("gitwildmatch", include) if include else None
    excluded = pathspec.PathSpec.from_lines("gitwildmatch", exclude) if exclude else None

    def wanted(relative: str) -> bool:
        return (included is None or included.match_file(relative)) and not (
            excluded is not None and excluded.match_file(relative))

    return wanted


def _directory_files(directory: Path, wanted: Any) -> list[Path]:
    """Files below `directory` (relative paths), sorted; hidden files and folders (.git, .DS_Store) left out."""
    found = []
    for path in directory.rglob("*"):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if wanted(relative.as_posix()):
            found.append(relative)
    return sorted(found)


def _source_file(path: Path, fmt: Format, root: Path) -> SourceFile:
    if fmt == "parquet" and path.name.endswith(".gz"):
        raise InputError(f"{path}: gzip-compressed Parquet is not supported")
    stat = path.stat()
    return SourceFile(str(path), fmt, stat.st_size, stat.st_mtime_ns, str(root) if fmt in DOCUMENT_FORMATS else "")


def find_inputs(inputs: Sequence[str], forced_format: str | None = None, include: Sequence[str] = (),
                exclude: Sequence[str] = ()) -> Discovery:
    """The files to read, in a fixed order (arguments in order, each directory's files sorted), and
    the files skipped because their type is not supported (reported once per extension)."""
    found = Discovery([])
    wanted = path_filter(include, exclude)
    for item in inputs:
        if item == STDIN:
            if forced_format not in (None, "auto", "jsonl"):
                raise InputError("stdin ('-') is read as JSONL only")
            found.files.append(SourceFile(STDIN, "jsonl", 0))
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            root = path.resolve()  # the files keep their path below it: a link inside stays a file of the root
            candidates = [root / relative for relative in _directory_files(path, wanted)]
        elif path.is_file():
            root, candidates = path.resolve().parent, [path.resolve()]
        else:
            raise InputError(f"{item}: no such file or directory")
        readable = 0
        for candidate in candidates:
            # In a folder the extension picks the files (--format then says how to read them); a file
            # named on the command line is read as --format says.
            known = format_for(candidate.name, None) if path.is_dir() else candidate
            fmt = format_for(candidate.name, forced_format) if known else None
            if fmt is None:
                found.unsupported[_extension(candidate)] += 1
                continue
            found.files.append(_source_file(candidate, fmt, root))
            readable += 1
        if path.is_dir() and not readable:
            skipped = f" ({found.unsupported_note()})" if found.unsupported else ""
            raise InputError(f"{path}: no files to index in this directory{skipped}; supported: "
                             f"{' '.join(sorted(_SUFFIXES))}")
    if not found.files and found.unsupported:
        raise InputError(f"nothing to index: {found.unsupported_note()} (use --format to read them as one)")
    return found


def discover(inputs: Sequence[str], forced_format: str | None = None, include: Sequence[str] = (),
             exclude: Sequence[str] = ()) -> list[SourceFile]:
    return find_inputs(inputs, forced_format, include, exclude).files


# ---------------------------------------------------------------------------------------- mapping
def derived_id(text: str) -> str:
    """A stable id for a document that has none: the same text always gets the same id."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def shard_of(key: str, shards: int) -> int:
    """Stable across processes and machines (unlike hash())."""
    if shards <= 1:
        return 0
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def _undecodable(value: str) -> bool:
    """Bytes that were not UTF-8, kept as lone surrogates by the "surrogateescape" decoding."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def _check_id(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RowError("bad_id", f"id must be a string or an integer, got {type(value).__name__}")
    try:
        return check_id(str(value), "id")  # the service API's rules (semsearch/ingest.py)
    except IngestError as exc:
        raise RowError(exc.kind, exc.reason) from exc


def _metadata(raw: Mapping[str, Any], fields: FieldMap, limits: Limits, doc_id: str | None) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    if fields.metadata_object and _present(raw.get(fields.metadata_object)):
        value = raw[fields.metadata_object]
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = None
        if not isinstance(value, dict):
            raise RowError("bad_metadata", f"field {fields.metadata_object!r} is not a JSON object", doc_id)
        metadata.update(value)
    for name in fields.metadata:
        if name in raw and raw[name] is not None:
            metadata[name] = raw[name]
    try:
        # The service API's rules (semsearch/ingest.py); Parquet dates/decimals become strings.
        return check_metadata(metadata, limits.max_metadata_bytes)
    except IngestError as exc:
        raise RowError(exc.kind, exc.reason, doc_id) from exc


def to_document(raw: Mapping[str, Any], fields: FieldMap, limits: Limits) -> tuple[str, str, dict[str, Any]]:
    """(doc_id, text, metadata) from one source record, or RowError."""
    doc_id: str | None = _check_id(raw[fields.id]) if _present(raw.get(fields.id)) else None
    text = raw.get(fields.text)
    if not _present(text):
        raise RowError("missing_text", f"missing or empty text field {fields.text!r}", doc_id)
    if not isinstance(text, str):
        raise RowError("missing_text", f"text field {fields.text!r} is a {type(text).__name__}, not a string",
                       doc_id)
    metadata = _metadata(raw, fields, limits, doc_id)
    title = raw.get(fields.title) if fields.title else None
    if _present(title):
        # The title is part of what is embedded and stored (and kept in metadata for display).
        title = str(title).strip()
        text = f"{title}\n{text}"
        metadata.setdefault("title", title)
    try:
        check_text(text, limits.max_doc_chars)  # normalised when planned, by the collection's rules
    except IngestError as exc:
        raise RowError(exc.kind, exc.reason, doc_id) from exc
    return doc_id or derived_id(text), text, metadata


def _record(raw: Mapping[str, Any], fields: FieldMap, limits: Limits, file: str, line: int,
            position: Position, raw_text: str) -> Record:
    try:
        doc_id, text, metadata = to_document(raw, fields, limits)
    except RowError as exc:
        return Reject(file, line, exc.kind, exc.reason, raw_text[:500], exc.doc_id, position)
    return SourceDoc(doc_id, text, metadata, file, line, position)


# ---------------------------------------------------------------------------------------- readers
class _ByteCounter:
    """Counts bytes consumed from a (possibly compressed) file, for positions and progress."""

    def __init__(self, raw: IO[bytes], compressed: bool) -> None:
        self.raw = raw
        self.stream: IO[bytes] = gzip.GzipFile(fileobj=raw) if compressed else raw  # type: ignore[assignment]
        self.compressed = compressed

    def disk_offset(self, logical: int) -> int:
        # For gzip the resume offset is never used for seeking; progress wants compressed bytes read.
        return self.raw.tell() if self.compressed else logical


def _open(source: SourceFile) -> _ByteCounter:
    if source.path == STDIN:
        return _ByteCounter(sys.stdin.buffer, compressed=False)
    return _ByteCounter(open(source.path, "rb"), compressed=source.path.endswith(".gz"))


def read_file(source: SourceFile, file_index: int, fields: FieldMap, limits: Limits,
              start: Position | None = None) -> Iterator[Record]:
    """Records of one file after `start` (a position in this file), each with its position."""
    if start is not None and start.file_index != file_index:
        start = None
    if source.format in DOCUMENT_FORMATS:
        if start is None or start.ordinal == 0:  # one record per file: done or not
            yield read_document(source, file_index, limits)
    elif source.format == "jsonl":
        yield from _read_jsonl(source, file_index, fields, limits, start)
    elif source.format in ("csv", "tsv"):
        yield from _read_csv(source, file_index, fields, limits, start)
    else:
        yield from _read_parquet(source, file_index, fields, limits, start)


def _read_jsonl(source: SourceFile, file_index: int, fields: FieldMap, limits: Limits,
                start: Position | None) -> Iterator[Record]:
    handle = _open(source)
    try:
        stream = handle.stream
        offset = line_no = 0
        if start is not None and start.ordinal:
            if source.seekable:
                stream.seek(start.offset)
                offset, line_no = start.offset, start.ordinal
            else:  # stdin and gzip: skip the records already done
                while line_no < start.ordinal and (line := stream.readline()):
                    line_no += 1
                    offset += len(line)
        for line in stream:
            line_no += 1
            offset += len(line)
            position = Position(file_index, line_no, handle.disk_offset(offset), line_no)
            if not line.strip():
                continue
            try:
                decoded = line.decode("utf-8")
                if line_no == 1:
                    decoded = decoded.removeprefix("\ufeff")
            except UnicodeDecodeError as exc:
                yield Reject(source.display, line_no, "not_utf8",
                             f"not valid UTF-8 ({exc.reason} at byte {exc.start})",
                             line[:500].decode("utf-8", "replace"), None, position)
                continue
            try:
                raw = json.loads(decoded)
            except json.JSONDecodeError as exc:
                yield Reject(source.display, line_no, "invalid_json", f"invalid JSON: {exc.msg} at column {exc.colno}",
                             decoded[:500], None, position)
                continue
            if not isinstance(raw, dict):
                yield Reject(source.display, line_no, "invalid_json",
                             f"a line must be a JSON object, got {type(raw).__name__}", decoded[:500], None, position)
                continue
            yield _record(raw, fields, limits, source.display, line_no, position, decoded)
    finally:
        if source.path != STDIN:
            handle.raw.close()


def _read_csv(source: SourceFile, file_index: int, fields: FieldMap, limits: Limits,
              start: Position | None) -> Iterator[Record]:
    csv.field_size_limit(max(limits.max_doc_chars * 2, 1 << 20))
    handle = _open(source)
    state = {"offset": 0}

    def lines() -> Iterator[str]:
        for raw_line in handle.stream:
            state["offset"] += len(raw_line)
            # Bad bytes survive as lone surrogates, so the row they are in can be rejected alone.
            yield raw_line.decode("utf-8", "surrogateescape")

    try:
        delimiter = "\t" if source.format == "tsv" else ","
        reader = csv.reader(lines(), delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        if header and header[0].startswith("\ufeff"):
            header[0] = header[0][1:]
        if fields.text not in header:
            raise InputError(f"{source.display}: no column {fields.text!r} for the text (columns: {header})")
        ordinal = 0
        if start is not None and start.ordinal:
            if source.seekable:
                handle.stream.seek(start.offset)
                state["offset"] = start.offset
                reader = csv.reader(lines(), delimiter=delimiter)
                ordinal = start.ordinal
                line_base = start.line
            else:  # gzip: read through the records already done
                for _ in range(start.ordinal):
                    try:
                        if next(reader, None) is None:
                            break
                    except csv.Error:
                        continue
                ordinal = start.ordinal
                line_base = 0
        else:
            line_base = 0
        while True:
            first_line = line_base + reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                ordinal += 1
                position = Position(file_index, ordinal, handle.disk_offset(state["offset"]),
                                    line_base + reader.line_num)
                yield Reject(source.display, first_line, "bad_row", f"malformed CSV: {exc}", "", None, position)
                continue
            ordinal += 1
            position = Position(file_index, ordinal, handle.disk_offset(state["offset"]), line_base + reader.line_num)
            raw_text = delimiter.join(row)
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if any(_undecodable(value) for value in row):
                yield Reject(source.display, first_line, "not_utf8", "not valid UTF-8",
                             raw_text[:500].encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
                             None, position)
                continue
            if len(row) != len(header):
                yield Reject(source.display, first_line, "bad_row",
                             f"expected {len(header)} columns, got {len(row)}", raw_text[:500], None, position)
                continue
            raw = {name: (value if value != "" else None) for name, value in zip(header, row, strict=True)}
            yield _record(raw, fields, limits, source.display, first_line, position, raw_text)
    finally:
        handle.raw.close()


def _read_parquet(source: SourceFile, file_index: int, fields: FieldMap, limits: Limits,
                  start: Position | None) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source.path)
    except (OSError, pa.ArrowException) as exc:
        yield Reject(source.display, 0, "unreadable_file", f"cannot read Parquet file: {exc}", "", None,
                     Position(file_index, 0, 0, 0))
        return
    with parquet:
        names = parquet.schema_arrow.names
        if fields.text not in names:
            raise InputError(f"{source.display}: no column {fields.text!r} for the text (columns: {names})")
        columns = [name for name in fields.columns() if name in names]
        total = parquet.metadata.num_rows
        done = start.ordinal if start is not None else 0
        # Skip whole row groups already done, then the done rows of the first one read.
        groups, first_row = [], 0
        for index in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(index).num_rows
            if first_row + rows <= done:
                first_row += rows
                continue
            groups.append(index)
        row = first_row
        if not groups:
            return
        for batch in parquet.iter_batches(batch_size=PARQUET_READ_ROWS, row_groups=groups, columns=columns):
            for values in batch.to_pylist():
                row += 1
                if row <= done:
                    continue
                offset = source.size * row // max(total, 1)
                position = Position(file_index, row, offset, row)
                decoded: dict[str, Any] = {}
                bad_bytes = False
                for key, value in values.items():
                    if isinstance(value, bytes):
                        try:
                            value = value.decode("utf-8")
                        except UnicodeDecodeError:
                            bad_bytes = True
                    decoded[key] = value
                if bad_bytes:
                    yield Reject(source.display, row, "not_utf8", "a binary column is not valid UTF-8",
                                 "", None, position)
                    continue
                yield _record(decoded, fields, limits, source.display, row, position,
                              json.dumps(decoded, ensure_ascii=False, default=str)[:500])


def _modified(mtime_ns: int) -> str:
    return datetime.fromtimestamp(mtime_ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_document(source: SourceFile, file_index: int, limits: Limits) -> Record:
    """A document file as one document (id: its path below its root), or a Reject saying why not.

    Metadata: `path` (= the id), `title`, `format`, `modified` (UTC), `root` (the folder the path is
    relative to: --prune deletes only documents of the roots it was given) and, for PDFs, `pages`."""
    from indexer.documents import UnreadableFile, extract

    position = Position(file_index, 1, source.size, 0)
    relative = source.relative
    try:
        doc_id = check_id(relative, "path")
    except IngestError as exc:
        return Reject(source.display, 0, exc.kind, f"the path cannot be a document id: {exc.reason}", "", None,
                      position)
    try:
        extracted = extract(Path(source.path), source.format)
    except UnreadableFile as exc:
        log.warning("file_unreadable", file=source.display, reason=str(exc))
        return Reject(source.display, 0, "unreadable_file", str(exc), "", doc_id, position)
    except OSError as exc:
        return Reject(source.display, 0, "unreadable_file", f"cannot read the file: {exc.strerror or exc}", "",
                      doc_id, position)
    except Exception as exc:  # a parser's bug on a strange file must not stop the run
        log.warning("extract_failed", file=source.display, error=f"{type(exc).__name__}: {exc}")
        return Reject(source.display, 0, "unreadable_file", f"extraction failed: {type(exc).__name__}: {exc}",
                      "", doc_id, position)
    if not extracted.text.strip():
        reason = ("no text layer (a scanned PDF? OCR is not supported)" if source.format == "pdf"
                  else "no text in the file")
        return Reject(source.display, 0, "missing_text", reason, "", doc_id, position)
    metadata: dict[str, Any] = {"path": relative, "title": extracted.title or Path(relative).stem,
                                "format": source.format, "modified": _modified(source.mtime_ns), "root": source.root}
    if extracted.page_starts:
        metadata["pages"] = len(extracted.page_starts)
    try:
        check_text(extracted.text, limits.max_doc_chars)
        metadata = check_metadata(metadata, limits.max_metadata_bytes)
    except IngestError as exc:
        return Reject(source.display, 0, exc.kind, exc.reason, "", doc_id, position)
    # `modified` is not content: a touched but unchanged file is skipped (and keeps its stored `modified`).
    return SourceDoc(doc_id, extracted.text, metadata, source.display, 0, position, tuple(extracted.page_starts),
                     unhashed=("modified",))


def read_all(files: Sequence[SourceFile], fields: FieldMap, limits: Limits,
             start: Position | None = None) -> Iterator[Record]:
    """Every record of every file from `start` on, in the fixed order."""
    first = start.file_index if start is not None else 0
    for index in range(first, len(files)):
        yield from read_file(files[index], index, fields, limits, start if index == first else None)


def completed_bytes(files: Sequence[SourceFile], position: Position) -> int:
    """Input bytes before `position`, for progress and ETA."""
    return sum(f.size for f in files[: position.file_index]) + (
        min(position.offset, files[position.file_index].size) if position.file_index < len(files) else 0
    )


__all__ = [
    "DOCUMENT_FORMATS", "STDIN", "Discovery", "FieldMap", "InputError", "Limits", "Position", "Record", "Reject",
    "RowError", "SourceDoc", "SourceFile", "completed_bytes", "derived_id", "discover", "find_inputs", "path_filter",
    "read_all", "read_document", "read_file", "shard_of", "to_document",
]
