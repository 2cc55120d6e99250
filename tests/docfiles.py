"""Generated Chinese documents as files: Markdown, HTML, plain text, Word (.docx) and PDF.

Each document has a title, paragraphs of Chinese text with full-width punctuation, a table and a
sentence no other document has (its `marker`), so a test or benchmark can check that every file's
text comes out intact and is found. PDFs use reportlab's built-in CID font STSong-Light (no font
file needed) and put the second half of the paragraphs, with the marker, on page 2.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

COLOURS = ["朱红", "靛蓝", "鹅黄", "墨绿", "藕荷", "绛紫", "月白", "赭石", "黛青", "绯色"]
CREATURES = ["麒麟", "白鹤", "锦鲤", "青鸾", "玉兔", "金蟾", "仙鹿", "灵龟", "彩蝶", "苍鹰"]
SENTENCES = [
    "用户在收到商品后七天内可以申请无理由退款，退款将在三个工作日内原路返回。",
    "如果商品存在质量问题（例如破损、缺件），运费由商家承担；否则由买家承担。",
    "电子发票会在订单完成后发送到您的邮箱：请注意查收！",
    "会员积分每年十二月三十一日清零，请在此之前兑换礼品。",
    "“请保留好购物凭证”，售后服务时需要出示。",
    "快递一般在四十八小时内发出……偏远地区可能稍有延迟。",
    "修改收货地址请在发货前联系客服？发货后无法修改。",
    "账户密码连续输错五次将被锁定十五分钟，以保护您的安全。",
]
FORMATS = ("md", "html", "txt", "docx", "pdf")


@dataclass
class GeneratedDoc:
    name: str  # file name (the document id when the folder is the root)
    title: str
    paragraphs: list[str]
    marker: str  # a sentence only this document has
    table: list[list[str]] = field(default_factory=list)

    @property
    def sentences(self) -> list[str]:
        """Text that extraction must give back exactly (no spaces inserted, punctuation kept)."""
        return [self.title, *self.paragraphs, self.marker]


def make_doc(index: int, fmt: str, seed: int = 0, paragraphs: int = 4) -> GeneratedDoc:
    rng = random.Random(seed * 100_003 + index)
    colour, creature = COLOURS[index % len(COLOURS)], CREATURES[(index // len(COLOURS)) % len(CREATURES)]
    marker = f"第{index}号档案记载：{colour}的{creature}在{index % 28 + 1}日黄昏出现。"
    body = ["".join(rng.sample(SENTENCES, 3)) for _ in range(paragraphs)]
    table = [["项目", "说明"], ["退款时限", f"{index % 7 + 3}个工作日"], ["联系方式", "客服热线（全天）"]]
    return GeneratedDoc(f"doc-{index:03d}.{fmt}", f"第{index}号文档：{colour}{creature}说明", body, marker, table)


def write_markdown(doc: GeneratedDoc, path: Path) -> None:
    # Paragraphs hard-wrapped mid-sentence, as editors do: the reader must join them without spaces.
    wrapped = ["\n".join(p[i : i + 30] for i in range(0, len(p), 30)) for p in doc.paragraphs]
    table = [f"| {' | '.join(doc.table[0])} |", "|---|---|", *(f"| {' | '.join(r)} |" for r in doc.table[1:])]
    half = len(wrapped) // 2
    parts = [f"# {doc.title}", *wrapped[:half], "## 细则", *wrapped[half:], "\n".join(table), f"**{doc.marker}**"]
    path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")


def write_html(doc: GeneratedDoc, path: Path) -> None:
    rows = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in doc.table)
    paras = "".join(f"<p>{p[:20]}<b>{p[20:30]}</b>\n{p[30:]}</p>" for p in doc.paragraphs)
    path.write_text(
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{doc.title}</title>"
        "<script>var x = '不应出现';</script><style>p {{ color: red }}</style></head>"
        f"<body><nav>首页</nav><h1>{doc.title}</h1>{paras}<table>{rows}</table>"
        f"<div><span>{doc.marker}</span></div></body></html>",
        encoding="utf-8",
    )


def write_text(doc: GeneratedDoc, path: Path) -> None:
    path.write_text("\n\n".join([doc.title, *doc.paragraphs, doc.marker]) + "\n", encoding="utf-8")


def write_docx(doc: GeneratedDoc, path: Path) -> None:
    import docx

    document = docx.Document()
    document.core_properties.title = doc.title
    document.add_heading(doc.title, level=1)
    for paragraph in doc.paragraphs:
        document.add_paragraph(paragraph)
    table = document.add_table(rows=len(doc.table), cols=len(doc.table[0]))
    for row, values in zip(table.rows, doc.table, strict=True):
        for cell, value in zip(row.cells, values, strict=True):
            cell.text = value
    document.add_paragraph(doc.marker)
    document.save(str(path))


def write_pdf(doc: GeneratedDoc, path: Path, encrypt_password: str | None = None,
              owner_password: str | None = None) -> None:
    """`encrypt_password`: opening needs it; `owner_password` alone: anyone may open and read the file
    (the common "protected" PDF that restricts copying or printing)."""
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.cidfonts import UnicodeCIDFont
    from reportlab.platypus import PageBreak, Paragraph, SimpleDocTemplate

    if "STSong-Light" not in pdfmetrics.getRegisteredFontNames():
        pdfmetrics.registerFont(UnicodeCIDFont("STSong-Light"))
    body = ParagraphStyle("zh", fontName="STSong-Light", fontSize=11, leading=16, wordWrap="CJK")
    heading = ParagraphStyle("zh-h", fontName="STSong-Light", fontSize=16, leading=22)
    half = len(doc.paragraphs) // 2
    flow = [Paragraph(doc.title, heading), *(Paragraph(p, body) for p in doc.paragraphs[:half]), PageBreak(),
            *(Paragraph(p, body) for p in doc.paragraphs[half:]), Paragraph(doc.marker, body)]
    kwargs: dict[str, object] = {}
    if encrypt_password or owner_password:
        from reportlab.lib.pdfencrypt import StandardEncryption

        kwargs["encrypt"] = StandardEncryption(encrypt_password or "", ownerPassword=owner_password or "owner")
    SimpleDocTemplate(str(path), title=doc.title, **kwargs).build(flow)


WRITERS = {"md": write_markdown, "html": write_html, "txt": write_text, "docx": write_docx, "pdf": write_pdf}


def write_folder(root: Path, count: int, seed: int = 0, formats: tuple[str, ...] = FORMATS,
                 paragraphs: int = 4) -> list[GeneratedDoc]:
    """`count` documents, formats in turn, every third one in a sub-folder."""
    docs = []
    for index in range(count):
        fmt = formats[index % len(formats)]
        doc = make_doc(index, fmt, seed, paragraphs)
        if index % 3 == 2:
            doc.name = f"sub/{doc.name}"
        target = root / doc.name
        target.parent.mkdir(parents=True, exist_ok=True)
        WRITERS[fmt](doc, target)
        docs.append(doc)
    return docs
