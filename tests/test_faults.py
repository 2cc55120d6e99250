"""Faults against real processes on loopback: Milvus stopped and restarted under load, deadlines."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from semsearch.encoders import TorchEncoder
from semsearch.v1 import search_pb2 as pb
from service.server import LIVENESS_NAME
from tests.conftest import LiveService
from tests.test_service_grpc import SlowEncoder

DEADLINE_S = 3.0


@pytest.fixture
def own_milvus_server(tmp_path: Path) -> Iterator[object]:
    """A Milvus server this test may stop and restart (the session one is shared)."""
    from semsearch.testing import MilvusTestServer

    with MilvusTestServer(tmp_path / "milvus-server") as server:
        yield server


def health_status(service: LiveService, name: str = "") -> int:
    request = health_pb2.HealthCheckRequest(service=name)
    return health_pb2_grpc.HealthStub(service.channel).Check(request, timeout=5).status


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.milvus_server
def test_milvus_restart_under_load(make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder,
                                   own_milvus_server: object) -> None:
    server = own_milvus_server
    uri = server.uri  # type: ignore[attr-defined]
    service = make_service(tiny_encoder, milvus_uri=uri, milvus_timeout_s=2.0, health_probe_interval_s=0.5)
    acknowledged = [pb.Document(id=f"doc-{n}", text=f"第{n}个问题：如何申请退款？") for n in range(20)]
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=acknowledged), timeout=30)

    outcomes: list[tuple[float, grpc.StatusCode]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="退款", top_k=3), timeout=DEADLINE_S)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
            outcomes.append((time.monotonic() - started, code))
            time.sleep(0.05)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        time.sleep(1)
        server.stop()  # type: ignore[attr-defined]
        wait_for(lambda: health_status(service) == health_pb2.HealthCheckResponse.NOT_SERVING, 30, "NOT_SERVING")
        # Not ready, yet alive: a liveness probe must not restart a replica for a Milvus outage.
        assert health_status(service, LIVENESS_NAME) == health_pb2.HealthCheckResponse.SERVING
        down_since = len(outcomes)
        time.sleep(2 * DEADLINE_S)
        during = outcomes[down_since:]
        with pytest.raises(grpc.RpcError) as refused:
            service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[
                pb.Document(id="during-outage", text="不会被确认的写入")]), timeout=DEADLINE_S)
        assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        server.start()  # type: ignore[attr-defined]  # same data directory, same port
        wait_for(lambda: health_status(service) == health_pb2.HealthCheckResponse.SERVING, 90, "SERVING again")
        wait_for(lambda: bool(outcomes) and outcomes[-1][1] == grpc.StatusCode.OK, 30, "searches to succeed")
    finally:
        stop.set()
        worker.join(30)
    assert during, "no calls were made while Milvus was down"
    assert {code for _, code in during} <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    assert grpc.StatusCode.UNAVAILABLE in {code for _, code in during}
    # Fail fast: nothing hangs past its deadline (plus scheduling slack).
    assert max(elapsed for elapsed, _ in outcomes) < DEADLINE_S + 1.0
    # No acknowledged write was lost.
    engine = service.running.servicer.engine
    assert engine is not None and service.running.store.count(engine.pair.collection.name) == 20
    for document in acknowledged[:3]:
        got = service.stub.GetDocument(pb.GetDocumentRequest(id=document.id), timeout=10)
        assert got.document.text == document.text


def test_deadline_exceeded_work_is_abandoned(make_service: Callable[..., LiveService],
                                             tiny_encoder: TorchEncoder) -> None:
    from semsearch.metrics import RPC_REQUESTS

    slow = SlowEncoder(tiny_encoder, delay_s=0.5)
    service = make_service(slow, microbatch_max_size=1)
    slow.batch_sizes.clear()
    # Server-side outcomes: the client's own timeout makes every client see DEADLINE_EXCEEDED
    # whatever the server does; what is tested is that the server stops working for it.
    left = RPC_REQUESTS.labels(method="SearchDocuments", code="CANCELLED")
    finished = RPC_REQUESTS.labels(method="SearchDocuments", code="OK")
    left_before, finished_before = left._value.get(), finished._value.get()
    futures = [service.stub.SearchDocuments.future(pb.SearchDocumentsRequest(query=f"退款{n}"), timeout=0.3)
               for n in range(10)]
    codes = []
    for future in futures:
        try:
            future.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
    assert set(codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}
    time.sleep(1.5)
    # None ran to its end. Each that started was cancelled; on a loaded machine gRPC may drop a
    # call whose deadline passed before its handler began, so that one is never counted at all.
    assert finished._value.get() == finished_before
    assert left._value.get() - left_before <= 10
    # Callers that left before their turn cost no forward pass.
    assert len(slow.batch_sizes) <= 2

    # A call cancelled while queued behind another: the server drops it and never encodes it.
    engine = service.running.servicer.engine
    assert engine is not None
    slow.batch_sizes.clear()
    left_before = left._value.get()
    blocker = service.stub.SearchDocuments.future(pb.SearchDocumentsRequest(query="占用编码器"), timeout=30)
    cancelled = service.stub.SearchDocuments.future(pb.SearchDocumentsRequest(query="退款"), timeout=30)
    wait_for(lambda: engine.pair.batcher.depth >= 1, 10, "the second call to queue behind the first")
    assert cancelled.cancel()
    assert blocker.result().model_version == tiny_encoder.manifest.version
    wait_for(lambda: left._value.get() - left_before == 1, 10, "the server to see the cancellation")
    assert cancelled.cancelled()
    assert slow.batch_sizes == [1]  # the blocker only: the cancelled call cost no forward pass
    ok = service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="退款"), timeout=30)
    assert ok.model_version == tiny_encoder.manifest.version


LITE_OWNER = """
import sys, time
from semsearch.store import MilvusStore
store = MilvusStore(sys.argv[1])  # the first to open the directory: it serves it (endpoint file)
print("owner", flush=True)
time.sleep(3600)
"""


def start_lite_owner(uri: str) -> subprocess.Popen[str]:
    owner = subprocess.Popen([sys.executable, "-c", LITE_OWNER, uri], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None and owner.stdout.readline().strip() == "owner"
    return owner


def test_lite_owner_restart_under_queries(tmp_path: Path, tiny_encoder: TorchEncoder) -> None:
    """The process that serves a Lite directory (the endpoint file) is killed and another takes over
    while a service attached to it answers queries: no OK answer misses a document, searches succeed
    again within 10 s, and health comes back to SERVING with every document found."""
    from semsearch.config import Settings
    from tests.test_resilience import QueryLoop

    uri = str(tmp_path / "milvus.db")
    owner = start_lite_owner(uri)
    service: LiveService | None = None
    loop: QueryLoop | None = None
    try:
        service = LiveService(Settings(milvus_uri=uri, port=0, metrics_port=0, collection="docs",
                                       health_probe_interval_s=0.5, milvus_timeout_s=5), tiny_encoder)
        assert not service.running.store._lite.owner  # type: ignore[union-attr]  # a client of the owner
        documents = [pb.Document(id=f"lite-{n}", text=f"第{n}个问题：如何申请退款？") for n in range(10)]
        service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=documents), timeout=60)
        collection = service.running.servicer.engine.pair.collection.name  # type: ignore[union-attr]
        service.running.store.flush(collection)  # acknowledged and on disk before the kill
        loop = QueryLoop(service, {document.id for document in documents})
        wait_for(lambda: bool(loop and loop.answers), 30, "the first answer")
        owner.kill()
        owner.wait(30)
        killed = time.monotonic()
        owner = start_lite_owner(uri)  # a new owner (unless the service re-attached first and owns it now)
        wait_for(lambda: loop is not None and loop.first_ok_after(killed + 0.1) is not None, 60, "an OK answer")
        back = loop.first_ok_after(killed + 0.1)
        assert back is not None and back - killed <= 10, (back, killed)
        wait_for(lambda: health_status(service) == health_pb2.HealthCheckResponse.SERVING, 30, "SERVING")
        answer = service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="退款", top_k=20), timeout=5)
        assert {hit.id for hit in answer.hits} == loop.expected
        time.sleep(1)
        loop.stop()
        assert loop.incomplete_oks() == [], "OK answers with documents missing"
    finally:
        if loop is not None:
            loop.stop()
        if service is not None:
            service.stop()
        owner.kill()
        owner.wait(30)
