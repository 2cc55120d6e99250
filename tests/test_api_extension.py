"""The v1 API extension over real gRPC and Milvus Lite: min_score, paging, filter groups, delete by filter,
collections made before tenants."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from pymilvus import DataType, MilvusClient

from semsearch.config import Settings
from semsearch.encoders import TorchEncoder
from semsearch.filters import TenantFilter
from semsearch.reembed import copy_rows, remove_orphans
from semsearch.store import ChunkRow, MilvusStore, model_record, versioned_name
from semsearch.v1 import search_pb2 as pb
from service.engine import build_pair
from tests.conftest import LiveService

DOCS = [
    ("refund", "如何申请退款？请在订单页面点击申请退款",
     {"category": "refund", "priority": 1, "tags": ["money", "order"]}),
    ("delivery", "快递包裹几天没动静，物流一直在运输中", {"category": "delivery", "priority": 2, "tags": ["order"]}),
    ("device", "手机开不了机，电池发热怎么办", {"category": "device", "priority": 2, "tags": ["hardware"]}),
    ("password", "密码忘记了，如何找回账号登录", {"category": "account", "priority": 3}),
    ("invoice", "发票抬头写错能改吗", {"category": "invoice", "priority": 1, "tags": ["money"], "vip": None}),
    ("refund2", "退款多久到账？退款会原路退回", {"category": "refund", "priority": 2, "tags": ["money"]}),
    ("coupon", "优惠券为什么不能用，订单提示不满足条件",
     {"category": "promo", "priority": 3, "tags": ["order", "money"]}),
    ("address", "下单后可以修改收货地址吗", {"category": "delivery", "priority": 1, "tags": ["order"]}),
]
QUERY = "我想退款，订单怎么退钱"


def document(doc_id: str, text: str, metadata: dict[str, object], tenant: str = "") -> pb.Document:
    doc = pb.Document(id=doc_id, text=text, tenant=tenant)
    json_format.ParseDict(metadata, doc.metadata)
    return doc


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: TorchEncoder) -> Iterator[LiveService]:
    directory = tmp_path_factory.mktemp("api")
    settings = Settings(milvus_uri=str(directory / "milvus.db"), host="127.0.0.1", port=0, metrics_port=0,
                        collection="docs", max_page_depth=40, use_registry=False)
    live = LiveService(settings, tiny_encoder)
    live.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[document(*d) for d in DOCS]), timeout=60)
    yield live
    live.stop()


def search(service: LiveService, **fields: object) -> pb.SearchDocumentsResponse:
    fields.setdefault("query", QUERY)
    return service.stub.SearchDocuments(pb.SearchDocumentsRequest(**fields), timeout=30)  # type: ignore[arg-type]


def expect(call: Callable[[], object], code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert reason in (info.value.details() or ""), info.value.details()


def ids(response: pb.SearchDocumentsResponse) -> list[str]:
    return [hit.id for hit in response.hits]


# ---------------------------------------------------------------------------------------- min_score
@pytest.mark.parametrize("mode", [pb.RETRIEVAL_MODE_DENSE, pb.RETRIEVAL_MODE_LEXICAL, pb.RETRIEVAL_MODE_HYBRID])
def test_min_score_keeps_exactly_the_hits_at_or_above_it(service: LiveService, mode: int) -> None:
    everything = search(service, top_k=len(DOCS), mode=mode)
    scores = [hit.score for hit in everything.hits]
    assert len(scores) >= 3
    threshold = scores[len(scores) // 2]  # a real score: hits equal to it are kept
    if mode == pb.RETRIEVAL_MODE_HYBRID:
        # A fused score moves (~1e-3) with its candidates' distribution between calls (near-ties of the
        # random model): a threshold between two clearly separated scores.
        gaps = [(high - low, (high + low) / 2) for high, low in itertools.pairwise(scores)]
        threshold = max(gaps)[1]
    cut = search(service, top_k=len(DOCS), mode=mode, min_score=threshold)
    assert ids(cut) == [hit.id for hit in everything.hits if hit.score >= threshold]
    assert 0 < len(cut.hits) < len(everything.hits)
    assert search(service, top_k=len(DOCS), mode=mode, min_score=max(scores) + 1.0).hits == []


def test_min_score_must_be_finite(service: LiveService) -> None:
    expect(lambda: search(service, min_score=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "min_score")


# ---------------------------------------------------------------------------------------- paging
def pages(service: LiveService, page_size: int, **fields: object) -> list[pb.SearchDocumentsResponse]:
    out, token = [], ""
    while True:
        response = search(service, page_size=page_size, page_token=token, **fields)
        out.append(response)
        token = response.next_page_token
        if not token:
            return out
        assert len(out) < 20


@pytest.mark.parametrize("mode", [pb.RETRIEVAL_MODE_DENSE, pb.RETRIEVAL_MODE_HYBRID])
def test_pages_cover_the_ranking_once_in_a_stable_order(service: LiveService, mode: int) -> None:
    everything = search(service, top_k=len(DOCS), mode=mode)
    assert everything.next_page_token == ""  # no paging asked: never a token
    got = pages(service, 3, mode=mode)
    assert [len(p.hits) for p in got] == [3, 3, 2]  # no empty last page
    hits = [hit for page in got for hit in page.hits]
    assert [h.id for h in hits] == ids(everything)
    keys = [(-h.score, h.id) for h in hits]
    assert keys == sorted(keys)


def test_page_size_may_change_between_pages(service: LiveService) -> None:
    first = search(service, page_size=2)
    second = search(service, page_size=5, page_token=first.next_page_token)
    assert ids(first) + ids(second) == ids(search(service, top_k=7))


def test_page_token_is_bound_to_its_query_and_signed(service: LiveService) -> None:
    token = search(service, page_size=2).next_page_token
    assert token
    expect(lambda: search(service, query="发票", page_size=2, page_token=token),
           grpc.StatusCode.INVALID_ARGUMENT, "another query")
    filters = [pb.MetadataFilter(field="priority", operator=pb.FILTER_OPERATOR_GTE,
                                 value=pb.FilterValue(int_value=1))]
    expect(lambda: search(service, filters=filters, page_size=2, page_token=token),
           grpc.StatusCode.INVALID_ARGUMENT, "another query")
    payload, mac = token.split(".")
    forged = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB") + "." + mac
    for bad in (forged, "not-a-token", token + "x", "." * 2000):
        expect(lambda bad=bad: search(service, page_size=2, page_token=bad),  # type: ignore[misc]
               grpc.StatusCode.INVALID_ARGUMENT, "not a page token of this service")
    expect(lambda: search(service, page_token=token), grpc.StatusCode.INVALID_ARGUMENT, "needs page_size")
    expect(lambda: search(service, page_size=-1), grpc.StatusCode.INVALID_ARGUMENT, "page_size")


def test_paging_depth_is_limited(service: LiveService) -> None:
    expect(lambda: search(service, page_size=41), grpc.StatusCode.INVALID_ARGUMENT, "max_page_depth")
    assert len(search(service, page_size=40).hits) == len(DOCS)


def test_page_token_from_before_a_swap_is_a_failed_precondition(service: LiveService) -> None:
    token = search(service, page_size=2).next_page_token
    engine = service.running.servicer.engine
    assert engine is not None

    async def swap_to(collection: str) -> None:
        pair = build_pair(service.settings, engine.pair.encoder, service.running.store, collection)
        old = engine.swap(pair)
        await old.batcher.close()

    service.run(swap_to("docs_promoted"))
    try:
        expect(lambda: search(service, page_size=2, page_token=token), grpc.StatusCode.FAILED_PRECONDITION,
               "search again from the first page")
    finally:
        service.run(swap_to("docs"))
    assert len(search(service, page_size=2, page_token=token).hits) == 2


# ---------------------------------------------------------------------------------------- filters
def f(field: str, operator: int, *values: object) -> pb.MetadataFilter:
    def typed(value: object) -> pb.FilterValue:
        if isinstance(value, bool):
            return pb.FilterValue(bool_value=value)
        if isinstance(value, int):
            return pb.FilterValue(int_value=value)
        return pb.FilterValue(string_value=str(value))

    item = pb.MetadataFilter(field=field, operator=operator)  # type: ignore[arg-type]
    if operator in (pb.FILTER_OPERATOR_IN, pb.FILTER_OPERATOR_NOT_IN, pb.FILTER_OPERATOR_CONTAINS_ANY,
                    pb.FILTER_OPERATOR_CONTAINS_ALL):
        item.values.extend(typed(v) for v in values)
    elif values:
        item.value.CopyFrom(typed(values[0]))
    return item


def found(service: LiveService, **fields: object) -> set[str]:
    return set(ids(search(service, top_k=50, **fields)))


def metadata_of(doc_id: str) -> dict[str, object]:
    return next(m for i, _, m in DOCS if i == doc_id)


def where(predicate: Callable[[dict[str, object]], bool]) -> set[str]:
    return {i for i, _, m in DOCS if predicate(m)}


def tags(m: dict[str, object]) -> list[object]:
    value = m.get("tags")
    return value if isinstance(value, list) else []


@pytest.mark.parametrize(("group", "expected"), [
    (pb.FilterGroup(operator=pb.LOGICAL_OPERATOR_OR, filters=[
        f("category", pb.FILTER_OPERATOR_EQ, "refund"), f("priority", pb.FILTER_OPERATOR_EQ, 3)]),
     where(lambda m: m["category"] == "refund" or m["priority"] == 3)),
    (pb.FilterGroup(operator=pb.LOGICAL_OPERATOR_NOT, filters=[f("category", pb.FILTER_OPERATOR_EQ, "refund")]),
     where(lambda m: m["category"] != "refund")),
    (pb.FilterGroup(operator=pb.LOGICAL_OPERATOR_AND, filters=[f("priority", pb.FILTER_OPERATOR_LTE, 2)], groups=[
        pb.FilterGroup(operator=pb.LOGICAL_OPERATOR_OR, filters=[
            f("category", pb.FILTER_OPERATOR_EQ, "delivery"), f("tags", pb.FILTER_OPERATOR_CONTAINS, "hardware")])]),
     where(lambda m: int(m["priority"]) <= 2  # type: ignore[call-overload]
           and (m["category"] == "delivery" or "hardware" in tags(m)))),
    (pb.FilterGroup(operator=pb.LOGICAL_OPERATOR_AND, filters=[f("tags", pb.FILTER_OPERATOR_EXISTS)]),
     where(lambda m: "tags" in m)),
    (pb.FilterGroup(operator=pb.LOGICAL_OPERATOR_AND, filters=[f("tags", pb.FILTER_OPERATOR_CONTAINS, "money")]),
     where(lambda m: "money" in tags(m))),
    (pb.FilterGroup(operator=pb.LOGICAL_OPERATOR_AND, filters=[
        f("tags", pb.FILTER_OPERATOR_CONTAINS_ANY, "hardware", "nothing")]),
     where(lambda m: "hardware" in tags(m))),
    (pb.FilterGroup(operator=pb.LOGICAL_OPERATOR_AND, filters=[
        f("tags", pb.FILTER_OPERATOR_CONTAINS_ALL, "money", "order")]),
     where(lambda m: {"money", "order"} <= set(tags(m)))),
])
def test_filter_groups_select_what_they_say(service: LiveService, group: pb.FilterGroup, expected: set[str]) -> None:
    assert expected and expected != {d[0] for d in DOCS}
    assert found(service, filter=group) == expected
    # ANDed with the flat filters
    flat = [f("priority", pb.FILTER_OPERATOR_EQ, 1)]
    assert found(service, filter=group, filters=flat) == {i for i in expected if metadata_of(i)["priority"] == 1}


def nested(depth: int) -> pb.FilterGroup:
    group = pb.FilterGroup(operator=pb.LOGICAL_OPERATOR_AND, filters=[f("priority", pb.FILTER_OPERATOR_EQ, 1)])
    for _ in range(depth - 1):
        group = pb.FilterGroup(operator=pb.LOGICAL_OPERATOR_OR, groups=[group])
    return group


def test_filter_groups_are_limited_and_typed(service: LiveService) -> None:
    assert found(service, filter=nested(5)) == where(lambda m: m["priority"] == 1)
    bad = [
        (nested(6), "deeper than 5"),
        (pb.FilterGroup(operator=pb.LOGICAL_OPERATOR_OR,
                        filters=[f("priority", pb.FILTER_OPERATOR_EQ, n) for n in range(65)]), "more than 64"),
        (pb.FilterGroup(filters=[f("priority", pb.FILTER_OPERATOR_EQ, 1)]), "filter.operator"),
        (pb.FilterGroup(operator=pb.LOGICAL_OPERATOR_OR), "at least one filter"),
        (pb.FilterGroup(operator=pb.LOGICAL_OPERATOR_OR, filters=[f("tags", pb.FILTER_OPERATOR_EXISTS, "x")]),
         "EXISTS takes neither"),
        (pb.FilterGroup(operator=pb.LOGICAL_OPERATOR_OR, filters=[f("tags", pb.FILTER_OPERATOR_CONTAINS_ANY)]),
         "1 to 256 values"),
        (pb.FilterGroup(operator=pb.LOGICAL_OPERATOR_OR, filters=[f("bad field", pb.FILTER_OPERATOR_EQ, 1)]),
         "not allowed"),
    ]
    for group, reason in bad:
        expect(lambda group=group: search(service, filter=group),  # type: ignore[misc]
               grpc.StatusCode.INVALID_ARGUMENT, reason)
    # A hostile value stays a literal: no expression can be smuggled through a string.
    injection = pb.FilterGroup(operator=pb.LOGICAL_OPERATOR_OR,
                               filters=[f("category", pb.FILTER_OPERATOR_EQ, 'x" or metadata["priority"] >= 0 or "')])
    assert found(service, filter=injection) == set()


# ---------------------------------------------------------------------------------------- delete by filter
def delete(service: LiveService, **fields: object) -> int:
    request = pb.DeleteDocumentsRequest(**fields)  # type: ignore[arg-type]
    return service.stub.DeleteDocuments(request, timeout=30).deleted_count


def test_delete_by_filter_with_a_dry_run(service: LiveService) -> None:
    tenant = "deletes"  # its own tenant: the module's other documents stay
    docs = [document(i, t, m, tenant) for i, t, m in DOCS]
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=docs), timeout=60)
    money = pb.FilterGroup(operator=pb.LOGICAL_OPERATOR_AND, filters=[f("tags", pb.FILTER_OPERATOR_CONTAINS, "money")])
    expected = where(lambda m: "money" in tags(m))
    assert delete(service, filter=money, dry_run=True, tenant=tenant) == len(expected)
    assert found(service, tenant=tenant) == {d[0] for d in DOCS}  # the dry run deleted nothing
    assert delete(service, filter=money, tenant=tenant) == len(expected)
    assert found(service, tenant=tenant) == {d[0] for d in DOCS} - expected
    assert delete(service, filter=money, tenant=tenant) == 0
    flat = [f("category", pb.FILTER_OPERATOR_EQ, "delivery")]
    assert delete(service, filters=flat, tenant=tenant, dry_run=True) == 2
    assert delete(service, ids=["device", "absent"], tenant=tenant, dry_run=True) == 1
    assert found(service, tenant=tenant) == {d[0] for d in DOCS} - expected
    # Everything of the tenant only with delete_all; the default tenant keeps its documents.
    for fields, reason in [({}, "delete_all"), ({"ids": ["a"], "filters": flat}, "exactly one"),
                           ({"delete_all": True, "filters": flat}, "exactly one")]:
        expect(lambda fields=fields: delete(service, tenant=tenant, **fields),  # type: ignore[misc]
               grpc.StatusCode.INVALID_ARGUMENT, reason)
    remaining = len(DOCS) - len(expected)
    assert delete(service, delete_all=True, dry_run=True, tenant=tenant) == remaining
    assert delete(service, delete_all=True, tenant=tenant) == remaining
    assert found(service, tenant=tenant) == set()
    assert found(service) == {d[0] for d in DOCS}


# ---------------------------------------------------------------------------------------- tenants, legacy collections
def create_pre_tenant_collection(uri: str, name: str, encoder: TorchEncoder) -> None:
    """A collection as semsearch made them before tenants (no tenant field)."""
    store = MilvusStore(uri, lexical_analyzer="none")
    try:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=528)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=512)
        schema.add_field("chunk_index", DataType.INT64)
        schema.add_field("text", DataType.VARCHAR, max_length=65535)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("char_offset", DataType.INT64)
        schema.add_field("updated_at", DataType.INT64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=encoder.manifest.dimension)
        index = MilvusClient.prepare_index_params()
        index.add_index(field_name="vector", index_type="HNSW", metric_type="COSINE", params={"M": 16,
                                                                                             "efConstruction": 64})
        store.client.create_collection(name, schema=schema, index_params=index,
                                       properties=model_record(encoder.manifest))
    finally:
        store.close()


def test_a_collection_made_before_tenants_serves_the_default_tenant_only(
        make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder, tmp_path: Path) -> None:
    uri = str(tmp_path / "legacy.db")
    create_pre_tenant_collection(uri, "legacy", tiny_encoder)
    service = make_service(tiny_encoder, milvus_uri=uri, collection="legacy", use_registry=False)
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[document(*d) for d in DOCS[:3]]), timeout=60)
    assert found(service) == {d[0] for d in DOCS[:3]}
    assert service.stub.GetDocument(pb.GetDocumentRequest(id="refund"), timeout=30).document.text == DOCS[0][1]
    upgrade = "semsearch promote"
    expect(lambda: search(service, tenant="acme"), grpc.StatusCode.FAILED_PRECONDITION, upgrade)
    expect(lambda: service.stub.GetDocument(pb.GetDocumentRequest(id="refund", tenant="acme"), timeout=30),
           grpc.StatusCode.FAILED_PRECONDITION, upgrade)
    expect(lambda: service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(
        documents=[document("x", "文本", {}, "acme")]), timeout=30), grpc.StatusCode.FAILED_PRECONDITION, upgrade)
    expect(lambda: delete(service, delete_all=True, tenant="acme"), grpc.StatusCode.FAILED_PRECONDITION, upgrade)
    assert delete(service, filters=[f("category", pb.FILTER_OPERATOR_EQ, "refund")]) == 1
    assert found(service) == {d[0] for d in DOCS[1:3]}


# ---------------------------------------------------------------------------------------- Milvus 2.3.5 server
@pytest.mark.milvus_server
def test_the_extension_on_the_milvus_server(make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder,
                                            milvus_server_uri: str, collection_name: str) -> None:
    """Partition-key tenants, range search, JSON array and EXISTS filters, delete by filter on Milvus 2.3.5."""
    live = make_service(tiny_encoder, milvus_uri=milvus_server_uri, collection=collection_name, use_registry=False)
    for tenant in ("", "acme"):
        live.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[document(*d, tenant) for d in DOCS]),
                                  timeout=60)
    everything = search(live, top_k=len(DOCS), tenant="acme")
    assert {hit.id for hit in everything.hits} == {d[0] for d in DOCS}
    threshold = everything.hits[3].score
    cut = search(live, top_k=len(DOCS), tenant="acme", min_score=threshold)
    assert ids(cut) == [hit.id for hit in everything.hits if hit.score >= threshold], (everything.hits, cut.hits)
    assert len(cut.hits) < len(DOCS)
    got = [hit for page in pages(live, 3, tenant="acme") for hit in page.hits]
    assert [h.id for h in got] == ids(everything)
    money = pb.FilterGroup(operator=pb.LOGICAL_OPERATOR_OR, filters=[
        f("tags", pb.FILTER_OPERATOR_CONTAINS, "hardware"), f("vip", pb.FILTER_OPERATOR_EXISTS)])
    # Milvus 2.3.5 counts a JSON null as present (Milvus Lite does not): "invoice" has vip: null.
    assert found(live, filter=money, tenant="acme") == {"device"} | where(lambda m: "vip" in m)
    assert delete(live, filter=money, tenant="acme", dry_run=True) == len(found(live, filter=money, tenant="acme"))
    assert delete(live, delete_all=True, tenant="acme") == len(DOCS)
    assert delete(live, delete_all=True, tenant="acme", dry_run=True) == 0  # counts read Strong
    for _ in range(50):  # searches read Session: Milvus 2.3 may show a delete a moment later
        if not found(live, tenant="acme"):
            break
        time.sleep(0.2)
    assert found(live, tenant="acme") == set()
    assert found(live) == {d[0] for d in DOCS}


def test_a_re_embedding_copy_keeps_every_rows_tenant(tmp_path: Path, tiny_encoder: TorchEncoder) -> None:
    """Promotion copies rows with their tenant (and tenant-scoped ids): isolation survives a model change."""
    store = MilvusStore(str(tmp_path / "copy.db"), lexical_analyzer="none")
    try:
        for name in ("source", "target"):
            store.create_collection(name, tiny_encoder.manifest)
        rows = []
        for tenant in ("", "acme", "beta"):
            vectors = tiny_encoder.encode_documents([f"{tenant} 文档 {i}" for i in range(2)])
            rows += [ChunkRow(f"doc{i}", 0, f"{tenant} 文档 {i}", vector, {"n": i}, tenant=tenant)
                     for i, vector in enumerate(vectors)]
        store.write_documents("source", rows)
        stats = copy_rows(store, "source", "target", tiny_encoder)
        assert stats.written == 6
        assert remove_orphans(store, "source", "target") == 0
        for tenant in ("", "acme", "beta"):
            copied = store.document_rows("target", ["doc0", "doc1"], tenant=tenant)
            assert [row["text"] for row in copied] == [f"{tenant} 文档 0", f"{tenant} 文档 1"]
        assert store.count_documents("target", [TenantFilter("acme")]) == 2
        assert store.delete_documents("target", ["doc0"], tenant="acme") == 1
        assert store.count_documents("target", []) == 5
    finally:
        store.close()


@pytest.mark.slow  # a `semsearch promote` subprocess: about a minute on a shared 2-core machine
def test_promotion_upgrades_a_collection_made_before_tenants(
        make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder, tiny_model_dir: Path,
        tmp_path: Path) -> None:
    """The upgrade the FAILED_PRECONDITION names: promote the same model; the copy has the tenant field."""
    uri = str(tmp_path / "milvus.db")
    physical = versioned_name("docs", tiny_encoder.manifest.version)
    create_pre_tenant_collection(uri, physical, tiny_encoder)
    store = MilvusStore(uri, lexical_analyzer="none")
    store.point_alias("docs", physical)
    store.close()
    service = make_service(tiny_encoder, milvus_uri=uri, registry_poll_s=0.2)
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[document(*d) for d in DOCS[:3]]), timeout=60)
    acme = pb.UpsertDocumentsRequest(documents=[document("refund", "acme 的退款", {}, "acme")])
    expect(lambda: service.stub.UpsertDocuments(acme, timeout=30), grpc.StatusCode.FAILED_PRECONDITION,
           "semsearch promote")
    result = subprocess.run(
        [sys.executable, "-m", "semsearch", "promote", str(tiny_model_dir), "--collection", "docs",
         "--milvus-uri", uri, "--force"],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "SEMSEARCH_REGISTRY_POLL_S": "0.2"},
    )
    assert result.returncode == 0, result.stderr
    for _ in range(100):
        try:
            service.stub.UpsertDocuments(acme, timeout=60)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
            time.sleep(0.2)
    else:
        raise AssertionError("the service never picked up the upgraded collection")
    upgraded = search(service, top_k=10)
    assert upgraded.collection.startswith(f"{physical}__")
    assert set(ids(upgraded)) == {d[0] for d in DOCS[:3]}  # the default tenant's documents were copied
    assert ids(search(service, top_k=10, tenant="acme")) == ["refund"]
    assert service.stub.GetDocument(pb.GetDocumentRequest(id="refund"), timeout=30).document.text == DOCS[0][1]


def test_new_fields_are_validated_with_a_reason(service: LiveService) -> None:
    bad_tenant = "a b"
    expect(lambda: service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(
        documents=[document("x", "文本", {}, bad_tenant)]), timeout=30), grpc.StatusCode.INVALID_ARGUMENT,
        "documents[0].tenant")
    expect(lambda: service.stub.GetDocument(pb.GetDocumentRequest(id="refund", tenant="x" * 64), timeout=30),
           grpc.StatusCode.INVALID_ARGUMENT, "tenant")
    expect(lambda: delete(service, delete_all=True, tenant="#"), grpc.StatusCode.INVALID_ARGUMENT, "tenant")
    expect(lambda: search(service, tenant=bad_tenant), grpc.StatusCode.INVALID_ARGUMENT, "tenant")
    expect(lambda: service.stub.BatchSearchDocuments(pb.BatchSearchDocumentsRequest(requests=[
        pb.SearchDocumentsRequest(query="退款"), pb.SearchDocumentsRequest(query="退款", page_size=-2)]), timeout=30),
        grpc.StatusCode.INVALID_ARGUMENT, "requests[1].page_size")
    expect(lambda: delete(service, filter=pb.FilterGroup(operator=pb.LOGICAL_OPERATOR_AND)),
           grpc.StatusCode.INVALID_ARGUMENT, "at least one filter")
    assert found(service) == {d[0] for d in DOCS}  # nothing changed
