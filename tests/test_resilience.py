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
from semsearch.store.errors import MilvusTimeoutError
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


class QueryLoop:
    """Searches for every document, over and over, recording (time, code, ids found) until stopped."""

    def __init__(self, service: LiveService, expected: set[str]) -> None:
        import threading

        self.service, self.expected = service, expected
        self.answers: list[tuple[float, grpc.StatusCode, set[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        request = pb.SearchDocumentsRequest(query="退款", top_k=len(self.expected) + 5)
        while not self._stop.is_set():
            try:
                found = {hit.id for hit in self.service.stub.SearchDocuments(request, timeout=5).hits}
                self.answers.append((time.monotonic(), grpc.StatusCode.OK, found))
            except grpc.RpcError as exc:
                self.answers.append((time.monotonic(), exc.code(), set()))
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def incomplete_oks(self) -> list[tuple[float, set[str]]]:
        return [(at, found) for at, code, found in self.answers
                if code == grpc.StatusCode.OK and found != self.expected]

    def first_ok_after(self, moment: float) -> float | None:
        return next((at for at, code, _ in self.answers if at > moment and code == grpc.StatusCode.OK), None)


def first_direct_search(uri: str, collection: str, vector: list[float], since: float) -> float:
    """When Milvus itself first answers a search of the collection (a client of our own, polling)."""
    from pymilvus import MilvusClient

    while time.monotonic() - since < 180:
        try:
            client = MilvusClient(uri=uri, timeout=2)
            try:
                client.search(collection, data=[vector], limit=1, timeout=2)
                return time.monotonic()
            finally:
                client.close()
        except Exception:
            time.sleep(0.2)
    raise AssertionError("the restarted Milvus server never answered a search")


def milvus_answers(uri: str, collection: str, vector: list[float]) -> bool:
    """Whether Milvus itself answers a search of the collection now (a client of our own, one try)."""
    from pymilvus import MilvusClient

    try:
        client = MilvusClient(uri=uri, timeout=5)
        try:
            client.search(collection, data=[vector], limit=1, timeout=5)
        finally:
            client.close()
    except Exception:
        return False
    return True


def search_while_milvus_answers(service: LiveService, uri: str, collection: str, vector: list[float],
                                status: Callable[[], int]) -> pb.SearchDocumentsResponse:
    """A search once health says SERVING (its probe's search answered). Health vouches for the moment
    it probed: a search may fail only if Milvus itself stopped answering since (a freshly restarted
    2.3.5 on a busy machine drops again) or was slower than the service's Milvus deadline (it warms
    up); a failure while Milvus answers at once is a connection the service failed to heal."""
    for _ in range(3):
        try:
            return service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="退款", top_k=20), timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), exc
            if "did not answer" not in (exc.details() or ""):  # not a timeout: the connection failed
                assert not milvus_answers(uri, collection, vector), f"SERVING, Milvus answers, service failed: {exc}"
        deadline = time.monotonic() + 120
        while status() != health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
            time.sleep(0.2)
    raise AssertionError("Milvus kept dropping (or timing out) after its restart: no search to check")


@pytest.mark.milvus_server
def test_the_service_reconnects_after_the_milvus_server_is_killed_and_restarted(
    make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder, tmp_path: Path,
) -> None:
    """Killed and restarted under a query loop: no OK answer misses a document (the restarted
    server reloads the collection for a while), health says SERVING only once a search succeeds,
    and the service answers again within 10 s of Milvus answering a search."""
    server = MilvusTestServer(tmp_path / "milvus-restart")
    server.start()
    loop: QueryLoop | None = None
    try:
        service = make_service(tiny_encoder, milvus_uri=server.uri, health_probe_interval_s=0.5,
                               milvus_timeout_s=5)
        documents = [pb.Document(id=f"kept-{n}", text=f"{SENTENCE}第{n}条") for n in range(12)]
        service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=documents))
        collection = service.running.servicer.engine.pair.collection.name  # type: ignore[union-attr]
        vector = tiny_encoder.encode_queries(["退款"])[0].tolist()
        health = health_pb2_grpc.HealthStub(service.channel)

        def status() -> int:
            return int(health.Check(health_pb2.HealthCheckRequest(), timeout=15).status)

        loop = QueryLoop(service, {document.id for document in documents})
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
        prober = ThreadPoolExecutor(max_workers=1)
        direct = prober.submit(first_direct_search, server.uri, collection, vector, restarted)
        while status() != health_pb2.HealthCheckResponse.SERVING and time.monotonic() - restarted < 120:
            time.sleep(0.2)
        assert status() == health_pb2.HealthCheckResponse.SERVING, "never SERVING again"
        # SERVING means a search succeeds now, with every document (a deadline that a busy CI machine
        # cannot miss: "succeeds", not "within 5 s"; a collection still loading fails at once).
        answer = search_while_milvus_answers(service, server.uri, collection, vector, status)
        assert {hit.id for hit in answer.hits} == loop.expected
        milvus_back = direct.result(180)
        prober.shutdown()
        service_back = loop.first_ok_after(milvus_back - 0.5)
        while service_back is None and time.monotonic() - milvus_back < 30:
            time.sleep(0.2)
            service_back = loop.first_ok_after(milvus_back - 0.5)
        assert service_back is not None and service_back - milvus_back <= 10, (service_back, milvus_back)
        loop.stop()
        assert loop.incomplete_oks() == [], "OK answers with documents missing"
        assert service.stub.GetDocument(pb.GetDocumentRequest(id="kept-3"), timeout=10).document.text \
            == documents[3].text
    finally:
        if loop is not None:
            loop.stop()
        server.stop()


def test_reconnect_is_rate_limited(tmp_path: Path) -> None:
    store = MilvusStore(str(tmp_path / "milvus.db"))
    try:
        assert store.reconnect() is True
        assert store.reconnect() is False  # within RECONNECT_INTERVAL_S: no reconnect storm
        assert store.ping()
    finally:
        store.close()


def test_health_needs_a_search_that_answers_not_only_a_loaded_collection(
    make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder,
) -> None:
    """A restarted Milvus server reports the collection loaded while its searches still time out: health
    must say NOT_SERVING then (its probe searches), SERVING once searches answer, and stay alive."""
    from service.server import LIVENESS_NAME

    service = make_service(tiny_encoder, health_probe_interval_s=0.2)
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[pb.Document(id="a", text=SENTENCE)]))
    store = service.running.store
    health = health_pb2_grpc.HealthStub(service.channel)

    def status(name: str = "") -> int:
        return int(health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status)

    def wait_for(wanted: int) -> None:
        deadline = time.monotonic() + 30
        while status() != wanted and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status() == wanted

    answering = store.probe_search

    def times_out(name: str, dimension: int, timeout_s: float) -> None:
        raise MilvusTimeoutError(f"Milvus did not answer search within {timeout_s} s")

    store.probe_search = times_out  # type: ignore[method-assign]
    try:
        assert store.load_state(service.running.servicer.engine.pair.collection.name) == "Loaded"  # type: ignore[union-attr]
        wait_for(health_pb2.HealthCheckResponse.NOT_SERVING)
        assert status(LIVENESS_NAME) == health_pb2.HealthCheckResponse.SERVING
    finally:
        store.probe_search = answering  # type: ignore[method-assign]
    wait_for(health_pb2.HealthCheckResponse.SERVING)


def test_a_slow_milvus_is_a_timeout_and_a_replaced_client_is_retried(tmp_path: Path) -> None:
    """A deadline is a slow server: UNAVAILABLE saying so, with no reconnect (which would close the channel
    under every other call). A call that failed because another thread replaced the client meanwhile is
    repeated on the new client."""
    from concurrent import futures

    never_answers = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    never_answers.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("slow.Slow", {
        "Search": grpc.unary_unary_rpc_method_handler(lambda request, context: time.sleep(3) or b""),
    })])
    port = never_answers.add_insecure_port("127.0.0.1:0")
    never_answers.start()
    store = MilvusStore(str(tmp_path / "milvus.db"))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            slow = channel.unary_unary("/slow.Slow/Search")

            def search(**kwargs: object) -> object:
                return slow(b"", timeout=kwargs["timeout"])

            client = store.client
            with pytest.raises(MilvusTimeoutError, match=r"did not answer search within 0\.2 s") as slow_call:
                store._call(search, timeout=0.2)
            assert slow_call.value.status_code == grpc.StatusCode.UNAVAILABLE
            assert store.client is client  # not reconnected
        stale = store.client
        assert store.reconnect()
        stale.close()
        assert store._call(stale.has_collection, collection_name="absent") is False
    finally:
        store.close()
        never_answers.stop(None)


def test_two_replicas_racing_on_one_id_leave_it_whole_or_absent(
    milvus_uri: str, tmp_path: Path, tiny_encoder: TorchEncoder,
) -> None:
    """Two replicas on one Milvus (Lite: through its endpoint; the server), upsert vs delete and
    upsert vs upsert of one id at once: afterwards the document is absent from get, count and
    search in every mode, or one whole version (bench/bench_replicas.py runs 40 rounds)."""
    from semsearch.config import Settings
    from tests.replica_race import chunk_counts, race

    collection = f"replicas_{int(time.time() * 1000) % 10**9}"
    settings = Settings(milvus_uri=milvus_uri, port=0, metrics_port=0, collection=collection,
                        max_document_chars=200_000, use_registry=False)
    replicas = (LiveService(settings, tiny_encoder), LiveService(settings, tiny_encoder))
    try:
        counts = chunk_counts(replicas[0])
        assert sorted(counts.values()) == sorted(set(counts.values())) and min(counts.values()) >= 2, counts
        lexical = replicas[0].running.servicer.engine.pair.collection.lexical  # type: ignore[union-attr]
        modes = [pb.RETRIEVAL_MODE_DENSE] + ([pb.RETRIEVAL_MODE_LEXICAL, pb.RETRIEVAL_MODE_HYBRID] if lexical else [])
        report = race(replicas, rounds=6, counts=counts, modes=modes)
        assert report.clean, (report.fragments, report.ghosts)
    finally:
        for replica in replicas:
            replica.stop()
