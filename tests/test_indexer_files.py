"""`semsearch index FOLDER`: Markdown, text, HTML, PDF and Word files in, Chinese text intact.

Extraction per format (headings, paragraphs, tables; lines wrapped inside Chinese sentences joined
without spaces; full-width punctuation kept; GBK decoded; binary, damaged and encrypted files
refused with a reason), discovery (recursive, include/exclude, hidden files, unsupported types once
per extension, a missing path named), and the README's way end to end: a folder of generated files
indexed by one `semsearch index` process with the Chinese USE-Multilingual model, every file found
by its own sentence, PDF chunks citing their page, a re-run writing nothing, --prune deleting a
removed file only (not another folder's documents), damaged files listed while nothing else is lost.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from indexer.documents import UnreadableFile, extract, extract_html, extract_markdown, extract_plain, join_wrapped
from indexer.job import IndexOptions, run_index
from indexer.sources import FieldMap, InputError, Limits, find_inputs, read_all
from indexer.verify import run_verify
from semsearch.config import Settings
from semsearch.encoders import create_encoder
from semsearch.filters import MetadataFilter, Operator
from semsearch.store import MilvusStore
from tests.docfiles import FORMATS, WRITERS, make_doc, write_folder, write_pdf

FORMAT_NAMES = {"md": "markdown", "txt": "text", "html": "html", "pdf": "pdf", "docx": "docx"}
CJK_SPACE = re.compile(r"[\u4e00-\u9fff，。！？；：“”（）][ \t]+[\u4e00-\u9fff，。！？；：“”（）]")
SEMSEARCH = [sys.executable, "-m", "semsearch"]
MODEL = "use-multilingual-v3"


# ---------------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_gives_back_the_chinese_text_intact(tmp_path: Path, fmt: str) -> None:
    doc = make_doc(7, fmt)
    path = tmp_path / doc.name
    WRITERS[fmt](doc, path)
    extracted = extract(path, FORMAT_NAMES[fmt])
    missing = [sentence for sentence in doc.sentences if sentence not in extracted.text]
    assert not missing, f"{fmt}: not found verbatim: {missing}\n{extracted.text}"
    assert not CJK_SPACE.search(extracted.text), extracted.text
    assert extracted.title == doc.title
    lines = extracted.text.splitlines()
    assert doc.title in lines  # the heading is a line of its own: a chunk boundary can fall after it
    if fmt not in ("txt", "pdf"):  # a table row is one line, cells joined (a PDF has no table structure)
        assert "退款时限 | " in extracted.text and any(line.startswith("联系方式 | ") for line in lines)
    if fmt == "pdf":
        assert len(extracted.page_starts) == 2
        second_page = extracted.text[extracted.page_starts[1]:]
        assert doc.marker in second_page and doc.paragraphs[0] not in second_page
    else:
        assert extracted.page_starts == []


def test_text_is_decoded_and_layout_is_not_text() -> None:
    gbk = "第一行：退款说明\n\n七天内可以申请退款。".encode("gb18030")
    assert extract_plain(gbk).text == "第一行：退款说明\n\n七天内可以申请退款。"
    assert extract_plain("\ufeff标题\r\n正文。  \n\n\n\n下一段".encode()).text == "标题\n正文。\n\n下一段"
    html = ("<html><head><title>标题</title><script>var a='脚本';</script></head><body><nav>导航</nav>"
            "<p>第一段<b>加粗</b>\n继续。</p><ul><li>甲</li><li>乙</li></ul><p>Hello\n world<br>换行</p></body></html>")
    text = extract_html(html.encode()).text
    assert text == "第一段加粗继续。\n\n甲\n\n乙\n\nHello world\n换行", text
    markdown = "---\ntitle: 前言\n---\n# 标题\n\n第一行\n第二行，[链接](http://x)与`代码`。\n\n- 项目一\n- item two\n"
    extracted = extract_markdown(markdown.encode())
    assert extracted.title == "前言" and extracted.text == "标题\n\n第一行第二行，链接与代码。\n\n项目一\n\nitem two"
    assert join_wrapped(["he said “yes”", "and left"]) == "he said “yes” and left"
    assert join_wrapped(["延迟…", "…偏远", "English"]) == "延迟……偏远English"


def test_unreadable_files_raise_with_a_reason(tmp_path: Path) -> None:
    cases = {
        "binary.txt": (bytes(range(256)) * 4, "binary data"),
        "binary.html": (b"<html>\x00\x01\x02", "binary data"),
        "latin.md": (b"caf\xe9 \xff\xfe\xfd", "not UTF-8 or GB18030"),
        "broken.docx": (b"PK\x03\x04 truncated", "not a .docx"),
        "broken.pdf": (b"%PDF-1.4\n1 0 obj << /Type /Catalog >>\ntrailer garbage", "not a readable PDF"),
    }
    formats = {".txt": "text", ".html": "html", ".md": "markdown", ".docx": "docx", ".pdf": "pdf"}
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UnreadableFile, match=reason):
            extract(tmp_path / name, formats[Path(name).suffix])
    write_pdf(make_doc(1, "pdf"), tmp_path / "secret.pdf", encrypt_password="s3cret")
    with pytest.raises(UnreadableFile, match="encrypted PDF"):
        extract(tmp_path / "secret.pdf", "pdf")
    # An owner password only (copying restricted): anyone can open it, and its text is read intact
    # (pdfminer gives "(cid:4538)..." for its CID font; pypdf reads it).
    doc = make_doc(2, "pdf")
    write_pdf(doc, tmp_path / "protected.pdf", owner_password="owner")
    extracted = extract(tmp_path / "protected.pdf", "pdf")
    assert all(sentence in extracted.text for sentence in doc.sentences), extracted.text
    assert len(extracted.page_starts) == 2 and doc.marker in extracted.text[extracted.page_starts[1]:]


# ---------------------------------------------------------------------------------------- discovery
def test_discovery_recurses_filters_and_reports_unsupported_types_once(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    for name in ["a.md", "sub/b.html", "sub/deep/c.txt", "drafts/d.md", "e.PDF", "f.png", "g.png", "sub/h.png",
                 "i.rtf", "j", ".hidden.md", ".git/config.md"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("文本。", encoding="utf-8")
    found = find_inputs([str(root)])
    assert [f.relative for f in found.files] == ["a.md", "drafts/d.md", "e.PDF", "sub/b.html", "sub/deep/c.txt"]
    assert [f.format for f in found.files] == ["markdown", "markdown", "pdf", "html", "text"]
    assert dict(found.unsupported) == {".png": 3, ".rtf": 1, "(no extension)": 1}
    assert found.unsupported_note() == "skipped 5 files of unsupported types: (no extension) (1), .png (3), .rtf (1)"
    filtered = find_inputs([str(root)], include=["*.md", "*.html"], exclude=["drafts/"])
    assert [f.relative for f in filtered.files] == ["a.md", "sub/b.html"] and not filtered.unsupported
    # A file given by itself: its id is its name; a missing path is an error naming it.
    assert [f.relative for f in find_inputs([str(root / "sub" / "b.html")]).files] == ["b.html"]
    with pytest.raises(InputError, match=r"nope\.md: no such file or directory"):
        find_inputs([str(root / "a.md"), str(root / "nope.md")])
    with pytest.raises(InputError, match=r"no files to index.*\.png \(3\)"):
        find_inputs([str(root)], include=["*.png"])
    records = list(read_all(found.files, FieldMap(), Limits()))
    # e.PDF is no PDF: reported with its path, not raised
    assert [(r.file.endswith("e.PDF"), getattr(r, "kind", None)) for r in records][2] == (True, "unreadable_file")
    assert [getattr(r, "doc_id", None) for r in records] == ["a.md", "drafts/d.md", "e.PDF", "sub/b.html",
                                                             "sub/deep/c.txt"]


# ---------------------------------------------------------------------------------------- end to end
def semsearch(tmp_path: Path, *args: str) -> dict[str, Any]:
    """`semsearch index ... --json` as a user runs it, in its own process; its JSON summary."""
    result = subprocess.run([*SEMSEARCH, "index", *args, "--json"], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1", "SEMSEARCH_METRICS_PORT": "0"})
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    summary: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return summary


def stored_documents(store: MilvusStore, collection: str) -> dict[str, list[dict[str, Any]]]:
    documents: dict[str, list[dict[str, Any]]] = {}
    for row in store.iter_rows(collection, ["doc_id", "chunk_index", "text", "metadata"]):
        documents.setdefault(str(row["doc_id"]), []).append(row)
    for rows in documents.values():
        rows.sort(key=lambda row: int(row["chunk_index"]))
    return documents


def test_a_folder_of_mixed_files_indexes_in_one_command(tmp_path: Path) -> None:
    root, other = tmp_path / "handbook", tmp_path / "other"
    docs = {doc.name: doc for doc in write_folder(root, 50, paragraphs=2)}
    other.mkdir()
    for index in (200, 201):  # another folder, indexed into the same collection
        WRITERS["md"](make_doc(index, "md"), other / f"doc-{index}.md")
    (root / "drafts").mkdir()
    (root / "drafts" / "draft.md").write_text("# 草稿\n\n不应被索引。", encoding="utf-8")
    (root / "sub" / "broken.docx").write_bytes(b"PK\x03\x04 not a zip")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    write_pdf(make_doc(99, "pdf"), root / "secret.pdf", encrypt_password="s3cret")
    for name in ("logo.png", "sub/photo.png", "notes.rtf"):
        (root / name).write_bytes(b"\x89PNG\r\n")
    common = ["--collection", "handbook", "--milvus-uri", str(tmp_path / "milvus.db"), "--model", MODEL,
              "--state-dir", str(tmp_path / "state"), "--progress", "off"]

    # The other folder in-process (cheaper than a process), with the encoder the checks below use.
    encoder = create_encoder(Settings(model=MODEL, torch_threads=1))
    store = MilvusStore.from_settings(Settings(milvus_uri=str(tmp_path / "milvus.db"), collection="handbook"))
    try:
        assert run_index(IndexOptions(inputs=[str(other)], state_dir=tmp_path / "state", progress="off"),
                         encoder=encoder, store=store, collection="handbook").totals["written"] == 2
    finally:
        store.close()
    first = semsearch(tmp_path, str(root), *common, "--exclude", "drafts/")
    assert first["totals"]["written"] == 50 and first["totals"]["rejected"] == 3, first
    assert first["reasons"] == {"unreadable_file": 3}
    assert first["notes"][0] == "skipped 3 files of unsupported types: .png (2), .rtf (1)"
    not_indexed = sorted(note.split(": ")[1].rsplit("/", 1)[-1] for note in first["notes"][1:])
    assert not_indexed == ["binary.txt", "broken.docx", "secret.pdf"], first["notes"]

    store = MilvusStore.from_settings(Settings(milvus_uri=str(tmp_path / "milvus.db"), collection="handbook"))
    try:
        physical = store.resolve("handbook")
        store.load(physical)
        stored = stored_documents(store, physical)
        assert sorted(stored) == sorted([*docs, "doc-200.md", "doc-201.md"])  # the other folder's too
        for name, doc in docs.items():
            rows = stored[name]
            text = "".join(row["text"] for row in rows)  # no overlap: chunks concatenate to the document
            assert all(sentence in text for sentence in doc.sentences), (name, text)
            metadata = rows[0]["metadata"]
            assert (metadata["path"], metadata["title"], metadata["root"]) == (name, doc.title, str(root))
            assert metadata["format"] == FORMAT_NAMES[name.rsplit(".", 1)[1]]
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", metadata["modified"])
            if name.endswith(".pdf"):  # each chunk cites its page: the title on 1, the marker on 2
                assert metadata["pages"] == 2 and (metadata["page"], metadata["page_end"]) == (1, 1)
                marker_rows = [row for row in rows if doc.marker[:12] in row["text"]]
                assert marker_rows and all(row["metadata"]["page"] == 2 for row in marker_rows)
        # Every file is found by its own sentence.
        queries = [doc.marker for doc in docs.values()]
        lexical = store.search(physical, texts=queries, top_k=1, per_document=True)
        assert [hits[0].doc_id for hits in lexical] == list(docs)
        # Filters on the page and format metadata: the PDF's marker, cited on page 2.
        pdf = docs["doc-004.pdf"]
        on_page_2 = (MetadataFilter("page", Operator.EQ, (2,)), MetadataFilter("format", Operator.EQ, ("pdf",)))
        hits = store.search(physical, texts=[pdf.marker], top_k=3, filters=on_page_2)[0]
        assert hits[0].doc_id == "doc-004.pdf" and all(hit.metadata["page"] == 2 for hit in hits)
        dense = store.search(physical, encoder.encode_queries(queries[:10]), top_k=5, per_document=True)
        assert all(name in [hit.doc_id for hit in hits] for name, hits in zip(docs, dense, strict=False))
        report = run_verify(files=find_inputs([str(root)], exclude=["drafts/"]).files, fields=FieldMap(),
                            limits=Limits(), encoder=encoder, store=store, collection="handbook", sample=10)
    finally:
        store.close()
        encoder.close()
    assert report.sampled == 10 and report.missing == 0 and report.extra == 2  # the other folder's 2

    os.utime(root / "doc-001.html")  # touched, not changed: still skipped
    rerun = semsearch(tmp_path, str(root), *common, "--exclude", "drafts/")
    assert rerun["totals"]["written"] == 0 and rerun["totals"]["skipped"] == 50, rerun

    (root / "sub" / "doc-002.txt").unlink()
    with (root / "doc-000.md").open("a", encoding="utf-8") as changed:
        changed.write("\n新增的一段：换货请在十五天内提出。\n")
    shutil.copy(root / "doc-004.pdf", root / "doc-004.pdf.bak")  # an unsupported type appears
    pruned = semsearch(tmp_path, str(root), *common, "--exclude", "drafts/", "--prune")
    totals = pruned["totals"]
    assert (totals["pruned"], totals["written"], totals["skipped"]) == (1, 1, 48), pruned
    assert ".bak (1)" in pruned["notes"][0]
    store = MilvusStore.from_settings(Settings(milvus_uri=str(tmp_path / "milvus.db"), collection="handbook"))
    try:
        physical = store.resolve("handbook")
        store.load(physical)
        after = stored_documents(store, physical)
    finally:
        store.close()
    # The removed file is gone; the damaged ones never stored, the other folder untouched, nothing else lost.
    assert sorted(after) == sorted([*(name for name in docs if name != "sub/doc-002.txt"), "doc-200.md",
                                    "doc-201.md"])
    assert "新增的一段：换货请在十五天内提出。" in "".join(row["text"] for row in after["doc-000.md"])
