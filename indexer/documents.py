"""Text out of document files: Markdown, plain text, HTML, PDF and Word (.docx).

Each extractor returns the text a reader would see, with the structure that helps chunking kept as
lines: headings and paragraphs on lines of their own (blank line between blocks), list items one a
line, table rows one a line with cells joined by " | ". Chinese text stays as written: lines that a
PDF or a Markdown source wrapped inside a sentence are joined without a space between Chinese
characters (with one between Latin words), full-width punctuation is kept, and bytes that are not
text are refused rather than turned into mojibake. Libraries (chosen by measurement, see
bench/bench_extract.py and indexer/README.md): pdfminer.six for PDF, python-docx for Word,
BeautifulSoup over lxml for HTML, markdown-it-py for Markdown.

A file that cannot be read raises `UnreadableFile` with a reason; the indexer reports it with the
path and goes on.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semsearch.text import normalize

MAX_TITLE_CHARS = 200
SNIFF_BYTES = 8192
TABLE_CELL_SEPARATOR = " | "
# Characters written without spaces between them: CJK ideographs and punctuation, kana, hangul,
# full-width forms. A line wrapped between two of them is joined without a space.
_CJK = (r"\u2e80-\u2fff\u3000-\u303f\u3040-\u30ff\u3100-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
        r"\uac00-\ud7af\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef")
_CJK_CHAR = re.compile(f"[{_CJK}]")
# Punctuation shared by Chinese and Latin text (curly quotes, dashes, ellipsis, middle dot): a break
# between two of them is joined without a space, a break between one and a Latin letter with one.
_SHARED_PUNCTUATION = frozenset("“”‘’—–…·")
_SPACES = re.compile(r"[ \t\u00a0]+")


class UnreadableFile(Exception):
    """The file's text cannot be extracted (encrypted, corrupt, not text); the message says why."""


@dataclass
class Extracted:
    text: str
    title: str | None = None
    # Character offset in `text` where each page starts (PDF only; page i+1 starts at page_starts[i]).
    page_starts: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- helpers
def join_wrapped(lines: Iterable[str]) -> str:
    """Lines of one paragraph as one line: no space where a break fell between Chinese characters."""
    out = ""
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if out and _needs_space(out[-1], line[0]):
            out += " "
        out += line
    return out


def _needs_space(before: str, after: str) -> bool:
    if _CJK_CHAR.match(before) or _CJK_CHAR.match(after):
        return False
    return not (before in _SHARED_PUNCTUATION and after in _SHARED_PUNCTUATION)


def _blocks_to_text(blocks: Iterable[str]) -> str:
    """Blocks (paragraphs, headings, table rows) as text: one blank line between blocks."""
    return "\n\n".join(block for block in (b.strip() for b in blocks) if block)


def _short_title(text: str | None) -> str | None:
    if not text:
        return None
    title = " ".join(text.split())
    return title[:MAX_TITLE_CHARS] or None


def decode_text(data: bytes) -> str:
    """UTF-8 (with or without BOM), UTF-16 with a BOM, or GB18030 (GBK/GB2312) text; else UnreadableFile."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise UnreadableFile(f"not valid UTF-16 ({exc.reason} at byte {exc.start})") from exc
    if b"\x00" in data[:SNIFF_BYTES]:
        raise UnreadableFile("binary data, not text (NUL bytes)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as utf8_error:
        try:  # Chinese text files written on Windows are often GBK, a subset of GB18030
            return data.decode("gb18030")
        except UnicodeDecodeError:
            raise UnreadableFile(
                f"not UTF-8 or GB18030 text (invalid byte at offset {utf8_error.start})") from utf8_error


# ---------------------------------------------------------------------------------------- formats
def extract_plain(data: bytes) -> Extracted:
    """Lines kept as they are: in Chinese text files a line is usually a paragraph (a title, a list
    item), and joining them would glue a title to its text."""
    text = normalize(decode_text(data))
    lines = [line.rstrip() for line in text.split("\n")]
    body = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
    first = next((line for line in lines if line.strip()), None)
    return Extracted(body, _short_title(first))


def _front_matter(text: str) -> tuple[dict[str, Any], str]:
    """YAML front matter (`---` ... `---` at the top of a Markdown file) and the rest."""
    match = re.match(r"---[ \t]*\n(.*?)\n(?:---|\.\.\.)[ \t]*(?:\n|$)", text, re.DOTALL)
    if not match:
        return {}, text
    import yaml

    try:
        loaded = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}, text
    return (loaded if isinstance(loaded, dict) else {}), text[match.end():]


def _inline_text(token: Any) -> str:
    """An inline token's visible text: link and emphasis marks dropped, image alt text kept, soft
    line breaks joined (no space between Chinese characters), hard breaks kept."""
    segments: list[list[str]] = [[""]]  # hard-break-separated segments of soft-wrapped lines
    for child in token.children or []:
        if child.type in ("text", "code_inline", "image"):
            segments[-1][-1] += child.content or ""
        elif child.type == "softbreak":
            segments[-1].append("")
        elif child.type == "hardbreak":
            segments.append([""])
    return "\n".join(join_wrapped(lines) for lines in segments)


def extract_markdown(data: bytes) -> Extracted:
    from markdown_it import MarkdownIt

    meta, source = _front_matter(normalize(decode_text(data)))
    tokens = MarkdownIt("commonmark").enable("table").parse(source)
    blocks: list[str] = []
    row: list[str] | None = None
    table: list[str] = []
    title = meta.get("title") if isinstance(meta.get("title"), str) else None
    heading_level = 0
    for index, token in enumerate(tokens):
        if token.type == "heading_open":
            heading_level = int(token.tag[1])
        elif token.type == "table_open":
            table = []
        elif token.type == "tr_open":
            row = []
        elif token.type == "tr_close" and row is not None:
            table.append(TABLE_CELL_SEPARATOR.join(row))
            row = None
        elif token.type == "table_close":
            blocks.append("\n".join(table))  # a table is one block, a row a line
        elif token.type == "inline":
            text = _inline_text(token)
            if row is not None:
                row.append(text)
            else:
                blocks.append(text)
                if heading_level and title is None and (heading_level == 1 or index < 3):
                    title = text
        elif token.type == "heading_close":
            heading_level = 0
        elif token.type in ("fence", "code_block"):
            blocks.append(token.content.rstrip("\n"))
        elif token.type == "html_block":
            blocks.append(_html_text(token.content)[0])
    return Extracted(_blocks_to_text(blocks), _short_title(title))


# HTML elements whose content is a block of its own (a line break before and after).
_HTML_BLOCKS = frozenset([
    "address", "article", "aside", "blockquote", "body", "caption", "dd", "details", "div", "dl", "dt",
    "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr",
    "li", "main", "nav", "ol", "p", "pre", "section", "summary", "table", "tbody", "thead", "tfoot", "tr",
    "ul", "title",
])
# Not text a reader reads: code, styling, navigation menus, controls.
_HTML_SKIP = frozenset([
    "script", "style", "noscript", "template", "head", "svg", "canvas", "iframe", "object", "button",
    "select", "nav",
])


# Marks in the text walked out of an HTML tree: a block boundary, a line break (<br>, a table row)
# and a table cell; whitespace in the source between them is layout, not text.
_BLOCK, _BREAK, _CELL = "\x1d", "\x1e", "\x1f"


def _html_pieces(node: Any, out: list[str]) -> None:
    """Visible text of `node` appended to `out`, with block, break and cell marks."""
    from bs4 import Comment, NavigableString, Tag

    for child in node.children:
        if isinstance(child, Comment):
            continue
        if isinstance(child, NavigableString):
            out.append(str(child))
        elif not isinstance(child, Tag) or child.name in _HTML_SKIP:
            continue
        elif child.name == "br":
            out.append(_BREAK)
        elif child.name in ("td", "th"):
            out.append(_CELL)
            _html_pieces(child, out)
        elif child.name == "tr":
            out.append(_BREAK)
            _html_pieces(child, out)
            out.append(_BREAK)
        elif child.name == "pre":  # preformatted: its line breaks are text
            out.append(_BLOCK + child.get_text().replace("\n", _BREAK) + _BLOCK)
        elif child.name == "img":
            out.append(str(child.get("alt") or ""))
        elif child.name in _HTML_BLOCKS:
            out.append(_BLOCK)
            _html_pieces(child, out)
            out.append(_BLOCK)
        else:
            _html_pieces(child, out)


def _collapse(line: str) -> str:
    """HTML whitespace as a browser shows it: a source line break between Chinese characters is
    nothing, other runs of whitespace one space."""
    return _SPACES.sub(" ", join_wrapped(re.split(r"[ \t\f\v]*\n\s*", line)))


def _html_text(markup: str | bytes) -> tuple[str, str | None]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(markup, "lxml")
    title_tag = soup.find("title") or soup.find("h1")
    title = title_tag.get_text(" ", strip=True) if title_tag is not None else None
    pieces: list[str] = []
    _html_pieces(soup.body or soup, pieces)
    blocks = []
    for block in "".join(pieces).split(_BLOCK):
        lines = []
        for line in block.split(_BREAK):
            cells = [_collapse(cell) for cell in line.split(_CELL)]
            lines.append(TABLE_CELL_SEPARATOR.join(cell for cell in cells if cell))
        blocks.append("\n".join(line for line in lines if line))
    return normalize(_blocks_to_text(blocks)), _short_title(title)


_DECLARED_CHARSET = re.compile(rb"<meta[^>]+charset\s*=\s*[\"']?\s*([\w.:-]+)", re.IGNORECASE)


def extract_html(data: bytes) -> Extracted:
    if b"\x00" in data[:SNIFF_BYTES] and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UnreadableFile("binary data, not HTML (NUL bytes)")
    declared = _DECLARED_CHARSET.search(data[:SNIFF_BYTES])
    if declared and declared.group(1).lower().replace(b"-", b"") not in (b"utf8", b"utf16"):
        body, title = _html_text(data)  # a legacy charset in <meta> (gbk, big5, ...): BeautifulSoup follows it
    else:
        # Undeclared: UTF-8, UTF-16 or GB18030; BeautifulSoup's own guess turns GBK into mojibake.
        body, title = _html_text(decode_text(data))
    return Extracted(body, title)


_UNMAPPED_GLYPH = re.compile(r"\(cid:\d+\)")


def _pdf_box_paragraphs(box: Any) -> list[str]:
    """A text box's lines as paragraphs: a line that stops well short of the box's right edge (a
    heading, the last line of a paragraph) ends one; the others were wrapped and are joined."""
    from pdfminer.layout import LTTextLine

    paragraphs: list[str] = []
    current: list[str] = []
    for line in box:
        text = line.get_text() if isinstance(line, LTTextLine) else ""
        if not text.strip():
            continue
        current.append(text)
        char_width = line.width / max(len(text.strip()), 1)
        if line.x1 < box.x1 - 2 * char_width:
            paragraphs.append(join_wrapped(current))
            current = []
    if current:
        paragraphs.append(join_wrapped(current))
    return paragraphs


def _pdf_page_text(layout: Any) -> str:
    """One page's text boxes in reading order as paragraphs."""
    from pdfminer.layout import LTTextBox

    paragraphs = [p for element in layout if isinstance(element, LTTextBox) for p in _pdf_box_paragraphs(element)]
    return normalize(_blocks_to_text(paragraphs))


def extract_pdf(path: Path) -> Extracted:
    from pdfminer.converter import PDFPageAggregator
    from pdfminer.layout import LAParams
    from pdfminer.pdfdocument import PDFDocument, PDFEncryptionError, PDFPasswordIncorrect
    from pdfminer.pdfinterp import PDFPageInterpreter, PDFResourceManager
    from pdfminer.pdfpage import PDFPage
    from pdfminer.pdfparser import PDFParser

    text, starts = "", []
    try:
        with path.open("rb") as handle:
            document = PDFDocument(PDFParser(handle))  # opens PDFs with an owner password only
            resources = PDFResourceManager(caching=True)
            device = PDFPageAggregator(resources, laparams=LAParams())
            interpreter = PDFPageInterpreter(resources, device)
            for page in PDFPage.create_pages(document):
                interpreter.process_page(page)
                if text:
                    text += "\n\n"
                starts.append(len(text))
                text += _pdf_page_text(device.get_result())
            info = document.info
    except (PDFPasswordIncorrect, PDFEncryptionError) as exc:
        raise UnreadableFile(f"encrypted PDF (needs a password): {type(exc).__name__}") from exc
    except Exception as exc:  # pdfminer raises many kinds on damaged files (PDFSyntaxError, KeyError, ...)
        raise UnreadableFile(f"not a readable PDF: {type(exc).__name__}: {exc}") from exc
    title = _pdf_title(info)
    if _UNMAPPED_GLYPH.search(text):
        # pdfminer found glyphs it cannot map to characters: seen with CID fonts in PDFs encrypted
        # with an empty user password (an owner password only), which pypdf reads right.
        text, starts, pypdf_title = _extract_pdf_pypdf(path)
        title = title or pypdf_title
    if title is None:
        title = next((line for line in text.splitlines() if line.strip()), None)
    return Extracted(text, _short_title(title), starts)


def _paragraphs_by_line_length(lines: list[str]) -> list[str]:
    """Lines without layout as paragraphs: a line clearly shorter than the page's longest (a heading,
    the last line of a paragraph) ends one; full lines were wrapped and are joined to the next."""
    lines = [line.strip() for line in lines if line.strip()]
    full = max((len(line) for line in lines), default=0)
    paragraphs: list[str] = []
    current: list[str] = []
    for line in lines:
        current.append(line)
        if len(line) < 0.8 * full:
            paragraphs.append(join_wrapped(current))
            current = []
    if current:
        paragraphs.append(join_wrapped(current))
    return paragraphs


def _extract_pdf_pypdf(path: Path) -> tuple[str, list[int], str | None]:
    from pypdf import PdfReader

    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted and not reader.decrypt(""):
            raise UnreadableFile("encrypted PDF (needs a password)")
        text, starts = "", []
        for page in reader.pages:
            if text:
                text += "\n\n"
            starts.append(len(text))
            text += normalize(_blocks_to_text(_paragraphs_by_line_length((page.extract_text() or "").splitlines())))
        title = reader.metadata.title if reader.metadata is not None else None
    except UnreadableFile:
        raise
    except Exception as exc:
        raise UnreadableFile(f"not a readable PDF: {type(exc).__name__}: {exc}") from exc
    if _UNMAPPED_GLYPH.search(text):
        raise UnreadableFile("the PDF's fonts do not map its glyphs to characters (no usable text layer)")
    return text, starts, title


def _pdf_title(info: list[dict[str, Any]]) -> str | None:
    from pdfminer.utils import decode_text as pdf_decode_text

    for entry in info:
        raw = entry.get("Title")
        if raw in (b"(anonymous)", "(anonymous)", b"untitled", "untitled"):  # tools' placeholders
            return None
        if isinstance(raw, bytes):
            # PDF text strings are UTF-16BE with a BOM, or PDFDocEncoding.
            return raw[2:].decode("utf-16-be", "replace") if raw.startswith(b"\xfe\xff") else pdf_decode_text(raw)
        if isinstance(raw, str):
            return raw
    return None


def extract_docx(path: Path) -> Extracted:
    import docx
    from docx.table import Table

    if not zipfile.is_zipfile(path):
        raise UnreadableFile("not a .docx file (not a ZIP package: damaged, or an old .doc renamed?)")
    try:
        document = docx.Document(str(path))
        blocks: list[str] = []
        title = document.core_properties.title or None
        for item in document.iter_inner_content():
            if isinstance(item, Table):
                for row in item.rows:
                    # python-docx repeats a merged cell once per grid column it spans: keep one
                    unique = {id(cell._tc): cell for cell in row.cells}.values()
                    blocks.append(TABLE_CELL_SEPARATOR.join(join_wrapped(cell.text.splitlines()) for cell in unique))
                continue
            text = item.text
            style = (item.style.name if item.style is not None else "") or ""
            if title is None and style.startswith(("Title", "Heading")) and text.strip():
                title = text
            blocks.append(text)
    except Exception as exc:  # a damaged package: BadZipFile, KeyError, lxml errors, ...
        raise UnreadableFile(f"not a readable .docx file: {type(exc).__name__}: {exc}") from exc
    return Extracted(normalize(_blocks_to_text(blocks)), _short_title(title))


def extract(path: Path, fmt: str) -> Extracted:
    """The text of the file at `path` in format `fmt` (markdown, text, html, pdf, docx)."""
    if fmt == "pdf":
        return extract_pdf(path)
    if fmt == "docx":
        return extract_docx(path)
    data = path.read_bytes()
    if fmt == "markdown":
        return extract_markdown(data)
    if fmt == "html":
        return extract_html(data)
    return extract_plain(data)

