"""`semsearch_inflight_requests`: the gauge the chart's HPA scales on, exported by a real service."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable

from semsearch.encoders import TorchEncoder
from semsearch.v1 import search_pb2 as pb
from tests.conftest import LiveService, free_port


def inflight(port: int) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    match = re.search(r"^semsearch_inflight_requests (\S+)$", body, flags=re.M)
    assert match, "semsearch_inflight_requests is not exported"
    return float(match.group(1))


def test_inflight_requests_gauge(make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder) -> None:
    port = free_port()
    service = make_service(tiny_encoder, metrics_port=port)
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[pb.Document(id="a", text="退款")]), timeout=30)
    assert inflight(port) == 0
    # Batches of 64 long queries keep calls in flight long enough to be seen.
    request = pb.BatchSearchDocumentsRequest(
        requests=[pb.SearchDocumentsRequest(query=f"退款问题{i}" * 20, top_k=1) for i in range(64)])
    futures = [service.stub.BatchSearchDocuments.future(request, timeout=120) for _ in range(4)]
    seen = 0.0
    while not all(f.done() for f in futures):
        seen = max(seen, inflight(port))
        time.sleep(0.01)
    for future in futures:
        future.result()
    assert seen >= 1
    assert inflight(port) == 0  # every call, finished or failed, leaves the gauge
