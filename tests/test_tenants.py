"""Tenants over real gRPC and Milvus Lite: a key bound to tenant A never reaches tenant B, per RPC; rate limits."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from pydantic import ValidationError

from semsearch.config import ApiKey, Settings
from semsearch.encoders import TorchEncoder
from semsearch.v1 import search_pb2 as pb
from semsearch.v1 import search_pb2_grpc
from service.security import RateLimiter
from tests.conftest import LiveService

ADMIN, ACME, BETA, BOTH, LIMITED = ("admin-key-" + "a" * 32, "acme-key-" + "b" * 32, "beta-key-" + "c" * 32,
                                    "both-key-" + "d" * 32, "rate-key-" + "e" * 32)
KEYS = [
    {"name": "admin", "key": ADMIN, "scope": "admin"},
    {"name": "acme", "key": ACME, "scope": "write", "tenants": ["acme"]},
    {"name": "beta", "key": BETA, "scope": "write", "tenants": ["beta"]},
    {"name": "both", "key": BOTH, "scope": "search", "tenants": ["acme", "beta"]},
    {"name": "limited", "key": LIMITED, "scope": "search", "rate_limit_per_s": 0.5, "rate_burst": 2},
]
# Both tenants hold a document "shared" (ids are unique per tenant) and one of their own.
DOCS = {
    "acme": [("shared", "acme 的退款规则：七天无理由退款"), ("acme-only", "acme 会员积分怎么兑换")],
    "beta": [("shared", "beta 的退款规则：十五天内可退"), ("beta-only", "beta 发票如何开具")],
}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: TorchEncoder) -> Iterator[LiveService]:
    directory = tmp_path_factory.mktemp("tenants")
    settings = Settings(milvus_uri=str(directory / "milvus.db"), host="127.0.0.1", port=0, metrics_port=0,
                        collection="docs", use_registry=False, api_keys=KEYS)  # type: ignore[arg-type]
    live = LiveService(settings, tiny_encoder)
    for tenant, docs in DOCS.items():
        request = pb.UpsertDocumentsRequest(documents=[pb.Document(id=i, text=t, tenant=tenant) for i, t in docs])
        live.stub.UpsertDocuments(request, timeout=60, metadata=[("authorization", f"Bearer {ADMIN}")])
    yield live
    live.stop()


class Client:
    """The stub with one key."""

    def __init__(self, service: LiveService, key: str) -> None:
        self.stub = search_pb2_grpc.SearchServiceStub(service.channel)
        self.metadata = [("authorization", f"Bearer {key}")]

    def search(self, **fields: object) -> pb.SearchDocumentsResponse:
        fields.setdefault("query", "退款规则")
        fields.setdefault("top_k", 10)
        return self.stub.SearchDocuments(pb.SearchDocumentsRequest(**fields), timeout=30,  # type: ignore[arg-type]
                                         metadata=self.metadata)

    def batch(self, *requests: pb.SearchDocumentsRequest) -> pb.BatchSearchDocumentsResponse:
        return self.stub.BatchSearchDocuments(pb.BatchSearchDocumentsRequest(requests=list(requests)), timeout=30,
                                              metadata=self.metadata)

    def get(self, doc_id: str, tenant: str = "") -> pb.Document:
        return self.stub.GetDocument(pb.GetDocumentRequest(id=doc_id, tenant=tenant), timeout=30,
                                     metadata=self.metadata).document

    def upsert(self, *docs: pb.Document) -> int:
        return self.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=list(docs)), timeout=60,
                                         metadata=self.metadata).upserted_count

    def delete(self, **fields: object) -> int:
        return self.stub.DeleteDocuments(pb.DeleteDocumentsRequest(**fields), timeout=30,  # type: ignore[arg-type]
                                         metadata=self.metadata).deleted_count


def texts(response: pb.SearchDocumentsResponse) -> set[str]:
    return {hit.text for hit in response.hits}


def expect(call: Callable[[], object], code: grpc.StatusCode, reason: str = "") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert reason in (info.value.details() or ""), info.value.details()
    return info.value


def tenant_texts(tenant: str) -> set[str]:
    return {t for _, t in DOCS[tenant]}


def test_search_sees_only_the_keys_tenant(service: LiveService) -> None:
    acme = Client(service, ACME)
    assert texts(acme.search()) == tenant_texts("acme")
    assert texts(acme.search(tenant="acme")) == tenant_texts("acme")
    assert texts(Client(service, BETA).search()) == tenant_texts("beta")
    denied = expect(lambda: acme.search(tenant="beta"), grpc.StatusCode.PERMISSION_DENIED, "may not use tenant 'beta'")
    assert "beta 的" not in (denied.details() or "")
    # A filter cannot widen the tenant: conditions are ANDed with it.
    group = pb.FilterGroup(operator=pb.LOGICAL_OPERATOR_NOT, filters=[pb.MetadataFilter(
        field="x", operator=pb.FILTER_OPERATOR_EXISTS)])
    assert texts(acme.search(filter=group)) == tenant_texts("acme")
    # The unbound key reaches any tenant it names; the default tenant is empty here.
    admin = Client(service, ADMIN)
    assert texts(admin.search(tenant="beta")) == tenant_texts("beta")
    assert texts(admin.search()) == set()


def test_batch_search_checks_every_query(service: LiveService) -> None:
    acme = Client(service, ACME)
    ok = acme.batch(pb.SearchDocumentsRequest(query="退款", top_k=10),
                    pb.SearchDocumentsRequest(query="积分", top_k=10, tenant="acme"))
    assert all(texts(r) <= tenant_texts("acme") for r in ok.responses)
    expect(lambda: acme.batch(pb.SearchDocumentsRequest(query="退款", top_k=10),
                              pb.SearchDocumentsRequest(query="发票", top_k=10, tenant="beta")),
           grpc.StatusCode.PERMISSION_DENIED, "requests[1].tenant")


def test_page_tokens_do_not_cross_tenants(service: LiveService) -> None:
    acme, beta = Client(service, ACME), Client(service, BETA)
    first = acme.search(page_size=1)
    assert first.next_page_token and texts(first) <= tenant_texts("acme")
    second = acme.search(page_size=1, page_token=first.next_page_token)
    assert texts(second) <= tenant_texts("acme") and not second.next_page_token
    # The same request body under another tenant's key: the token is bound to the acme tenant.
    expect(lambda: beta.search(page_size=1, page_token=first.next_page_token), grpc.StatusCode.INVALID_ARGUMENT,
           "another query")


def test_get_reads_only_the_keys_tenant(service: LiveService) -> None:
    acme = Client(service, ACME)
    assert acme.get("shared").text == DOCS["acme"][0][1]
    assert acme.get("shared").tenant == "acme"
    assert Client(service, BETA).get("shared").text == DOCS["beta"][0][1]
    # Another tenant's document is as absent as one that does not exist: nothing tells them apart.
    missing = expect(lambda: acme.get("beta-only"), grpc.StatusCode.NOT_FOUND)
    absent = expect(lambda: acme.get("nowhere"), grpc.StatusCode.NOT_FOUND)
    assert (missing.details() or "").replace("beta-only", "X") == (absent.details() or "").replace("nowhere", "X")
    expect(lambda: acme.get("beta-only", tenant="beta"), grpc.StatusCode.PERMISSION_DENIED)


def test_upsert_writes_only_the_keys_tenant(service: LiveService) -> None:
    acme = Client(service, ACME)
    expect(lambda: acme.upsert(pb.Document(id="x", text="越界写入", tenant="beta")), grpc.StatusCode.PERMISSION_DENIED)
    expect(lambda: acme.upsert(pb.Document(id="ok", text="合法", tenant="acme"),
                               pb.Document(id="x", text="越界写入", tenant="beta")), grpc.StatusCode.PERMISSION_DENIED)
    assert acme.upsert(pb.Document(id="shared", text="acme 的退款规则：七天无理由退款")) == 1  # same id as beta's
    assert Client(service, BETA).get("shared").text == DOCS["beta"][0][1]
    expect(lambda: Client(service, BETA).get("ok"), grpc.StatusCode.NOT_FOUND)  # the refused call wrote nothing


def test_delete_and_count_only_the_keys_tenant(service: LiveService) -> None:
    acme, beta = Client(service, ACME), Client(service, BETA)
    assert acme.upsert(pb.Document(id="temp", text="acme 临时文档")) == 1
    # Counting: a dry run counts the caller's tenant only, whatever it asks for.
    assert acme.delete(delete_all=True, dry_run=True) == 3
    assert beta.delete(delete_all=True, dry_run=True) == 2
    expect(lambda: acme.delete(delete_all=True, dry_run=True, tenant="beta"), grpc.StatusCode.PERMISSION_DENIED)
    # By id: beta's documents of the same or other ids stay.
    assert acme.delete(ids=["beta-only"]) == 0
    assert beta.get("beta-only").text == DOCS["beta"][1][1]
    assert acme.delete(ids=["temp"]) == 1
    # By filter: everything matches, only acme's could go.
    everything = pb.FilterGroup(operator=pb.LOGICAL_OPERATOR_NOT, filters=[pb.MetadataFilter(
        field="nothing", operator=pb.FILTER_OPERATOR_EXISTS)])
    assert acme.delete(filter=everything, dry_run=True) == 2
    expect(lambda: acme.delete(filter=everything, tenant="beta"), grpc.StatusCode.PERMISSION_DENIED)
    assert beta.delete(delete_all=True, dry_run=True) == 2
    assert texts(beta.search()) == tenant_texts("beta")


def test_a_key_of_several_tenants_must_name_one(service: LiveService) -> None:
    both = Client(service, BOTH)
    expect(lambda: both.search(), grpc.StatusCode.INVALID_ARGUMENT, "bound to several tenants")
    assert texts(both.search(tenant="beta")) == tenant_texts("beta")
    expect(lambda: both.search(tenant="gamma"), grpc.StatusCode.PERMISSION_DENIED)
    expect(lambda: both.search(tenant="bad tenant!"), grpc.StatusCode.INVALID_ARGUMENT, "not allowed")


def test_per_key_rate_limit_answers_resource_exhausted_with_retry_after(service: LiveService) -> None:
    limited = Client(service, LIMITED)
    limited.search(tenant="acme")
    limited.search(tenant="acme")  # the burst of 2
    error = expect(lambda: limited.search(tenant="acme"), grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit")
    metadata: Any = error.trailing_metadata()  # type: ignore[attr-defined]
    trailers = {str(k): str(v) for k, v in metadata or ()}
    assert 1 <= int(trailers["retry-after"]) <= 2
    assert 0 < int(trailers["retry-after-ms"]) <= 2000
    Client(service, ACME).search()  # other keys are not limited by it


def test_rate_limiter_refills_at_its_rate() -> None:
    now = [100.0]
    limiter = RateLimiter(clock=lambda: now[0])
    key = ApiKey(name="k", key="x" * 32, rate_limit_per_s=2.0, rate_burst=2)  # type: ignore[arg-type]
    assert [limiter.wait_s(key) for _ in range(3)][:2] == [0.0, 0.0]
    now[0] += 0.1
    assert limiter.wait_s(key) == pytest.approx(0.5 - 0.1 * 1, abs=0.21)
    now[0] += 0.5
    assert limiter.wait_s(key) == 0.0


def test_key_tenants_are_validated() -> None:
    for tenant in ("", "has space", "x" * 64, "a#b"):
        with pytest.raises(ValidationError):
            ApiKey(name="k", key="x" * 32, tenants=[tenant])  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        ApiKey(name="k", key="x" * 32, rate_limit_per_s=0)  # type: ignore[arg-type]


def test_keys_with_tenants_parse_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEMSEARCH_API_KEYS", '[{"name": "web", "key": "k", "tenants": ["acme"], '
                                             '"rate_limit_per_s": 5}]')
    (key,) = Settings().api_keys
    assert key.tenants == ["acme"] and key.rate_limit_per_s == 5
