"""Which library extracts text from Chinese documents best: correctness and speed per format.

Generates documents (tests/docfiles.py: Markdown hard-wrapped mid-sentence, HTML with inline tags
and source line breaks inside paragraphs, .docx, PDFs of two pages in the CID font STSong-Light,
with headings and a table) and runs each candidate over them:

    sentences   share of the document's sentences found verbatim in the extracted text (a space
                inserted between two characters, lost punctuation or mojibake all break a match;
                so does a line break left where the source wrapped a line)
    characters  the same with every line break removed first: are the characters themselves right
    cjk_spaces  whitespace between two Chinese characters on one line (wrapped lines joined badly)
    heading     the title is on a line of its own (a chunk boundary can fall after it)
    ms/file     mean extraction time

`pdf-owner` are the same PDFs encrypted with an owner password only (they open without a password;
copying or printing is "restricted"), common among published PDFs.
Needs, besides the project: pip install "markitdown[pdf,docx]" trafilatura pypdf

    .venv/bin/python bench/bench_extract.py [--files 40]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer import documents
from tests.docfiles import WRITERS, GeneratedDoc, make_doc, write_pdf

CJK_SPACE = re.compile(r"[\u4e00-\u9fff\u3000-\u303f\uff00-\uffef][ \t]+[\u4e00-\u9fff\u3000-\u303f\uff00-\uffef]")


def pypdf_text(path: Path) -> str:
    from pypdf import PdfReader

    return "\n".join(page.extract_text() or "" for page in PdfReader(str(path)).pages)


def pdfminer_plain(path: Path) -> str:
    from pdfminer.high_level import extract_text

    return str(extract_text(str(path)))


def markitdown_text(path: Path) -> str:
    from markitdown import MarkItDown

    return str(MarkItDown().convert(str(path)).text_content)


def trafilatura_text(path: Path) -> str:
    import trafilatura

    return trafilatura.extract(path.read_text(encoding="utf-8"), include_tables=True) or ""


def bs4_get_text(path: Path) -> str:
    from bs4 import BeautifulSoup

    return BeautifulSoup(path.read_bytes(), "lxml").get_text("\n")


def docx_paragraphs(path: Path) -> str:
    import docx

    return "\n".join(p.text for p in docx.Document(str(path)).paragraphs)


def markdown_raw(path: Path) -> str:
    return path.read_text(encoding="utf-8")


CANDIDATES: dict[str, dict[str, Callable[[Path], str]]] = {
    "pdf": {"semsearch (pdfminer.six layout)": lambda p: documents.extract_pdf(p).text,
            "pdfminer.six extract_text": pdfminer_plain, "pypdf extract_text": pypdf_text,
            "semsearch's pypdf fallback (line lengths)": lambda p: documents._extract_pdf_pypdf(p)[0],
            "markitdown": markitdown_text},
    "pdf-owner": {"semsearch (pdfminer.six layout, pypdf fallback)": lambda p: documents.extract_pdf(p).text,
                  "pdfminer.six extract_text": pdfminer_plain, "pypdf extract_text": pypdf_text},
    "docx": {"semsearch (python-docx, tables)": lambda p: documents.extract_docx(p).text,
             "python-docx paragraphs only": docx_paragraphs, "markitdown (mammoth)": markitdown_text},
    "html": {"semsearch (BeautifulSoup+lxml)": lambda p: documents.extract_html(p.read_bytes()).text,
             "BeautifulSoup get_text": bs4_get_text, "trafilatura": trafilatura_text, "markitdown": markitdown_text},
    "md": {"semsearch (markdown-it-py)": lambda p: documents.extract_markdown(p.read_bytes()).text,
           "raw file": markdown_raw, "markitdown": markitdown_text},
}


def score(doc: GeneratedDoc, text: str) -> tuple[float, float, int, bool]:
    found = sum(1 for sentence in doc.sentences if sentence in text)
    unwrapped = text.replace("\n", "")
    characters = sum(1 for sentence in doc.sentences if sentence in unwrapped)
    heading = any(line.strip().lstrip("#* ").rstrip("* ") == doc.title for line in text.splitlines())
    return found / len(doc.sentences), characters / len(doc.sentences), len(CJK_SPACE.findall(text)), heading


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=40, help="documents per format")
    args = parser.parse_args()
    print("| format | extractor | sentences intact | characters intact | CJK spaces/file | title on own line "
          "| ms/file |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, candidates in CANDIDATES.items():
            docs = [make_doc(i, fmt.split("-")[0], paragraphs=6) for i in range(args.files)]
            for doc in docs:
                if fmt == "pdf-owner":  # "protected": opens without a password, copying restricted
                    write_pdf(doc, Path(tmp) / doc.name, owner_password="owner")
                else:
                    WRITERS[fmt](doc, Path(tmp) / doc.name)
            for name, extract in candidates.items():
                extract(Path(tmp) / docs[0].name)  # imports and caches out of the timing
                began = time.perf_counter()
                texts = [extract(Path(tmp) / doc.name) for doc in docs]
                elapsed_ms = (time.perf_counter() - began) * 1000 / len(docs)
                scores = [score(doc, text) for doc, text in zip(docs, texts, strict=True)]
                intact, characters, spaces, headings = (sum(s[k] for s in scores) / len(scores) for k in range(4))
                print(f"| {fmt} | {name} | {intact:.0%} | {characters:.0%} | {spaces:.1f} | {headings:.0%} "
                      f"| {elapsed_ms:.1f} |")


if __name__ == "__main__":
    main()
