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
