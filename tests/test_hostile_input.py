"""Property-based hostile input over the real gRPC API: every call gets a defined status, the server
never crashes, and rejected calls change nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from semsearch.encoders import TorchEncoder
from semsearch.text import normalize
from semsearch.v1 import search_pb2 as pb
from tests.conftest import LiveService

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED}
# Text with everything Python can encode to UTF-8: controls, combining marks, astral planes.
ANY_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)
HUGE_TEXT = st.sampled_from(["退" * 1_000_000, "a" * 300_000, "\x00" * 10_000])
TEXT = st.one_of(ANY_TEXT, HUGE_TEXT, st.sampled_from(["", " ", "\n", '"', "\\", "' or 1=1 --", "退款"]))
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
FILTER_VALUE = st.one_of(
    st.builds(lambda v: pb.FilterValue(string_value=v), st.one_of(ANY_TEXT, st.sampled_from(
        ['" or true or "', '") or (1==1', 'metadata["x"]', "\\", '\\"']))),
    st.builds(lambda v: pb.FilterValue(int_value=v), INT64),
    st.builds(lambda v: pb.FilterValue(double_value=v), st.floats(allow_nan=True, allow_infinity=True)),
    st.builds(lambda v: pb.FilterValue(bool_value=v), st.booleans()),
    st.just(pb.FilterValue()),
)
FILTER = st.builds(
    pb.MetadataFilter,
    field=st.one_of(st.sampled_from(["category", "priority", "_x", 'x"]', "a b", "", "x" * 100]), ANY_TEXT),
    operator=st.integers(min_value=-3, max_value=12),
    value=FILTER_VALUE,
    values=st.lists(FILTER_VALUE, max_size=4),
)
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True),
                      st.integers(min_value=-(2**70), max_value=2**70).map(float), ANY_TEXT)
JSON_VALUE = st.recursive(JSON_LEAF, lambda children: st.one_of(
    st.lists(children, max_size=3), st.dictionaries(ANY_TEXT, children, max_size=3)), max_leaves=20)


def deep_struct(depth: int) -> struct_pb2.Struct:
    root = struct_pb2.Struct()
    node = root
    for _ in range(depth):
        node = node.fields["n"].struct_value
    node.fields["leaf"].number_value = 1
    return root


def to_struct(value: dict[str, Any]) -> struct_pb2.Struct | None:
    struct = struct_pb2.Struct()
    try:
        struct.update(value)
    except (ValueError, TypeError):
        return None
    return struct


@pytest.fixture(scope="module")
def hostile_service(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: TorchEncoder) -> Iterator[LiveService]:
    from semsearch.config import Settings

    service = LiveService(Settings(milvus_uri=str(tmp_path_factory.mktemp("hostile") / "m.db"), port=0,
                                   collection="docs", metrics_port=0, max_query_chars=4096), tiny_encoder)
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[
        pb.Document(id="keep-1", text="如何申请退款？"), pb.Document(id="keep-2", text="发票抬头写错能改吗"),
    ]), timeout=60)
    yield service
    service.stop()


def status_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        assert exc.code() in ALLOWED, (exc.code(), exc.details())
        assert "Traceback" not in (exc.details() or "")
        return exc.code()
    return grpc.StatusCode.OK


def stored_ids(service: LiveService) -> set[str]:
    return {str(row["doc_id"]) for row in service.running.store.iter_rows("docs", ["doc_id"])}


COMMON = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])


@COMMON
@given(query=TEXT, top_k=st.integers(min_value=-(2**31), max_value=2**31 - 1),
       filters=st.lists(FILTER, max_size=3), chunks=st.booleans(),
       fields=st.lists(st.integers(min_value=-1, max_value=5), max_size=3))
def test_hostile_searches(hostile_service: LiveService, query: str, top_k: int, filters: list[pb.MetadataFilter],
                          chunks: bool, fields: list[int]) -> None:
    before = stored_ids(hostile_service)
    request = pb.SearchDocumentsRequest(query=query, top_k=top_k, filters=filters, return_chunks=chunks,
                                        return_fields=fields)  # type: ignore[arg-type]
    status_of(lambda: hostile_service.stub.SearchDocuments(request, timeout=60))
    status_of(lambda: hostile_service.stub.BatchSearchDocuments(
        pb.BatchSearchDocumentsRequest(requests=[request, request]), timeout=60))
    assert stored_ids(hostile_service) == before


@COMMON
@given(doc_id=TEXT, text=TEXT, metadata=st.dictionaries(ANY_TEXT, JSON_VALUE, max_size=4),
       depth=st.sampled_from([0, 0, 0, 9, 25]))  # protobuf stops at 100 messages deep
def test_hostile_writes(hostile_service: LiveService, doc_id: str, text: str, metadata: dict[str, Any],
                        depth: int) -> None:
    struct = deep_struct(depth) if depth else to_struct(metadata)
    assume(struct is not None)  # protobuf cannot even hold it: not an input a client can send
    assert struct is not None
    before = stored_ids(hostile_service)
    request = pb.UpsertDocumentsRequest(documents=[pb.Document(id=doc_id, text=text, metadata=struct)])
    code = status_of(lambda: hostile_service.stub.UpsertDocuments(request, timeout=120))
    after = stored_ids(hostile_service)
    if code == grpc.StatusCode.OK:
        assert after == before | {doc_id}
        got = hostile_service.stub.GetDocument(pb.GetDocumentRequest(id=doc_id), timeout=30)
        assert got.document.text == normalize(text)  # stored as normalised (semsearch/text.py)
        assert status_of(lambda: hostile_service.stub.DeleteDocuments(
            pb.DeleteDocumentsRequest(ids=[doc_id]), timeout=30)) == grpc.StatusCode.OK
        assert stored_ids(hostile_service) == before
    else:
        assert after == before
    status_of(lambda: hostile_service.stub.GetDocument(pb.GetDocumentRequest(id=doc_id), timeout=30))
    status_of(lambda: hostile_service.stub.DeleteDocuments(pb.DeleteDocumentsRequest(ids=[doc_id, "keep-1x"]),
                                                           timeout=30))


@pytest.mark.parametrize("payload", [
    b"\x0a\x03\xed\xa0\x80",  # query = a UTF-8-encoded lone surrogate
    b"\x0a\x02\xc3\x28",  # query = invalid UTF-8
    b"\x0a\xff\xff\xff\xff\x0f",  # a length far past the end
    b"\xff\xff\xff",  # not protobuf at all
])
def test_malformed_bytes_are_invalid_argument(hostile_service: LiveService, payload: bytes) -> None:
    raw = hostile_service.channel.unary_unary(
        "/semsearch.v1.SearchService/SearchDocuments", request_serializer=lambda b: b,
        response_deserializer=pb.SearchDocumentsResponse.FromString)
    with pytest.raises(grpc.RpcError) as info:
        raw(payload, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request" in (info.value.details() or "")
    assert stored_ids(hostile_service) == {"keep-1", "keep-2"}
    assert hostile_service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="退款"), timeout=30).hits


# --- Hostile HTTP: the gateway's limits, on a service whose limits are short enough to hit quickly.

def _nested(depth: int, leaf: str = "1", array: bool = True) -> bytes:
    return (("[" * depth + leaf + "]" * depth) if array else ('{"n":' * depth + leaf + "}" * depth)).encode()


@pytest.fixture(scope="module")
def guarded_http(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: TorchEncoder) -> Iterator[LiveService]:
    from semsearch.config import Settings
    from tests.conftest import free_port

    service = LiveService(Settings(milvus_uri=str(tmp_path_factory.mktemp("guarded") / "m.db"), port=0,
                                   collection="docs", metrics_port=0, http_port=free_port(), http_console=False,
                                   http_header_timeout_s=1.0, http_body_timeout_s=1.0, http_max_connections=4),
                          tiny_encoder)
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[pb.Document(id="keep-1", text="如何申请退款？")]),
                                 timeout=60)
    yield service
    service.stop()


def _still_serves(service: LiveService) -> None:
    import httpx

    answer = httpx.post(f"http://127.0.0.1:{service.running.http_port}/v1/search", json={"query": "退款"}, timeout=30)
    assert answer.status_code == 200 and answer.json()["hits"][0]["id"] == "keep-1", answer.text


def _raw(service: LiveService, request: bytes = b"", *, wait_before_read: float = 0.0) -> tuple[int, bytes]:
    """Sends `request` on a fresh connection and reads until the server closes it: (status, body)."""
    import socket
    import time

    with socket.create_connection(("127.0.0.1", service.running.http_port), timeout=30) as sock:
        sock.sendall(request)
        time.sleep(wait_before_read)
        received = b""
        while chunk := sock.recv(65536):  # the server closes the connection: recv returns b""
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize("body", [
    b'{"query": "q", "fusion": ' + _nested(1000) + b"}",  # arrays where FusionOptions goes
    b'{"query": "q", "filter": ' + _nested(1000, '{"operator": 1}', array=False) + b"}",
    b'{"query": "q", "filter": ' + _nested(65, "{}", array=False) + b"}",  # just past the limit
    _nested(100_000),
])
def test_deep_json_is_400_naming_the_limit(guarded_http: LiveService, body: bytes) -> None:
    import httpx

    url = f"http://127.0.0.1:{guarded_http.running.http_port}"
    for path in ("/v1/search", "/v1/documents:upsert"):
        answer = httpx.post(url + path, content=body, timeout=30)
        assert answer.status_code == 400, answer.text
        assert "deeper than 64 levels" in answer.json()["error"]["message"]
    deep_metadata = b'{"documents": [{"id": "deep", "text": "t", "metadata": ' + _nested(999, "{}", False) + b"}]}"
    assert httpx.post(url + "/v1/documents:upsert", content=deep_metadata, timeout=30).status_code == 400
    assert stored_ids(guarded_http) == {"keep-1"}
    _still_serves(guarded_http)


def test_grpc_timeout_is_clamped_not_overflowed(guarded_http: LiveService) -> None:
    import httpx

    url = f"http://127.0.0.1:{guarded_http.running.http_port}/v1/search"
    for longest in ("999999H", "9999999H", "99999999H", "99999999S"):  # all 8 digits or fewer: valid
        answer = httpx.post(url, json={"query": "退款"}, headers={"grpc-timeout": longest}, timeout=30)
        assert answer.status_code == 200, (longest, answer.text)
    too_long = httpx.post(url, json={"query": "退款"}, headers={"grpc-timeout": "123456789S"}, timeout=30)
    assert too_long.status_code == 400 and "grpc-timeout" in too_long.json()["error"]["message"]


def test_idle_and_slow_clients_are_cut_off(guarded_http: LiveService) -> None:
    import json

    status, body = _raw(guarded_http)  # connects and says nothing
    assert status == 408 and "http_header_timeout_s" in json.loads(body)["error"]["message"]
    status, _ = _raw(guarded_http, b"POST /v1/search HTTP/1.1\r\nhost: x\r\n")  # a head that never ends
    assert status == 408
    # A body that stops arriving: the head is complete, the 20 promised bytes are not.
    status, body = _raw(guarded_http, b"POST /v1/search HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                                      b"content-length: 20\r\n\r\n{\"query\"")
    assert status == 408 and "http_body_timeout_s" in json.loads(body)["error"]["message"]
    # A kept-alive connection that goes idle after its first answer is closed as well.
    search = '{"query": "退款"}'.encode()
    status, body = _raw(guarded_http, b"POST /v1/search HTTP/1.1\r\nhost: x\r\ncontent-length: "
                        + str(len(search)).encode() + b"\r\n\r\n" + search)
    assert status == 200 and b"408" in body  # the answer, then the idle connection's 408
    _still_serves(guarded_http)


def test_connections_past_the_cap_get_503_and_the_service_recovers(guarded_http: LiveService) -> None:
    import json
    import socket

    idle = [socket.create_connection(("127.0.0.1", guarded_http.running.http_port), timeout=30) for _ in range(4)]
    try:
        status, body = _raw(guarded_http, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert status == 503 and "http_max_connections" in json.loads(body)["error"]["message"]
    finally:
        for sock in idle:
            sock.close()
    _still_serves(guarded_http)
