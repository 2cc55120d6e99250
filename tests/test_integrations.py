"""LangChain, LlamaIndex and Haystack retrievers (semsearch.integrations) against a running service that
serves the shipped Chinese FAQ with the packaged USE-Multilingual v3 encoder: each finds 「如何申请退款？」
for the paraphrase 「退钱怎么操作？」 (no shared words), sync and async, passes mode, filters, tenant,
top_k and rerank, and feeds a prompt (retriever -> prompt assembly; no LLM call)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

os.environ["HAYSTACK_TELEMETRY_ENABLED"] = "False"  # before haystack is imported: it would phone home
from google.protobuf import json_format
from haystack import Pipeline
from haystack.components.builders import PromptBuilder
from langchain_core.documents import Document as LangChainDocument
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from llama_index.core import PromptTemplate
from llama_index.core.schema import QueryBundle

from semsearch.config import Settings
from semsearch.encoders.use import UseEncoder
from semsearch.integrations import SearchOptions, search_request
from semsearch.integrations import haystack as hs
from semsearch.integrations import langchain as lc
from semsearch.integrations import llamaindex as li
from semsearch.v1 import search_pb2 as pb
from service.demo import read_corpus, shipped_corpus, to_document
from tests.conftest import LiveService

PARAPHRASE = "退钱怎么操作？"
ANSWER = "faq-001"  # 如何申请退款？


@pytest.fixture(scope="module")
def faq_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    """One service for the module: the FAQ in the default tenant and one entry in tenant `acme`."""
    path: Path = tmp_path_factory.mktemp("integrations")
    settings = Settings(milvus_uri=str(path / "milvus.db"), host="127.0.0.1", port=0, metrics_port=0,
                        collection="faq")
    service = LiveService(settings, UseEncoder())
    documents = [to_document(row) for row in read_corpus(shipped_corpus())]
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=documents))
    acme = pb.Document(id="acme-1", text="如何申请退款？请联系acme客服。", tenant="acme")
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[acme]))
    yield service
    service.stop()


def test_options_become_the_request() -> None:
    options = SearchOptions(top_k=3, mode="hybrid", filters={"category": "refund", "priority": [1, 2]},
                            filter={"operator": "LOGICAL_OPERATOR_NOT", "filters": [
                                {"field": "vip", "operator": "FILTER_OPERATOR_EQ", "value": {"boolValue": True}}]},
                            tenant="acme", rerank=True, rerank_candidates=20, min_score=0.1)
    request = search_request("q", options)
    assert json_format.MessageToDict(request) == {
        "query": "q", "topK": 3, "mode": "RETRIEVAL_MODE_HYBRID", "tenant": "acme", "rerank": True,
        "rerankCandidates": 20, "minScore": 0.1,
        "filters": [{"field": "category", "operator": "FILTER_OPERATOR_EQ", "value": {"stringValue": "refund"}},
                    {"field": "priority", "operator": "FILTER_OPERATOR_IN",
                     "values": [{"intValue": "1"}, {"intValue": "2"}]}],
        "filter": {"operator": "LOGICAL_OPERATOR_NOT", "filters": [
            {"field": "vip", "operator": "FILTER_OPERATOR_EQ", "value": {"boolValue": True}}]},
    }
    with pytest.raises(ValueError, match="mode must be one of"):
        search_request("q", SearchOptions(mode="semantic"))  # type: ignore[arg-type]
    group = hs.haystack_filter({"operator": "OR", "conditions": [
        {"field": "meta.category", "operator": "==", "value": "refund"},
        {"operator": "NOT", "conditions": [{"field": "meta.priority", "operator": "in", "value": [1, 2]}]}]})
    assert json_format.MessageToDict(group) == {"operator": "LOGICAL_OPERATOR_OR", "filters": [
        {"field": "category", "operator": "FILTER_OPERATOR_EQ", "value": {"stringValue": "refund"}}], "groups": [
        {"operator": "LOGICAL_OPERATOR_NOT", "filters": [{"field": "priority", "operator": "FILTER_OPERATOR_IN",
                                                          "values": [{"intValue": "1"}, {"intValue": "2"}]}]}]}
    with pytest.raises(ValueError, match=r"meta\.<key>"):
        hs.haystack_filter({"field": "content", "operator": "==", "value": "x"})


def test_langchain_retriever_and_chain(faq_service: LiveService) -> None:
    retriever = lc.SemsearchRetriever(target=faq_service.address, top_k=3, mode="dense")
    documents = retriever.invoke(PARAPHRASE)
    assert documents[0].id == ANSWER and documents[0].page_content.startswith("如何申请退款？")
    meta = documents[0].metadata
    assert meta["category"] == "refund" and meta["semsearch_id"] == ANSWER and len(documents) == 3
    assert meta["semsearch_retrievers"]["dense"]["rank"] == 1 and meta["semsearch_score"] > 0
    for _ in range(2):  # two event loops, one after the other: each gets its own channel
        assert asyncio.run(retriever.ainvoke(PARAPHRASE))[0].id == ANSWER

    def context(docs: list[LangChainDocument]) -> str:
        return "\n".join(doc.page_content for doc in docs)

    prompt = ChatPromptTemplate.from_template("根据资料回答问题。\n资料：{context}\n问题：{question}")
    chain = {"context": retriever | context, "question": RunnablePassthrough()} | prompt
    text = chain.invoke(PARAPHRASE).to_string()
    assert "资料：如何申请退款？" in text and f"问题：{PARAPHRASE}" in text
    # Filters, tenant and mode reach the service.
    delivery = lc.SemsearchRetriever(target=faq_service.address, top_k=2, filters={"category": "delivery"})
    assert {doc.metadata["category"] for doc in delivery.invoke(PARAPHRASE)} == {"delivery"}
    acme = lc.SemsearchRetriever(target=faq_service.address, tenant="acme", mode="lexical")
    assert [doc.id for doc in acme.invoke("退款")] == ["acme-1"]
    assert set(acme.invoke("退款")[0].metadata["semsearch_retrievers"]) == {"lexical"}


def test_llamaindex_retriever_and_prompt(faq_service: LiveService) -> None:
    retriever = li.SemsearchRetriever(faq_service.address, top_k=3, mode="dense")
    nodes = retriever.retrieve(PARAPHRASE)
    assert nodes[0].node.node_id == ANSWER and nodes[0].score == pytest.approx(
        nodes[0].node.metadata["semsearch_score"])
    assert nodes[0].node.metadata["category"] == "refund"
    for _ in range(2):
        assert asyncio.run(retriever.aretrieve(QueryBundle(PARAPHRASE)))[0].node.node_id == ANSWER
    context = "\n".join(node.node.get_content(metadata_mode="llm") for node in nodes)  # type: ignore[arg-type]
    assert "semsearch_score" not in context  # the retriever's keys stay out of the LLM's text
    prompt = PromptTemplate("资料：{context_str}\n问题：{query_str}").format(context_str=context,
                                                                          query_str=PARAPHRASE)
    assert "如何申请退款？" in prompt
    hybrid = li.SemsearchRetriever(faq_service.address, top_k=5, mode="hybrid", filters={"category": "refund"})
    hits = hybrid.retrieve(PARAPHRASE)
    assert len(hits) == 5 and {hit.node.metadata["category"] for hit in hits} == {"refund"}


def test_haystack_component_in_a_pipeline(faq_service: LiveService) -> None:
    pipeline = Pipeline()
    pipeline.add_component("retriever", hs.SemsearchRetriever(faq_service.address, top_k=3, mode="dense"))
    pipeline.add_component("prompt", PromptBuilder(
        template="资料：{% for doc in documents %}{{ doc.content }}\n{% endfor %}问题：{{ query }}",
        required_variables=["documents", "query"]))
    pipeline.connect("retriever.documents", "prompt.documents")
    answer = pipeline.run({"retriever": {"query": PARAPHRASE}, "prompt": {"query": PARAPHRASE}},
                          include_outputs_from={"retriever"})
    documents = answer["retriever"]["documents"]
    assert documents[0].id == ANSWER and documents[0].score == pytest.approx(documents[0].meta["semsearch_score"])
    assert answer["prompt"]["prompt"].startswith("资料：如何申请退款？")
    asynchronous = asyncio.run(pipeline.run_async({"retriever": {"query": PARAPHRASE},
                                                   "prompt": {"query": PARAPHRASE}}))
    assert asynchronous["prompt"]["prompt"].startswith("资料：如何申请退款？")
    component = hs.SemsearchRetriever(faq_service.address, top_k=4)
    filtered = component.run(PARAPHRASE, filters={"field": "meta.category", "operator": "==", "value": "delivery"})
    assert {doc.meta["category"] for doc in filtered["documents"]} == {"delivery"}
    restored = hs.SemsearchRetriever.from_dict(component.to_dict())
    assert restored.to_dict() == component.to_dict() and "SEMSEARCH_API_KEY" in str(component.to_dict())


def test_rerank_is_passed_to_the_service(faq_service: LiveService) -> None:
    """This service has no reranker: the request's `rerank` reaches it and is refused."""
    with pytest.raises(grpc.RpcError) as raised:
        lc.SemsearchRetriever(target=faq_service.address, rerank=True).invoke(PARAPHRASE)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no reranker" in str(raised.value.details())
    with pytest.raises(grpc.RpcError):
        li.SemsearchRetriever(faq_service.address, rerank=True).retrieve(PARAPHRASE)
    with pytest.raises(grpc.RpcError):
        hs.SemsearchRetriever(faq_service.address, rerank=True).run(PARAPHRASE)
