"""semsearch.client against a real service on loopback: every method, sync and asyncio, API keys,
TLS and mutual TLS, the deadline, gRPC's retry policy with the server's pushback, and waiting for a
server that starts late."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from semsearch.client import AsyncSearchClient, SearchClient, TlsFileError, retry_service_config
from semsearch.config import ApiKey, Settings
from semsearch.encoders import TorchEncoder
from semsearch.v1 import search_pb2 as pb
from tests.conftest import LiveService, free_port

WRITE_KEY = "write-key-0123456789abcdef"
KEYS = [ApiKey(name="writer", key=WRITE_KEY, scope="write")]  # type: ignore[arg-type]
DOCS: list[dict[str, Any]] = [{"id": "refund", "text": "如何申请退款？", "metadata": {"category": "refund"}},
        {"id": "invoice", "text": "发票抬头写错能改吗", "metadata": {"category": "invoice"}},
        {"id": "parcel", "text": "快递包裹几天没动静", "metadata": {"category": "parcel"}}]


def test_sync_client_methods(make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder) -> None:
    service = make_service(tiny_encoder)
    with SearchClient(service.address, timeout=60) as client:
        # Fields as keyword arguments; nested messages as dicts.
        assert client.upsert(documents=DOCS).upserted_count == 3
        got = client.get("refund")
        assert isinstance(got, pb.GetDocumentResponse) and got.document.metadata["category"] == "refund"
        assert client.get(id="invoice").document.text == "发票抬头写错能改吗"
        found = client.search(query="如何申请退款？", top_k=2, mode="RETRIEVAL_MODE_DENSE",
                              filters=[{"field": "category", "operator": "FILTER_OPERATOR_NE",
                                        "value": {"string_value": "invoice"}}])
        assert [hit.id for hit in found.hits] == ["refund", "parcel"]
        # ...or a request message.
        same = client.search(pb.SearchDocumentsRequest(query="如何申请退款？", top_k=1))
        assert same.hits[0].id == "refund" and same.model_version == found.model_version
        batch = client.batch_search(requests=[{"query": "退款"}, {"query": "发票", "top_k": 1}])
        assert [len(r.hits) for r in batch.responses] == [3, 1]
        assert client.serving_state().current.model_version == found.model_version
        assert client.delete(ids=["refund", "nope"]).deleted_count == 1
        with pytest.raises(grpc.RpcError) as missing:
            client.get("refund")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as invalid:
            client.search(query="退款", top_k=-1)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        with pytest.raises(TypeError, match="not both"):
            client.search(pb.SearchDocumentsRequest(query="a"), top_k=3)
        with pytest.raises(ValueError):  # protobuf refuses a field the message does not have
            client.search(query="a", topk=3)


def test_async_client_methods(make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder) -> None:
    service = make_service(tiny_encoder, api_keys=KEYS)

    async def run() -> None:
        async with AsyncSearchClient(service.address, api_key=WRITE_KEY, timeout=60) as client:
            assert (await client.upsert(pb.UpsertDocumentsRequest(documents=[pb.Document(**DOCS[0])]))).upserted_count
            assert (await client.get("refund")).document.text == "如何申请退款？"
            hits = (await client.search(query="退款")).hits
            assert hits[0].id == "refund"
            assert len((await client.batch_search(requests=[{"query": "退款"}])).responses) == 1
            assert (await client.delete(ids=["refund"])).deleted_count == 1
            with pytest.raises(grpc.RpcError) as denied:  # a write key is no admin key
                await client.serving_state()
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        async with AsyncSearchClient(service.address, timeout=60) as anonymous:
            with pytest.raises(grpc.RpcError) as refused:
                await anonymous.search(query="退款")
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]

    asyncio.run(run())


def test_tls_and_mutual_tls(make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder,
                            pki: dict[str, Path], tmp_path: Path) -> None:
    service = make_service(tiny_encoder, tls_cert_file=pki["server.pem"], tls_key_file=pki["server.key"],
                           tls_client_ca_file=pki["ca.pem"])
    address = f"localhost:{service.running.port}"
    with SearchClient(address, tls_ca_file=pki["ca.pem"], tls_client_cert_file=pki["client.pem"],
                      tls_client_key_file=pki["client.key"], timeout=60) as client:
        assert client.upsert(documents=DOCS).upserted_count == 3
    # By IP with the certificate's name; the files as PEM bytes.
    with SearchClient(f"127.0.0.1:{service.running.port}", tls_ca_file=pki["ca.pem"].read_bytes(),
                      tls_client_cert_file=pki["client.pem"].read_bytes(),
                      tls_client_key_file=pki["client.key"].read_bytes(), tls_server_name="localhost",
                      timeout=60) as client:
        assert client.get("parcel").document.text == "快递包裹几天没动静"
    # No client certificate: the handshake fails (UNAVAILABLE), after the attempts the deadline allows.
    with SearchClient(address, tls_ca_file=pki["ca.pem"], timeout=2, max_attempts=2) as client, \
            pytest.raises(grpc.RpcError) as refused:
        client.get("parcel")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    with pytest.raises(TlsFileError, match=r"tls_ca_file .*nope\.pem"):
        SearchClient(address, tls_ca_file=tmp_path / "nope.pem")
    with pytest.raises(TlsFileError, match="tls_client_key_file"):
        SearchClient(address, tls_ca_file=pki["ca.pem"], tls_client_cert_file=pki["client.pem"])


class LateService:
    """A real service that binds `port` only after `delay_s` (a restart, a rollout)."""

    def __init__(self, settings: Settings, encoder: TorchEncoder, delay_s: float) -> None:
        self.service: LiveService | None = None
        self.error: BaseException | None = None

        def start() -> None:
            time.sleep(delay_s)
            try:
                self.service = LiveService(settings, encoder)
            except BaseException as exc:  # surfaced by the test
                self.error = exc

        self.thread = threading.Thread(target=start, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.thread.join(120)
        if self.service is not None:
            self.service.stop()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_waits_for_a_late_server_when_asked(flavour: str, tmp_path: Path, tiny_encoder: TorchEncoder) -> None:
    """wait_for_ready (gRPC's own): the call waits for the service to come up within its deadline."""
    port = free_port()
    settings = Settings(milvus_uri=str(tmp_path / "milvus.db"), host="127.0.0.1", port=port, metrics_port=0,
                        collection="docs", use_registry=False)
    late = LateService(settings, tiny_encoder, delay_s=1.5)
    started = time.monotonic()
    try:
        target = f"127.0.0.1:{port}"
        if flavour == "sync":
            with SearchClient(target, timeout=90, wait_for_ready=True) as client:
                response = client.search(query="退款")
        else:
            async def run() -> pb.SearchDocumentsResponse:
                async with AsyncSearchClient(target, timeout=90, wait_for_ready=True) as client:
                    return await client.search(query="退款")

            response = asyncio.run(run())
        assert late.error is None
        assert response.model_version  # answered by the real service
        assert time.monotonic() - started >= 1.5  # it was down, and the call waited
    finally:
        late.stop()


def test_unreachable_fails_fast_by_default() -> None:
    target = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with SearchClient(target, timeout=30) as client, pytest.raises(grpc.RpcError) as down:
        client.search(query="退款")
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert time.monotonic() - started < 5  # a few quick retries, not the 30 s deadline

    async def run() -> None:
        async with AsyncSearchClient(target, timeout=1.5, wait_for_ready=True) as client:
            with pytest.raises(grpc.RpcError) as waited:
                await client.search(query="退款")
            assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]

    started = time.monotonic()
    asyncio.run(run())
    assert time.monotonic() - started < 5


def test_retry_policy_is_grpcs_service_config() -> None:
    config = json.loads(retry_service_config(max_attempts=100, base_s=0.2, max_wait_s=3))
    [method] = config["methodConfig"]
    assert {"service": "semsearch.v1.SearchService"} in method["name"]
    assert method["retryPolicy"] == {"maxAttempts": 5, "initialBackoff": "0.2s", "maxBackoff": "3s",
                                     "backoffMultiplier": 2,
                                     "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]}
    assert "retryPolicy" not in json.loads(retry_service_config(max_attempts=1))["methodConfig"][0]
    options = dict(SearchClient("127.0.0.1:1").options)
    assert options["grpc.enable_retries"] == 1 and "retryPolicy" in options["grpc.service_config"]


SLOW_KEY = "slow-key-0123456789abcdef"
STUCK_KEY = "stuck-key-0123456789abcdef"
LIMITED = [ApiKey(name="slow", key=SLOW_KEY, scope="search", rate_limit_per_s=2, rate_burst=1),  # type: ignore
           ApiKey(name="stuck", key=STUCK_KEY, scope="search", rate_limit_per_s=0.01, rate_burst=1)]  # type: ignore


def test_the_client_obeys_the_servers_pushback(make_service: Callable[..., LiveService],
                                               tiny_encoder: TorchEncoder) -> None:
    """Over its rate limit a key gets RESOURCE_EXHAUSTED with grpc-retry-pushback-ms (gRFC A6): the
    client's gRPC retry policy waits that long and the call succeeds; when the wait would pass the
    deadline the server sends -1 and the client stops at once."""
    service = make_service(tiny_encoder, api_keys=LIMITED)
    with SearchClient(service.address, api_key=SLOW_KEY, timeout=30) as client:
        client.search(query="退款")  # the burst of 1
        started = time.monotonic()
        assert client.search(query="退款").model_version  # over the limit: waited ~0.5 s, then answered
        assert 0.3 <= time.monotonic() - started < 5
    with SearchClient(service.address, api_key=SLOW_KEY, timeout=30, max_attempts=1) as client, \
            pytest.raises(grpc.RpcError) as refused:
        client.search(query="退款")
        client.search(query="退款")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    metadata: Any = refused.value.trailing_metadata()  # type: ignore[attr-defined]
    trailers = {str(k): str(v) for k, v in metadata}
    assert 0 < int(trailers["grpc-retry-pushback-ms"]) <= 500

    async def stuck() -> grpc.aio.AioRpcError:
        async with AsyncSearchClient(service.address, api_key=STUCK_KEY, timeout=5) as client:
            await client.search(query="退款")
            with pytest.raises(grpc.aio.AioRpcError) as stopped:
                await client.search(query="退款")  # 100 s to wait, 5 s allowed: the server says stop
            return stopped.value

    started = time.monotonic()
    stopped = asyncio.run(stuck())
    assert stopped.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in (stopped.details() or "")
    assert time.monotonic() - started < 4  # not a wait until DEADLINE_EXCEEDED
    stopped_metadata: Any = stopped.trailing_metadata()
    assert dict(stopped_metadata)["grpc-retry-pushback-ms"] == "-1"
