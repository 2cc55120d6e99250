"""`highlight: true` on SearchDocuments: the query's jieba terms as character spans of each hit's text and
an HTML snippet, in every mode (dense hits may have none), through a real service on loopback."""

from __future__ import annotations

from collections.abc import Callable

from semsearch.encoders import TorchEncoder
from semsearch.v1 import search_pb2 as pb
from service.highlight import query_terms, snippet, spans
from tests.conftest import LiveService

DOCS = [pb.Document(id="refund", text="如何申请退款？退款将原路退回。"),
        pb.Document(id="invoice", text="发票抬头写错能改吗？<b>发票</b>可以重开。"),
        pb.Document(id="parcel", text="快递包裹几天没动静"),
        pb.Document(id="long", text="前言。" * 60 + "申请退款请走售后入口。" + "附录。" * 60)]


def test_terms_spans_and_snippets() -> None:
    assert set(query_terms("怎么申请退款？")) >= {"申请", "退款"}
    assert "？" not in query_terms("怎么申请退款？") and query_terms("？！ ") == []
    assert query_terms("Refund policy", "standard") == ["Refund", "policy"]
    text = "如何申请退款？退款将原路退回。"
    # "申请" and "退款" touch: one merged span; the second 退款 on its own; case-insensitive for Latin.
    assert spans(text, ["申请", "退款"]) == [(2, 6), (7, 9)]
    assert spans("Refund? REFUND!", ["refund"]) == [(0, 6), (8, 14)]
    assert spans(text, []) == [] and spans("", ["退款"]) == []
    assert snippet("a<b>退款</b>", [(4, 6)]) == "a&lt;b&gt;<em>退款</em>&lt;/b&gt;"
    long = "前" * 300 + "退款" + "后" * 300
    cut = snippet(long, [(300, 302)], width=40)
    assert cut.startswith("…") and cut.endswith("…") and "<em>退款</em>" in cut
    assert len(cut.replace("<em>", "").replace("</em>", "")) == 42  # 40 characters and two ellipses
    assert snippet("没有匹配", []) == "没有匹配"


def _search(service: LiveService, mode: int, **fields: object) -> pb.SearchDocumentsResponse:
    return service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="怎么申请退款", top_k=4, mode=mode,  # type: ignore[arg-type]
                                                                  highlight=True, **fields))


def test_highlight_in_every_mode(make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder) -> None:
    service = make_service(tiny_encoder)
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=DOCS))
    for mode in (pb.RETRIEVAL_MODE_LEXICAL, pb.RETRIEVAL_MODE_HYBRID):
        hits = {hit.id: hit for hit in _search(service, mode).hits}
        refund = hits["refund"]
        assert [(s.start, s.end, s.text) for s in refund.highlights] == [(2, 6, "申请退款"), (7, 9, "退款")], mode
        assert refund.snippet == "如何<em>申请退款</em>？<em>退款</em>将原路退回。"
        long = hits["long"]
        assert [s.text for s in long.highlights] == ["申请退款"]
        assert long.snippet.replace("<em>", "").replace("</em>", "").strip("…") in long.text  # its chunk
        assert all(long.text[s.start:s.end] == s.text for s in long.highlights)
    # Dense hits carry the same fields: spans where the words occur, the text's beginning otherwise.
    dense = {hit.id: hit for hit in _search(service, pb.RETRIEVAL_MODE_DENSE).hits}
    assert [s.text for s in dense["refund"].highlights] == ["申请退款", "退款"]
    assert list(dense["parcel"].highlights) == [] and dense["parcel"].snippet == "快递包裹几天没动静"
    # Without the flag, or without text in the answer, nothing is added.
    plain = service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="怎么申请退款",
                                                                   mode=pb.RETRIEVAL_MODE_LEXICAL))
    assert all(not hit.highlights and not hit.snippet for hit in plain.hits)
    no_text = _search(service, pb.RETRIEVAL_MODE_LEXICAL, return_fields=[pb.RETURN_FIELD_METADATA])
    assert no_text.hits and all(not hit.highlights and not hit.snippet for hit in no_text.hits)
    batch = service.stub.BatchSearchDocuments(pb.BatchSearchDocumentsRequest(requests=[
        pb.SearchDocumentsRequest(query="发票", mode=pb.RETRIEVAL_MODE_LEXICAL, highlight=True)]))
    invoice = batch.responses[0].hits[0]
    assert invoice.id == "invoice"
    assert invoice.snippet == "<em>发票</em>抬头写错能改吗？&lt;b&gt;<em>发票</em>&lt;/b&gt;可以重开。"
