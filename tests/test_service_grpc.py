"""The gRPC service over loopback: real server, real Milvus (Lite and server), real models."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from semsearch.config import Settings
from semsearch.encoders import TorchEncoder
from semsearch.errors import ModelMismatchError
from semsearch.store import MilvusStore, versioned_name
from semsearch.v1 import search_pb2 as pb
from service.server import LIVENESS_NAME, start_server
from tests.conftest import LiveService, free_port

FAQ = [
    ("refund", "如何申请退款？请在订单页面点击申请退款", {"category": "refund", "priority": 1}),
    ("delivery", "快递包裹几天没动静，物流一直在运输中", {"category": "delivery", "priority": 2}),
    ("device", "手机开不了机，电池发热怎么办", {"category": "device", "priority": 2}),
    ("password", "密码忘记了，如何找回账号登录", {"category": "account", "priority": 3}),
    ("invoice", "发票抬头写错能改吗", {"category": "invoice", "priority": 1}),
]


def document(doc_id: str, text: str, metadata: dict[str, object] | None = None) -> pb.Document:
    doc = pb.Document(id=doc_id, text=text)
    json_format.ParseDict(metadata or {}, doc.metadata)
    return doc


def seed(service: LiveService, extra: int = 0) -> None:
    docs = [document(i, t, m) for i, t, m in FAQ]
    docs += [document(f"filler-{n}", f"客服问题{n}：订单{n}的价格是多少", {"category": "other", "priority": 3})
             for n in range(extra)]
    response = service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=docs), timeout=60)
    assert response.upserted_count == len(docs)


def stored_count(service: LiveService) -> int:
    return service.running.store.count(service.running.servicer.engine.pair.collection.name)  # type: ignore[union-attr]


def expect_error(call: Callable[[], object], code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert reason in (info.value.details() or "")


def test_round_trip_on_lite_and_on_the_milvus_server(
    make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder, milvus_uri: str, collection_name: str,
) -> None:
    service = make_service(tiny_encoder, milvus_uri=milvus_uri, collection=collection_name)
    seed(service)
    # Without a mode the service picks (retrieval_mode auto): hybrid where the collection has BM25
    # (Milvus Lite), dense on a server without it (2.3.5).
    default = service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="如何申请退款？", top_k=3), timeout=30)
    lexical = not milvus_uri.startswith("http")  # Lite has BM25; the 2.3.5 server has none
    assert default.mode == (pb.RETRIEVAL_MODE_HYBRID if lexical else pb.RETRIEVAL_MODE_DENSE), default.mode
    response = service.stub.SearchDocuments(pb.SearchDocumentsRequest(
        query="如何申请退款？", top_k=3, mode=pb.RETRIEVAL_MODE_DENSE), timeout=30)
    assert len(response.hits) == 3
    assert [h.score for h in response.hits] == sorted((h.score for h in response.hits), reverse=True)
    assert response.model_version == tiny_encoder.manifest.version
    # A new name gets a versioned collection behind an alias of that name.
    assert response.collection == versioned_name(collection_name, tiny_encoder.manifest.version)
    assert response.timing.total_ms >= response.timing.encode_ms > 0
    # The hit scores are the cosine of the instruction-prefixed query and each document.
    query_vector = tiny_encoder.encode_queries(["如何申请退款？"])[0]
    texts = {doc_id: text for doc_id, text, _ in FAQ}
    for hit in response.hits:
        expected = float(tiny_encoder.encode_documents([texts[hit.id]])[0] @ query_vector)
        assert hit.score == pytest.approx(expected, abs=1e-4)
    filtered = service.stub.SearchDocuments(pb.SearchDocumentsRequest(
        query="退款", top_k=5, filters=[pb.MetadataFilter(
            field="category", operator=pb.FILTER_OPERATOR_IN,
            values=[pb.FilterValue(string_value="refund"), pb.FilterValue(string_value="invoice")])],
    ), timeout=30)
    assert {h.id for h in filtered.hits} == {"refund", "invoice"}
    got = service.stub.GetDocument(pb.GetDocumentRequest(id="device"), timeout=30)
    assert got.document.text == texts["device"]
    assert json_format.MessageToDict(got.document.metadata) == {"category": "device", "priority": 2}
    deleted = service.stub.DeleteDocuments(pb.DeleteDocumentsRequest(ids=["device", "nope"]), timeout=30)
    assert deleted.deleted_count == 1
    expect_error(lambda: service.stub.GetDocument(pb.GetDocumentRequest(id="device"), timeout=30),
                 grpc.StatusCode.NOT_FOUND, "device")


def test_real_weights_rank_the_paraphrase_first(make_service: Callable[..., LiveService],
                                                 minilm_encoder: TorchEncoder) -> None:
    service = make_service(minilm_encoder)
    docs = [document("refund", "How do I get my money back for an order?"),
            document("parcel", "My parcel has not moved for several days"),
            document("phone", "The phone does not turn on any more")]
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=docs), timeout=60)
    for query, expected in (("refund please", "refund"), ("where is my package", "parcel"),
                            ("device is dead", "phone")):
        response = service.stub.SearchDocuments(pb.SearchDocumentsRequest(query=query, top_k=1), timeout=30)
        assert response.hits[0].id == expected


def test_batch_search_equals_single_searches(make_service: Callable[..., LiveService],
                                             tiny_encoder: TorchEncoder) -> None:
    service = make_service(tiny_encoder)
    seed(service)
    queries = ["退款", "快递没动静", "开不了机", "忘记密码"]
    batch = service.stub.BatchSearchDocuments(pb.BatchSearchDocumentsRequest(
        requests=[pb.SearchDocumentsRequest(query=q, top_k=5, mode=pb.RETRIEVAL_MODE_DENSE) for q in queries]),
        timeout=30)
    assert len(batch.responses) == len(queries)
    for query, response in zip(queries, batch.responses, strict=True):
        # Dense: its scores are cosines, comparable to 1e-5 (a fused score also moves with the
        # candidates' distribution, which near-ties of the random model shift).
        single = service.stub.SearchDocuments(pb.SearchDocumentsRequest(
            query=query, top_k=5, mode=pb.RETRIEVAL_MODE_DENSE), timeout=30)
        # Same documents and scores; near-ties of the random model may swap places.
        assert {h.id: h.score for h in response.hits} == pytest.approx({h.id: h.score for h in single.hits},
                                                                         abs=1e-5)


def test_top_k_is_coerced_not_rejected(make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder) -> None:
    service = make_service(tiny_encoder, max_top_k=12, default_top_k=10)
    seed(service, extra=20)
    search = service.stub.SearchDocuments
    assert len(search(pb.SearchDocumentsRequest(query="订单价格", top_k=0), timeout=30).hits) == 10
    assert len(search(pb.SearchDocumentsRequest(query="订单价格", top_k=1000), timeout=30).hits) == 12
    assert len(search(pb.SearchDocumentsRequest(query="订单价格", top_k=3), timeout=30).hits) == 3
    expect_error(lambda: search(pb.SearchDocumentsRequest(query="订单价格", top_k=-1), timeout=30),
                 grpc.StatusCode.INVALID_ARGUMENT, "top_k")


def _bad_requests(settings: Settings) -> list[tuple[str, Callable[[LiveService], object], str]]:
    def search(**kwargs: object) -> Callable[[LiveService], object]:
        return lambda s: s.stub.SearchDocuments(pb.SearchDocumentsRequest(**kwargs), timeout=30)

    def upsert(*docs: pb.Document) -> Callable[[LiveService], object]:
        return lambda s: s.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=list(docs)), timeout=30)

    eq = pb.FILTER_OPERATOR_EQ
    deep: dict[str, object] = {"v": 1}
    for _ in range(10):
        deep = {"n": deep}
    return [
        ("empty query", search(query=""), "query is empty"),
        ("blank query", search(query="   "), "query is empty"),
        ("over-long query", search(query="退" * (settings.max_query_chars + 1)), "limit"),
        ("only invisible characters", search(query="\x00\u200b\ufeff"), "query is empty"),
        ("negative top_k", search(query="退款", top_k=-5), "top_k"),
        ("filter without operator", search(query="退款", filters=[pb.MetadataFilter(
            field="category", value=pb.FilterValue(string_value="a"))]), "operator"),
        ("filter without value", search(query="退款", filters=[pb.MetadataFilter(field="category", operator=eq)]),
         "value is not set"),
        ("filter field injection", search(query="退款", filters=[pb.MetadataFilter(
            field='category"] == "a" or true or metadata["x', operator=eq,
            value=pb.FilterValue(string_value="a"))]), "not allowed"),
        ("ordering a string", search(query="退款", filters=[pb.MetadataFilter(
            field="priority", operator=pb.FILTER_OPERATOR_GT, value=pb.FilterValue(string_value="a"))]),
         "needs a number"),
        ("IN without values", search(query="退款", filters=[pb.MetadataFilter(
            field="priority", operator=pb.FILTER_OPERATOR_IN)]), "values"),
        ("unspecified return field", search(query="退款", return_fields=[pb.RETURN_FIELD_UNSPECIFIED]),
         "return_fields"),
        ("empty batch", lambda s: s.stub.BatchSearchDocuments(pb.BatchSearchDocumentsRequest(), timeout=30),
         "requests is empty"),
        ("empty upsert", upsert(), "documents is empty"),
        ("document without id", upsert(document("", "文本")), "id is empty"),
        ("document without text", upsert(document("x", " ")), "text is empty"),
        ("over-long id", upsert(document("x" * 600, "文本")), "longer than"),
        ("duplicate ids", upsert(document("x", "一"), document("x", "二")), "twice"),
        ("over-long text", upsert(document("x", "退" * (settings.max_document_chars + 1))), "limit"),
        ("deep metadata", upsert(document("x", "文本", deep)), "nested"),
        ("huge metadata", upsert(document("x", "文本", {"blob": "字" * settings.max_metadata_bytes})), "bytes"),
        ("empty delete", lambda s: s.stub.DeleteDocuments(pb.DeleteDocumentsRequest(), timeout=30), "ids is empty"),
        ("empty get", lambda s: s.stub.GetDocument(pb.GetDocumentRequest(), timeout=30), "id is empty"),
    ]


def test_bad_input_is_rejected_with_a_reason_and_nothing_changes(
    make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder,
) -> None:
    service = make_service(tiny_encoder)
    seed(service)
    before = stored_count(service)
    for name, call, reason in _bad_requests(service.settings):
        with pytest.raises(grpc.RpcError) as info:
            call(service)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert reason in (info.value.details() or ""), (name, info.value.details())
    assert stored_count(service) == before
    assert service.stub.GetDocument(pb.GetDocumentRequest(id="refund"), timeout=30).document.text == FAQ[0][1]


def test_upsert_is_idempotent_and_long_documents_are_chunked(
    make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder,
) -> None:
    service = make_service(tiny_encoder)
    long_text = "".join(f"第{n}条：如何申请退款？请在订单页面点击申请退款。" for n in range(40))
    for _ in range(2):
        service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[document("long", long_text)]), timeout=60)
    chunks = stored_count(service)
    assert chunks > 1  # the tiny model's limit is 128 tokens
    assert service.stub.GetDocument(pb.GetDocumentRequest(id="long"), timeout=30).document.text == long_text
    as_documents = service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="退款", top_k=5), timeout=30)
    assert [h.id for h in as_documents.hits] == ["long"]
    as_chunks = service.stub.SearchDocuments(
        pb.SearchDocumentsRequest(query="退款", top_k=5, return_chunks=True), timeout=30)
    assert len(as_chunks.hits) == min(5, chunks)
    assert len({h.chunk_index for h in as_chunks.hits}) == len(as_chunks.hits)
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[document("long", "短文本")]), timeout=60)
    assert stored_count(service) == 1


def test_health_is_not_serving_until_the_model_is_warm_and_reflection_lists_the_api(
    tmp_path: Path, tiny_encoder: TorchEncoder,
) -> None:
    async def scenario() -> None:
        settings = Settings(milvus_uri=str(tmp_path / "m.db"), port=0, collection="docs")
        running = await start_server(settings)
        try:
            async with grpc.aio.insecure_channel(running.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                name = "semsearch.v1.SearchService"
                status = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
                # Alive while loading (the chart's startup probe, not liveness, waits for the model).
                alive = await health.Check(health_pb2.HealthCheckRequest(service=LIVENESS_NAME), timeout=10)
                assert alive.status == health_pb2.HealthCheckResponse.SERVING
                from semsearch.v1 import search_pb2_grpc

                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await search_pb2_grpc.SearchServiceStub(channel).SearchDocuments(
                        pb.SearchDocumentsRequest(query="退款"), timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                await running.load(tiny_encoder)
                for service_name in ("", name):
                    status = await health.Check(health_pb2.HealthCheckRequest(service=service_name), timeout=10)
                    assert status.status == health_pb2.HealthCheckResponse.SERVING
                reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
                responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
                    list_services="")]))
                names: set[str] = set()
                async for response in responses:  # an empty stream must fail below, not skip the check
                    names = {s.name for s in response.list_services_response.service}
                    break
                assert {name, "grpc.health.v1.Health"} <= names
        finally:
            await running.stop(grace_s=1)

    asyncio.run(scenario())


class SlowEncoder:
    """The tiny model, slowed down: makes queueing observable without a big model."""

    def __init__(self, inner: TorchEncoder, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s
        self.batch_sizes: list[int] = []

    @property
    def manifest(self):  # type: ignore[no-untyped-def]
        return self.inner.manifest

    def encode_queries(self, queries: Sequence[str], *, timeout_s: float | None = None) -> np.ndarray:
        self.batch_sizes.append(len(queries))
        time.sleep(self.delay_s)
        return self.inner.encode_queries(queries)

    def encode_documents(self, documents: Sequence[str], *, timeout_s: float | None = None) -> np.ndarray:
        return self.inner.encode_documents(documents)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self.inner.count_tokens(texts)

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _concurrent_searches(service: LiveService, count: int) -> list[grpc.StatusCode]:
    barrier = threading.Barrier(count)

    def one(n: int) -> grpc.StatusCode:
        barrier.wait()
        try:
            service.stub.SearchDocuments(pb.SearchDocumentsRequest(query=f"退款{n}", top_k=1), timeout=60)
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_concurrent_searches_share_forward_passes(make_service: Callable[..., LiveService],
                                                  tiny_encoder: TorchEncoder) -> None:
    slow = SlowEncoder(tiny_encoder, delay_s=0.2)
    service = make_service(slow, microbatch_max_size=64)
    seed(service)
    slow.batch_sizes.clear()
    codes = _concurrent_searches(service, 24)
    assert codes == [grpc.StatusCode.OK] * 24
    assert sum(slow.batch_sizes) == 24
    assert max(slow.batch_sizes) > 1 and len(slow.batch_sizes) < 24


def test_full_queue_answers_resource_exhausted(make_service: Callable[..., LiveService],
                                               tiny_encoder: TorchEncoder) -> None:
    slow = SlowEncoder(tiny_encoder, delay_s=0.3)
    service = make_service(slow, microbatch_queue_size=2, microbatch_max_size=1)
    codes = _concurrent_searches(service, 16)
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert grpc.StatusCode.OK in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_service_refuses_a_collection_of_another_model(tmp_path: Path, tiny_encoder: TorchEncoder,
                                                       minilm_encoder: TorchEncoder) -> None:
    uri = str(tmp_path / "m.db")
    store = MilvusStore(uri)
    store.ensure_collection("docs", minilm_encoder.manifest)
    store.close()

    async def scenario() -> None:
        running = await start_server(Settings(milvus_uri=uri, port=0, collection="docs"))
        try:
            with pytest.raises(ModelMismatchError, match="all-MiniLM-L6-v2"):
                await running.load(tiny_encoder)
        finally:
            await running.stop(grace_s=0)

    asyncio.run(scenario())


def test_admin_service_goes_through_the_rpc_wrapper(make_service: Callable[..., LiveService],
                                                    tiny_encoder: TorchEncoder) -> None:
    from semsearch.metrics import RPC_REQUESTS
    from semsearch.v1 import admin_pb2, admin_pb2_grpc

    service = make_service(tiny_encoder)
    counted = RPC_REQUESTS.labels(method="GetServingState", code="OK")
    before = counted._value.get()
    admin = admin_pb2_grpc.AdminServiceStub(service.channel)
    state = admin.GetServingState(admin_pb2.GetServingStateRequest(), timeout=10,
                                  metadata=[("x-request-id", "admin-test-1")])
    assert state.current.model_version == tiny_encoder.manifest.version
    assert counted._value.get() == before + 1  # metrics per method and status, like SearchService
    reloaded = admin.ReloadServingState(admin_pb2.ReloadServingStateRequest(), timeout=10)
    assert reloaded.state.name == state.name


def test_describe_collection_counts_documents_chunks_and_metadata_fields(
        make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder) -> None:
    from semsearch.config import ApiKey
    from semsearch.v1 import admin_pb2, admin_pb2_grpc

    keys = [ApiKey(name="admin", key="admin-key-0123456789", scope="admin"),  # type: ignore[arg-type]
            ApiKey(name="reader", key="read-key-0123456789a", scope="search")]  # type: ignore[arg-type]
    service = make_service(tiny_encoder, http_port=free_port(), api_keys=keys)
    admin_key = [("authorization", "Bearer admin-key-0123456789")]
    long_text = "。".join(f"第{i}条关于退款和发票的说明文字" for i in range(60))  # several chunks
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[
        pb.Document(id="a", text="如何申请退款？", metadata=json_format.ParseDict({"category": "refund"}, Struct())),
        pb.Document(id="b", text=long_text, metadata=json_format.ParseDict({"lang": "zh", "page": 3}, Struct())),
        pb.Document(id="c", text="发票抬头写错能改吗")]), timeout=30, metadata=admin_key)
    admin = admin_pb2_grpc.AdminServiceStub(service.channel)
    described = admin.DescribeCollection(admin_pb2.DescribeCollectionRequest(), timeout=30, metadata=admin_key)
    store, collection = service.running.store, described.collection
    rows = list(store.iter_rows(collection, ["doc_id", "chunk_index"]))
    assert described.documents == 3 and described.chunks == len(rows) > 3
    assert list(described.metadata_fields) == ["category", "lang", "page"]
    assert described.model_version == tiny_encoder.manifest.version and described.name == service.settings.collection
    assert described.lexical and not described.tuned_retrieval
    url = f"http://127.0.0.1:{service.running.http_port}/v1/admin/collection"
    over_http = httpx.get(url, headers={"authorization": "Bearer admin-key-0123456789"}).json()
    assert (over_http["documents"], over_http["chunks"]) == (str(3), str(len(rows)))  # int64: JSON strings
    assert httpx.get(url, headers={"authorization": "Bearer read-key-0123456789a"}).status_code == 403
    with pytest.raises(grpc.RpcError) as denied:
        admin.DescribeCollection(admin_pb2.DescribeCollectionRequest(), timeout=30,
                                 metadata=[("authorization", "Bearer read-key-0123456789a")])
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
