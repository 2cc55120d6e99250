"""What users and operators do to a running service: concurrent writes of one id, a broken registry
record, a Milvus server killed and restarted underneath, a new process on existing data."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from semsearch.encoders import TorchEncoder
from semsearch.filters import render_string_in
from semsearch.registry import REGISTRY_COLLECTION
from semsearch.store import ChunkRow, MilvusStore
from semsearch.testing import MilvusTestServer
from semsearch.v1 import admin_pb2, admin_pb2_grpc
from semsearch.v1 import search_pb2 as pb
from tests.conftest import LiveService

SENTENCE = "退款申请提交后，系统会在一到三个工作日内审核并原路退回款项。"


def stored_rows(service: LiveService, doc_id: str) -> list[tuple[int, str]]:
    """(chunk index, content hash) of every stored row of the document, read from Milvus itself."""
    store = service.running.store
    collection = service.running.servicer.engine.pair.collection.name  # type: ignore[union-attr]
    rows = store.client.query(collection_name=collection, filter=render_string_in("doc_id", [doc_id]),
                              output_fields=["chunk_index", "content_hash"], consistency_level="Strong")
    return sorted((int(row["chunk_index"]), str(row["content_hash"])) for row in rows)


def chunks_of(service: LiveService, doc_id: str) -> list[int]:
    return [index for index, _ in stored_rows(service, doc_id)]


def assert_whole(service: LiveService, doc_id: str, text: str, chunks: int) -> None:
    """Every row of one version: chunks 0..n-1 once each, one content hash, as many chunks as the
    text makes. (GetDocument alone would not see a leftover tail of a longer version.)"""
    rows = stored_rows(service, doc_id)
    assert [index for index, _ in rows] == list(range(chunks)), f"{doc_id}: chunks {[i for i, _ in rows]}"
    assert len({digest for _, digest in rows}) == 1, f"{doc_id}: rows of several versions"
    assert service.stub.GetDocument(pb.GetDocumentRequest(id=doc_id)).document.text == text


def assert_absent(service: LiveService, doc_id: str) -> None:
    assert stored_rows(service, doc_id) == []
    with pytest.raises(grpc.RpcError) as missing:
        service.stub.GetDocument(pb.GetDocumentRequest(id=doc_id))
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND


def test_concurrent_upsert_and_delete_of_one_id_never_leave_a_fragment(
    make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder,
) -> None:
    """Upsert a long version and delete the same id at once: afterwards the document is either
    absent or whole (every chunk of one version), never chunks without their chunk 0."""
    service = make_service(tiny_encoder, max_document_chars=200_000)
    short_text = SENTENCE * 2
    long_text = SENTENCE * 40  # several chunks with the tiny model's 128-token limit
    # How many chunks each version makes, from the same service without a race.
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[
        pb.Document(id="ref-long", text=long_text), pb.Document(id="ref-short", text=short_text)]))
    long_chunks, short_chunks = len(chunks_of(service, "ref-long")), len(chunks_of(service, "ref-short"))
    assert long_chunks > short_chunks >= 1
    with ThreadPoolExecutor(max_workers=2) as pool:
        for attempt in range(12):
            doc_id = f"race-{attempt}"
            service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[pb.Document(id=doc_id, text=short_text)]))
            assert_whole(service, doc_id, short_text, short_chunks)
            upsert = pool.submit(service.stub.UpsertDocuments, pb.UpsertDocumentsRequest(
                documents=[pb.Document(id=doc_id, text=long_text)]))
            delete = pool.submit(service.stub.DeleteDocuments, pb.DeleteDocumentsRequest(ids=[doc_id]))
            upsert.result(60)
            delete.result(60)
            # Whichever ran last decides: absent (the delete), or the long version whole.
            if stored_rows(service, doc_id):
                assert_whole(service, doc_id, long_text, long_chunks)
            else:
                assert_absent(service, doc_id)


def test_writes_of_one_id_are_ordered_inside_the_service(
    make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder,
) -> None:
    """Many concurrent upserts and deletes of one id: the final state is the last call's."""
    service = make_service(tiny_encoder, max_document_chars=200_000)
    texts = [SENTENCE * n for n in (1, 30, 3, 25, 2)]
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[
        pb.Document(id=f"ref-{i}", text=text) for i, text in enumerate(texts)]))
    chunk_counts = {text: len(chunks_of(service, f"ref-{i}")) for i, text in enumerate(texts)}
    with ThreadPoolExecutor(max_workers=5) as pool:
        calls = [pool.submit(service.stub.UpsertDocuments, pb.UpsertDocumentsRequest(
            documents=[pb.Document(id="busy", text=text)])) for text in texts]
        for call in calls:
            call.result(60)
    text = service.stub.GetDocument(pb.GetDocumentRequest(id="busy")).document.text
    assert text in texts
    assert_whole(service, "busy", text, chunk_counts[text])  # no tail of a longer version left behind


def test_a_malformed_registry_record_is_reported_and_the_watch_keeps_going(
    make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder,
) -> None:
    service = make_service(tiny_encoder, registry_poll_s=0.2)
    admin = admin_pb2_grpc.AdminServiceStub(service.channel)
    store = service.running.store
    good = store.client.get(collection_name=REGISTRY_COLLECTION, ids=["docs"], output_fields=["record"])[0]["record"]
    store.client.upsert(collection_name=REGISTRY_COLLECTION, data=[
        {"name": "docs", "record": '{"name": "docs", "generation": "not a number"', "vector": [0.0, 0.0]}])
    deadline = time.monotonic() + 30
    state = admin.GetServingState(admin_pb2.GetServingStateRequest())
    while state.registry_watch_failures < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        state = admin.GetServingState(admin_pb2.GetServingStateRequest())
    assert state.registry_watch_failures >= 2, "the watch stopped after the first failure (or never read)"
    # The error names the record and what is wrong with it (the truncated JSON), not just "invalid".
    assert "docs" in state.registry_watch_error, state.registry_watch_error
    assert re.search(r"json|EOF|generation", state.registry_watch_error, re.I), state.registry_watch_error
    # Meanwhile the service goes on serving the pair it had: a real answer, from that model version.
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[pb.Document(id="kept", text=SENTENCE)]))
    answer = service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="退款", top_k=1))
    assert [hit.id for hit in answer.hits] == ["kept"]
    assert answer.model_version == tiny_encoder.manifest.version

    store.client.upsert(collection_name=REGISTRY_COLLECTION, data=[
        {"name": "docs", "record": good.replace('"generation":', '"generation_was":', 0), "vector": [0.0, 0.0]}])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = admin.GetServingState(admin_pb2.GetServingStateRequest())
        if state.registry_watch_failures == 0:
            break
        time.sleep(0.2)
    assert state.registry_watch_failures == 0 and state.registry_watch_error == ""


def test_a_new_process_serves_a_lite_collection_another_one_wrote(tmp_path: Path, tiny_encoder: TorchEncoder) -> None:
    """Lite reopens every collection 'released': whoever opens it must load it (the index → serve bug)."""
    import subprocess
    import sys

    uri = str(tmp_path / "milvus.db")
    writer = MilvusStore(uri)
    writer.ensure_collection("c", tiny_encoder.manifest)
    vector = tiny_encoder.encode_documents([SENTENCE])[0]
    writer.upsert("c", [ChunkRow("d", 0, SENTENCE, vector)])
    writer.close()
    code = (
        "import sys, numpy as np; from semsearch.store import MilvusStore\n"
        "store = MilvusStore(sys.argv[1]); v = np.asarray([[float(x) for x in sys.argv[2].split(',')]])\n"
        "print(store.search('c', v, top_k=1)[0][0].doc_id); print(len(store.document_rows('c', ['d'])))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, uri, ",".join(map(str, vector.tolist()))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["d", "1"]


@pytest.mark.milvus_server
def test_the_service_reconnects_after_the_milvus_server_is_killed_and_restarted(
    make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder, tmp_path: Path,
) -> None:
    server = MilvusTestServer(tmp_path / "milvus-restart")
    server.start()
    try:
        service = make_service(tiny_encoder, milvus_uri=server.uri, health_probe_interval_s=0.5,
                               milvus_timeout_s=5)
        service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[pb.Document(id="kept", text=SENTENCE)]))
        health = health_pb2_grpc.HealthStub(service.channel)

        def status() -> int:
            return int(health.Check(health_pb2.HealthCheckRequest(), timeout=5).status)

        server.kill()  # kill -9: no goodbye to clients
        deadline = time.monotonic() + 30
        while status() == health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as failed:
            service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="退款", top_k=1), timeout=15)
        assert failed.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

        server.start()  # the same port and data
        restarted = time.monotonic()
        recovered = None
        while time.monotonic() - restarted < 120:
            try:
                found = service.stub.GetDocument(pb.GetDocumentRequest(id="kept"), timeout=10)
                recovered = time.monotonic() - restarted
                break
            except grpc.RpcError:
                time.sleep(0.5)
        assert recovered is not None, "the service never reconnected to the restarted server"
        assert found.document.text == SENTENCE
        assert service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="退款", top_k=1), timeout=30).hits
        deadline = time.monotonic() + 30
        while status() != health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status() == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop()


def test_reconnect_is_rate_limited(tmp_path: Path) -> None:
    store = MilvusStore(str(tmp_path / "milvus.db"))
    try:
        assert store.reconnect() is True
        assert store.reconnect() is False  # within RECONNECT_INTERVAL_S: no reconnect storm
        assert store.ping()
    finally:
        store.close()
