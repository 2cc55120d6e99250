"""Paging every retrieval mode to `max_page_depth` over real gRPC and Milvus Lite: the pages of a query
hold each hit of the single request of that depth exactly once, in its order (no repeats, no gaps)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from semsearch.config import Settings
from semsearch.encoders import TorchEncoder
from semsearch.v1 import search_pb2 as pb
from tests.conftest import LiveService

MAX_PAGE_DEPTH = 40
WORDS = ["退款", "订单", "快递", "发票", "密码", "手机", "优惠券", "地址", "物流", "账号"]
QUERY = "退款 订单 快递 发票 物流"
MODES = [pb.RETRIEVAL_MODE_DENSE, pb.RETRIEVAL_MODE_LEXICAL, pb.RETRIEVAL_MODE_HYBRID]


def corpus() -> list[pb.Document]:
    """72 short documents over overlapping words in varied counts: more than MAX_PAGE_DEPTH of them match
    the query's words, with BM25 and dense scores that disagree (what moved hits between pages)."""
    documents = []
    for n in range(72):
        words = [WORDS[(n * step) % len(WORDS)] for step in (1, 3, 7)] * (1 + n % 3) + [WORDS[n % 4]]
        document = pb.Document(id=f"doc{n:02d}", text=f"{'，'.join(words)}。第{n}条说明")
        document.metadata.update({"n": n})
        documents.append(document)
    return documents


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: TorchEncoder) -> Iterator[LiveService]:
    directory = tmp_path_factory.mktemp("hybrid-paging")
    settings = Settings(milvus_uri=str(directory / "milvus.db"), host="127.0.0.1", port=0, metrics_port=0,
                        collection="docs", max_page_depth=MAX_PAGE_DEPTH, use_registry=False)
    live = LiveService(settings, tiny_encoder)
    live.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=corpus()), timeout=120)
    yield live
    live.stop()


def seen(hit: pb.SearchHit) -> tuple[str, str, float]:
    """A hit as a client sees it: id, text and metadata (a deep hybrid pool is fetched without them)."""
    return hit.id, hit.text, float(hit.metadata["n"])  # type: ignore[arg-type]


def paged_hits(service: LiveService, mode: pb.RetrievalMode, page_size: int) -> list[tuple[str, str, float]]:
    """Every page's hits, in order, until the last page or the page that reaches MAX_PAGE_DEPTH."""
    got: list[tuple[str, str, float]] = []
    token = ""
    while True:
        response = service.stub.SearchDocuments(pb.SearchDocumentsRequest(
            query=QUERY, mode=mode, page_size=page_size, page_token=token), timeout=60)  # type: ignore[arg-type]
        got += [seen(hit) for hit in response.hits]
        token = response.next_page_token
        if not token or len(got) + page_size > MAX_PAGE_DEPTH:
            return got


@pytest.mark.parametrize("mode", MODES)
def test_pages_equal_the_single_request_of_their_depth(service: LiveService, mode: pb.RetrievalMode) -> None:
    single = service.stub.SearchDocuments(pb.SearchDocumentsRequest(
        query=QUERY, mode=mode, top_k=MAX_PAGE_DEPTH), timeout=60)
    deep = [seen(hit) for hit in single.hits]
    assert len(deep) == MAX_PAGE_DEPTH  # the collection holds more: the check reaches the deepest page
    for page_size in (3, 7, 10, 40):
        got = paged_hits(service, mode, page_size)
        assert len(got) == len(set(got)), f"page_size {page_size}: a hit repeated"
        reachable = MAX_PAGE_DEPTH - MAX_PAGE_DEPTH % page_size  # the last full page within max_page_depth
        assert got == deep[:reachable], f"page_size {page_size}: pages differ from the single request"
