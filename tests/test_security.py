"""API keys with scopes, TLS and mutual TLS, and Prometheus metrics on their own port."""

from __future__ import annotations

import contextlib
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from semsearch.config import ApiKey
from semsearch.encoders import TorchEncoder
from semsearch.store import versioned_name
from semsearch.v1 import search_pb2 as pb
from semsearch.v1 import search_pb2_grpc
from service.security import find_key, required_scope
from tests.conftest import LiveService, free_port

KEYS = [
    ApiKey(name="reader", key="read-key-0123456789", scope="search"),  # type: ignore[arg-type]
    ApiKey(name="writer", key="write-key-0123456789", scope="write"),  # type: ignore[arg-type]
]


def call_with(stub: search_pb2_grpc.SearchServiceStub, key: str | None, method: str) -> grpc.StatusCode:
    metadata = [("authorization", f"Bearer {key}")] if key else []
    requests = {
        "search": lambda: stub.SearchDocuments(pb.SearchDocumentsRequest(query="退款"), timeout=30, metadata=metadata),
        "upsert": lambda: stub.UpsertDocuments(pb.UpsertDocumentsRequest(
            documents=[pb.Document(id="a", text="如何申请退款？")]), timeout=30, metadata=metadata),
        "delete": lambda: stub.DeleteDocuments(pb.DeleteDocumentsRequest(ids=["zz"]), timeout=30, metadata=metadata),
    }
    try:
        requests[method]()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_api_keys_and_scopes(make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder) -> None:
    service = make_service(tiny_encoder, api_keys=KEYS)
    stub = service.stub
    assert call_with(stub, None, "search") == grpc.StatusCode.UNAUTHENTICATED
    assert call_with(stub, "wrong-key", "search") == grpc.StatusCode.UNAUTHENTICATED
    assert call_with(stub, "read-key-0123456789", "search") == grpc.StatusCode.OK
    assert call_with(stub, "read-key-0123456789", "upsert") == grpc.StatusCode.PERMISSION_DENIED
    assert call_with(stub, "read-key-0123456789", "delete") == grpc.StatusCode.PERMISSION_DENIED
    assert call_with(stub, "write-key-0123456789", "upsert") == grpc.StatusCode.OK
    assert call_with(stub, "write-key-0123456789", "search") == grpc.StatusCode.OK
    x_api_key = stub.SearchDocuments(pb.SearchDocumentsRequest(query="退款"), timeout=30,
                                     metadata=[("x-api-key", "read-key-0123456789")])
    assert x_api_key.hits[0].id == "a"
    # Health answers without a key: probes and load balancers carry none.
    health = health_pb2_grpc.HealthStub(service.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING


def test_scope_table_and_key_matching() -> None:
    assert required_scope("/semsearch.v1.SearchService/SearchDocuments") == "search"
    assert required_scope("/semsearch.v1.SearchService/UpsertDocuments") == "write"
    assert required_scope("/semsearch.v1.AdminService/SwapModel") == "admin"
    assert required_scope("/semsearch.v1.SearchService/NewUnlistedMethod") == "admin"
    assert required_scope("/grpc.health.v1.Health/Check") is None
    assert find_key(KEYS, "write-key-0123456789") is KEYS[1]
    assert find_key(KEYS, "write-key-012345678") is None
    assert find_key(KEYS, "") is None


def _search_over(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    channel = (grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", "localhost")])
               if credentials else grpc.insecure_channel(address))
    with channel:
        try:
            search_pb2_grpc.SearchServiceStub(channel).SearchDocuments(
                pb.SearchDocumentsRequest(query="退款"), timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_tls_and_mutual_tls(make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder,
                            pki: dict[str, Path]) -> None:
    ca = pki["ca.pem"].read_bytes()
    tls = make_service(tiny_encoder, tls_cert_file=pki["server.pem"], tls_key_file=pki["server.key"],
                       milvus_uri=str(pki["ca.pem"].parent / "tls.db"))
    assert _search_over(tls.address, grpc.ssl_channel_credentials(root_certificates=ca)) == grpc.StatusCode.OK
    assert _search_over(tls.address, None) == grpc.StatusCode.UNAVAILABLE  # plaintext is refused
    mutual = make_service(tiny_encoder, tls_cert_file=pki["server.pem"], tls_key_file=pki["server.key"],
                          tls_client_ca_file=pki["ca.pem"], milvus_uri=str(pki["ca.pem"].parent / "mtls.db"))
    without_cert = grpc.ssl_channel_credentials(root_certificates=ca)
    with_cert = grpc.ssl_channel_credentials(root_certificates=ca, private_key=pki["client.key"].read_bytes(),
                                             certificate_chain=pki["client.pem"].read_bytes())
    assert _search_over(mutual.address, without_cert) == grpc.StatusCode.UNAVAILABLE
    assert _search_over(mutual.address, with_cert) == grpc.StatusCode.OK


def test_prometheus_metrics_on_a_separate_port(make_service: Callable[..., LiveService],
                                               tiny_encoder: TorchEncoder) -> None:
    port = free_port()
    service = make_service(tiny_encoder, metrics_port=port)
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[pb.Document(id="a", text="退款")]), timeout=30)
    service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="退款"), timeout=30)
    with contextlib.suppress(grpc.RpcError):
        service.stub.SearchDocuments(pb.SearchDocumentsRequest(query=""), timeout=30)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'semsearch_rpc_requests_total{code="OK",method="SearchDocuments"}' in body
    assert 'semsearch_rpc_requests_total{code="INVALID_ARGUMENT",method="SearchDocuments"}' in body
    assert "semsearch_encoder_batch_texts_bucket" in body
    assert "semsearch_encoder_queue_wait_seconds_bucket" in body
    assert 'semsearch_store_latency_seconds_bucket{le="0.001",operation="search",outcome="ok"}' in body
    version = tiny_encoder.manifest.version
    collection = versioned_name("docs", version)
    assert f'semsearch_model_info{{collection="{collection}",model_version="{version}"}} 1.0' in body
    assert "semsearch_serving 1.0" in body


def test_opentelemetry_spans_for_encode_and_search(make_service: Callable[..., LiveService],
                                                   tiny_encoder: TorchEncoder) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # the API's proxy tracer forwards to it from now on
    service = make_service(tiny_encoder)
    service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="退款"), timeout=30)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert {"semsearch.encode", "semsearch.search"} <= set(spans)
    assert spans["semsearch.encode"].attributes["model_version"] == tiny_encoder.manifest.version
