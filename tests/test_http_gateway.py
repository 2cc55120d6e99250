"""The HTTP/JSON gateway beside gRPC: real HTTP requests to a real service on loopback, the same
auth and validation as gRPC, an HTTP status per gRPC code, TLS, and a current OpenAPI document."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import httpx
import pytest

from semsearch.config import ApiKey, Settings
from semsearch.encoders import TorchEncoder
from semsearch.v1 import search_pb2 as pb
from service.http_api import HTTP_STATUS, REST_ROUTES, ROUTES, http_status
from service.http_gateway import BadRequest, build_request, error_response, parse_timeout
from service.openapi import openapi_document, proto_comments, render
from tests.conftest import LiveService, free_port

REPO = Path(__file__).resolve().parent.parent
READ_KEY = "read-key-0123456789abcdef"
WRITE_KEY = "write-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"
KEYS = [
    ApiKey(name="reader", key=READ_KEY, scope="search"),  # type: ignore[arg-type]
    ApiKey(name="writer", key=WRITE_KEY, scope="write"),  # type: ignore[arg-type]
    ApiKey(name="admin", key=ADMIN_KEY, scope="admin"),  # type: ignore[arg-type]
]
DOCS = [{"id": "refund", "text": "如何申请退款？", "metadata": {"category": "refund", "rank": 1}},
        {"id": "invoice", "text": "发票抬头写错能改吗", "metadata": {"category": "invoice", "rank": 2}},
        {"id": "订单/2024", "text": "快递包裹几天没动静", "metadata": {"category": "parcel", "rank": 3}}]


def assert_aip193(body: dict[str, Any], status: int, grpc_name: str, *fragments: str) -> None:
    """Google's JSON error form (https://google.aip.dev/193): one `error` object, the HTTP status as
    `code`, the gRPC code's name as `status`, and an ErrorInfo among the details."""
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "status", "message", "details"}, error
    assert error["code"] == status and error["status"] == grpc_name, error
    info = [d for d in error["details"] if d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"]
    assert info == [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": grpc_name,
                     "domain": "semsearch", "metadata": {}}], error
    for fragment in fragments:
        assert fragment in error["message"], error


def http_service(make_service: Callable[..., LiveService], encoder: TorchEncoder, **overrides: Any) -> LiveService:
    service = make_service(encoder, http_port=free_port(), **overrides)
    assert service.running.http_port
    return service


def base_url(service: LiveService, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{service.running.http_port}"


def test_routes_answer_in_proto3_json(make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder) -> None:
    service = http_service(make_service, tiny_encoder)
    with httpx.Client(base_url=base_url(service), timeout=60) as http:
        upserted = http.post("/v1/documents:upsert", json={"documents": DOCS})
        assert upserted.status_code == 200, upserted.text
        assert upserted.json()["upsertedCount"] == 3 and upserted.json()["collection"]
        # The gRPC side sees what HTTP wrote: one service behind both.
        assert service.stub.GetDocument(pb.GetDocumentRequest(id="订单/2024"), timeout=30).document.text \
            == "快递包裹几天没动静"

        # An id with '/' and Chinese characters, percent-encoded in the path.
        got = http.get(f"/v1/documents/{quote('订单/2024', safe='')}")
        assert got.status_code == 200, got.text
        document = got.json()["document"]
        assert {key: document[key] for key in ("id", "text", "metadata")} == {
            "id": "订单/2024", "text": "快递包裹几天没动静", "metadata": {"category": "parcel", "rank": 3}}

        # snake_case and lowerCamelCase names are both proto3 JSON; enums by name.
        found = http.post("/v1/search", json={"query": "如何申请退款？", "top_k": 2, "mode": "RETRIEVAL_MODE_DENSE",
                                              "filters": [{"field": "rank", "operator": "FILTER_OPERATOR_LTE",
                                                           "value": {"intValue": "2"}}]})
        assert found.status_code == 200, found.text
        body = found.json()
        assert [hit["id"] for hit in body["hits"]] == ["refund", "invoice"]
        assert body["mode"] == "RETRIEVAL_MODE_DENSE" and body["modelVersion"] and "totalMs" in body["timing"]
        assert body["hits"][0]["retrievers"][0]["retriever"] == "RETRIEVAL_MODE_DENSE"
        # The same request over gRPC gives the same hits.
        grpc_hits = service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="如何申请退款？", top_k=2), timeout=30)
        assert [hit.id for hit in grpc_hits.hits] == [hit["id"] for hit in body["hits"]]

        batch = http.post("/v1/search:batch", json={"requests": [{"query": "退款"}, {"query": "发票", "topK": 1}]})
        assert batch.status_code == 200, batch.text
        assert [len(r["hits"]) for r in batch.json()["responses"]] == [3, 1]

        # The generic RPC route reaches the same method.
        generic = http.post("/semsearch.v1.SearchService/GetDocument", json={"id": "refund"})
        assert generic.status_code == 200 and generic.json()["document"]["id"] == "refund"

        deleted = http.post("/v1/documents:delete", json={"ids": ["refund", "nope"]})
        assert deleted.status_code == 200 and deleted.json() == {"deletedCount": 1}
        missing = http.get("/v1/documents/refund")
        assert missing.status_code == 404
        assert missing.json()["error"]["status"] == "NOT_FOUND" and missing.json()["error"]["code"] == 404
        assert "refund" in missing.json()["error"]["message"]

        state = http.get("/v1/admin/serving-state")
        assert state.status_code == 200 and state.json()["current"]["modelVersion"] == body["modelVersion"]
        assert http.get("/healthz").json() == {"status": "SERVING"}
        assert http.get("/openapi.json").json() == json.loads((REPO / "service" / "openapi.json").read_text())


def test_bad_input_is_400_with_a_reason(make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder) -> None:
    service = http_service(make_service, tiny_encoder, max_message_bytes=64 * 1024)
    with httpx.Client(base_url=base_url(service), timeout=60) as http:
        def error(response: httpx.Response, status: int, grpc_name: str, *fragments: str) -> None:
            assert response.status_code == status, response.text
            assert_aip193(response.json(), status, grpc_name, *fragments)

        error(http.post("/v1/search", content=b'{"query": '), 400, "INVALID_ARGUMENT", "not valid JSON")
        error(http.post("/v1/search", content=b"\xff\xfe"), 400, "INVALID_ARGUMENT", "not UTF-8")
        error(http.post("/v1/search", json=["query"]), 400, "INVALID_ARGUMENT", "JSON object")
        error(http.post("/v1/search", json={"query": "退款", "topk": 3}), 400, "INVALID_ARGUMENT", "topk")
        error(http.post("/v1/search", json={"query": "退款", "mode": "FASTEST"}), 400, "INVALID_ARGUMENT", "FASTEST")
        error(http.post("/v1/search", json={"query": "退款", "topK": "many"}), 400, "INVALID_ARGUMENT", "topK")
        error(http.get("/v1/documents/a?verbose=1"), 400, "INVALID_ARGUMENT", "verbose")
        # The service's own validation, unchanged: the gRPC reason comes back.
        error(http.post("/v1/search", json={"query": "退款", "topK": -1}), 400, "INVALID_ARGUMENT", "top_k")
        error(http.post("/v1/search", json={"query": ""}), 400, "INVALID_ARGUMENT")
        error(http.post("/v1/documents:upsert", json={"documents": [{"id": " x", "text": "退款"}]}),
              400, "INVALID_ARGUMENT")
        error(http.post("/v1/documents:upsert", content=b"{" + b" " * 70_000 + b"}"), 413, "RESOURCE_EXHAUSTED",
              "max_message_bytes")
        error(http.get("/v1/nothing"), 404, "NOT_FOUND", "/v1/nothing")
        error(http.get("/v1/search"), 405, "UNIMPLEMENTED")
        assert http.get("/v1/search").headers["allow"] == "POST"  # RFC 9110: a 405 names the methods
        assert set(http.post("/v1/documents/refund").headers["allow"].split(", ")) == {"GET", "HEAD"}
        error(http.post("/v1/search", json={"query": "退款"}, headers={"grpc-timeout": "soon"}), 400,
              "INVALID_ARGUMENT", "grpc-timeout")


def test_same_auth_as_grpc(make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder) -> None:
    service = http_service(make_service, tiny_encoder, api_keys=KEYS)
    with httpx.Client(base_url=base_url(service), timeout=60) as http:
        def call(path: str, key: str | None, header: str = "authorization", body: Any = None) -> httpx.Response:
            headers = {} if key is None else {header: f"Bearer {key}" if header == "authorization" else key}
            if body is None:
                return http.get(path, headers=headers)
            return http.post(path, json=body, headers=headers)

        upsert = {"documents": DOCS[:1]}
        missing = call("/v1/documents:upsert", None, body=upsert)
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        assert_aip193(missing.json(), 401, "UNAUTHENTICATED", "missing API key")
        assert call("/v1/documents:upsert", "wrong-key", body=upsert).status_code == 401
        forbidden = call("/v1/documents:upsert", READ_KEY, body=upsert)
        assert forbidden.status_code == 403 and "write scope" in forbidden.json()["error"]["message"]
        assert call("/v1/documents:upsert", WRITE_KEY, "x-api-key", body=upsert).status_code == 200
        assert call("/v1/search", READ_KEY, body={"query": "退款"}).json()["hits"][0]["id"] == "refund"
        assert call("/v1/documents/refund", READ_KEY).status_code == 200
        assert call("/v1/documents:delete", READ_KEY, body={"ids": ["refund"]}).status_code == 403
        assert call("/v1/admin/serving-state", WRITE_KEY).status_code == 403
        assert call("/v1/admin/serving-state", ADMIN_KEY).status_code == 200
        # As on gRPC, health needs no key; neither does the API description.
        assert call("/healthz", None).status_code == 200
        assert call("/openapi.json", None).status_code == 200


def test_rate_limited_key_is_429_with_retry_after(make_service: Callable[..., LiveService],
                                                   tiny_encoder: TorchEncoder) -> None:
    limited = ApiKey(name="slow", key=READ_KEY, scope="search", rate_limit_per_s=0.5, rate_burst=1)  # type: ignore
    service = http_service(make_service, tiny_encoder, api_keys=[limited])
    with httpx.Client(base_url=base_url(service), timeout=60,
                      headers={"authorization": f"Bearer {READ_KEY}"}) as http:
        assert http.post("/v1/search", json={"query": "退款"}).status_code == 200
        refused = http.post("/v1/search", json={"query": "退款"})
        assert refused.status_code == 429, refused.text
        assert_aip193(refused.json(), 429, "RESOURCE_EXHAUSTED")
        assert 1 <= int(refused.headers["retry-after"]) <= 2
        [_, detail] = refused.json()["error"]["details"]
        assert detail["@type"] == "type.googleapis.com/google.rpc.RetryInfo" and detail["retryDelay"].endswith("s")


def test_cors_allows_only_the_configured_origins(make_service: Callable[..., LiveService],
                                                 tiny_encoder: TorchEncoder) -> None:
    allowed, other = "https://app.example.com", "https://evil.example.net"
    preflight = {"access-control-request-method": "POST",
                 "access-control-request-headers": "authorization, content-type"}
    service = http_service(make_service, tiny_encoder, http_cors_origins=[allowed])
    with httpx.Client(base_url=base_url(service), timeout=60) as http:
        ok = http.options("/v1/search", headers={"origin": allowed, **preflight})
        assert ok.status_code == 200, ok.text
        assert ok.headers["access-control-allow-origin"] == allowed
        assert "POST" in ok.headers["access-control-allow-methods"]
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        refused = http.options("/v1/search", headers={"origin": other, **preflight})
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        answer = http.post("/v1/search", json={"query": "退款"}, headers={"origin": allowed})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == allowed
        assert "access-control-allow-origin" not in http.post("/v1/search", json={"query": "退款"},
                                                              headers={"origin": other}).headers


def test_cors_is_off_by_default(make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder) -> None:
    assert Settings().http_cors_origins == []
    service = http_service(make_service, tiny_encoder)
    with httpx.Client(base_url=base_url(service), timeout=60) as http:
        preflight = http.options("/v1/search", headers={"origin": "https://app.example.com",
                                                        "access-control-request-method": "POST"})
        assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers
        answer = http.post("/v1/search", json={"query": "退款"}, headers={"origin": "https://app.example.com"})
        assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers


def test_tls_and_mutual_tls(make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder,
                            pki: dict[str, Path]) -> None:
    service = http_service(make_service, tiny_encoder, tls_cert_file=pki["server.pem"],
                           tls_key_file=pki["server.key"], tls_client_ca_file=pki["ca.pem"])
    url = base_url(service, "https")
    trusted = ssl.create_default_context(cafile=str(pki["ca.pem"]))
    with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake fails
        httpx.get(f"{url}/healthz", verify=trusted, timeout=30)
    trusted.load_cert_chain(str(pki["client.pem"]), str(pki["client.key"]))
    with httpx.Client(base_url=url, verify=trusted, timeout=60) as http:
        assert http.post("/v1/documents:upsert", json={"documents": DOCS}).status_code == 200
        assert http.get("/v1/documents/refund").json()["document"]["text"] == "如何申请退款？"
    stranger = ssl.create_default_context(cafile=str(pki["other-ca.pem"]))
    with pytest.raises(httpx.HTTPError):  # a CA that did not sign the server's certificate
        httpx.get(f"{url}/healthz", verify=stranger, timeout=30)
    with pytest.raises(httpx.HTTPError):  # plaintext HTTP to the TLS port
        httpx.get(f"http://127.0.0.1:{service.running.http_port}/healthz", timeout=30)


def test_stops_with_grpc(tmp_path: Path, tiny_encoder: TorchEncoder) -> None:
    settings = Settings(milvus_uri=str(tmp_path / "milvus.db"), host="127.0.0.1", port=0, metrics_port=0,
                        collection="docs", http_port=free_port())
    service = LiveService(settings, tiny_encoder)
    url = base_url(service)
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
    service.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz", timeout=5)


def test_drains_a_request_in_flight_before_grpc_stops(tmp_path: Path, tiny_encoder: TorchEncoder) -> None:
    """A request whose body is still arriving when the service is told to stop gets its answer: the
    gateway drains before the gRPC server behind it stops."""
    settings = Settings(milvus_uri=str(tmp_path / "milvus.db"), host="127.0.0.1", port=0, metrics_port=0,
                        collection="docs", http_port=free_port(), use_registry=False)
    service = LiveService(settings, tiny_encoder)
    url = base_url(service)
    first_part_sent, rest_allowed = threading.Event(), threading.Event()
    answers: list[httpx.Response] = []

    def body() -> Iterator[bytes]:
        yield b'{"query": '
        first_part_sent.set()
        rest_allowed.wait(30)
        yield '"退款"}'.encode()

    client = threading.Thread(target=lambda: answers.append(httpx.post(f"{url}/v1/search", content=body(),
                                                                       timeout=60)))
    client.start()
    assert first_part_sent.wait(30)
    time.sleep(0.3)  # the server has the request's head
    stopping = threading.Thread(target=service.stop)
    stopping.start()
    time.sleep(0.5)
    with pytest.raises(httpx.ConnectError):  # no new connections while draining
        httpx.get(f"{url}/healthz", timeout=5)
    rest_allowed.set()
    client.join(60)
    stopping.join(60)
    assert answers and answers[0].status_code == 200, answers and answers[0].text
    assert answers[0].json()["modelVersion"]


def test_a_taken_http_port_fails_the_start_and_names_it(tmp_path: Path) -> None:
    import asyncio
    import socket

    from service.server import start_server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(milvus_uri=str(tmp_path / "milvus.db"), host="127.0.0.1", port=0, metrics_port=0,
                            collection="docs", http_port=port, use_registry=False)
        with pytest.raises(OSError, match=f"HTTP port {port}: Address already in use"):
            asyncio.run(start_server(settings))


def test_status_table() -> None:
    assert set(HTTP_STATUS) == set(grpc.StatusCode)  # every code has its HTTP status
    expected = {"OK": 200, "INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
                "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "ABORTED": 409, "RESOURCE_EXHAUSTED": 429,
                "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "CANCELLED": 499, "UNKNOWN": 500,
                "INTERNAL": 500, "DATA_LOSS": 500, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503,
                "DEADLINE_EXCEEDED": 504}
    assert {code.name: http_status(code) for code in grpc.StatusCode} == expected

    limited = error_response(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down",
                             grpc.aio.Metadata(("retry-after", "2"), ("retry-after-ms", "1500")))
    assert limited.status_code == 429 and limited.headers["retry-after"] == "2"
    assert json.loads(bytes(limited.body))["error"]["details"][1:] == [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1.500s"}]
    queue_full = error_response(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full")
    assert queue_full.headers["retry-after"] == "1"
    assert "retry-after" not in error_response(grpc.StatusCode.UNAVAILABLE, "down").headers


def test_request_building() -> None:
    get = next(route for route in REST_ROUTES if route.rpc.name == "GetDocument")
    # The path parameter wins over a query parameter of the same name.
    assert build_request(get, b"", {"id": "a/b"}, [("id", "other")]).id == "a/b"  # type: ignore[attr-defined]
    search = next(route for route in REST_ROUTES if route.rpc.name == "SearchDocuments")
    query = [("returnChunks", "true"), ("return_fields", "RETURN_FIELD_TEXT"),
             ("return_fields", "RETURN_FIELD_METADATA")]
    request = build_request(search, b'{"query": "q"}', {}, query)
    assert isinstance(request, pb.SearchDocumentsRequest)
    assert request.return_chunks and list(request.return_fields) == [1, 2] and request.query == "q"
    with pytest.raises(BadRequest, match="twice"):
        build_request(search, b'{"query": "q"}', {}, [("query", "r")])
    assert parse_timeout("200m") == pytest.approx(0.2) and parse_timeout("5S") == 5 and parse_timeout(None) is None


def test_openapi_file_is_current() -> None:
    committed = (REPO / "service" / "openapi.json").read_text(encoding="utf-8")
    comments = proto_comments()
    assert committed == render(comments), "service/openapi.json is stale: run `python scripts/gen_openapi.py`"
    document = openapi_document(comments)
    # Every route is documented, and every $ref resolves.
    operations = {op["operationId"] for path in document["paths"].values() for op in path.values()}
    assert {route.operation_id for route in ROUTES} <= operations
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            refs.extend(v for k, v in node.items() if k == "$ref")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    schemas = document["components"]["schemas"]
    assert refs and all(ref.removeprefix("#/components/schemas/") in schemas for ref in refs)
    request = schemas["semsearch.v1.SearchDocumentsRequest"]["properties"]
    assert (request["topK"]["type"], request["topK"]["format"]) == ("integer", "int32")
    assert request["mode"]["allOf"] == [{"$ref": "#/components/schemas/semsearch.v1.RetrievalMode"}]
    assert "instruction" in request["query"]["description"]  # the .proto comment
    assert "NOT_FOUND" in document["paths"]["/v1/documents/{id}"]["get"]["description"]
    assert schemas["semsearch.v1.Document"]["properties"]["metadata"]["type"] == "object"
    assert document["paths"]["/v1/documents/{id}"]["get"]["parameters"][0]["name"] == "id"
