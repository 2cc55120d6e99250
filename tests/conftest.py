"""Shared fixtures: tiny and real models, Milvus Lite and a real Milvus server, a live gRPC service."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest

from semsearch.config import Settings
from semsearch.encoders import STAND_IN_MODEL, TorchEncoder
from semsearch.encoders.base import Encoder
from semsearch.store import MilvusStore
from semsearch.v1 import search_pb2_grpc
from tests.tinymodel import build_tiny_bert

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests run many services in one process: Prometheus ports are opened only where a test asks.
os.environ["SEMSEARCH_METRICS_PORT"] = "0"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model_dir: Path) -> TorchEncoder:
    return TorchEncoder.from_ref(str(tiny_model_dir), device="cpu", batch_size=8)


@pytest.fixture(scope="session")
def minilm_encoder() -> TorchEncoder:
    return TorchEncoder.from_ref(STAND_IN_MODEL, device="cpu")


@pytest.fixture(scope="session")
def milvus_server_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real Milvus 2.3.5 standalone binary, on a free loopback port, for the whole session."""
    try:
        from semsearch.testing import MilvusTestServer

        server = MilvusTestServer(tmp_path_factory.mktemp("milvus-server"))
    except ImportError:
        pytest.skip("the milvus package (real Milvus server) is not installed")
    with server:
        yield server.uri


@pytest.fixture(params=["lite", pytest.param("server", marks=pytest.mark.milvus_server)])
def milvus_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store test runs on Milvus Lite and on the real Milvus server."""
    if request.param == "lite":
        return str(tmp_path / "milvus.db")
    return str(request.getfixturevalue("milvus_server_uri"))


@pytest.fixture
def collection_name(request: pytest.FixtureRequest) -> str:
    # Unique per test: the server fixture is shared by the whole session.
    return "t_" + "".join(ch if ch.isalnum() else "_" for ch in request.node.name)[:60] + f"_{free_port()}"


class LiveService:
    """The real gRPC service on a loopback port, run on its own event loop in a thread."""

    def __init__(self, settings: Settings, encoder: Encoder) -> None:
        from service.server import RunningServer, start_server

        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="service-loop")
        self._thread.start()
        self.running: RunningServer = self.run(start_server(settings))
        self.run(self.running.load(encoder))
        self.channel = grpc.insecure_channel(self.running.address)
        self.stub = search_pb2_grpc.SearchServiceStub(self.channel)

    def run(self, coro: Any, timeout: float = 300) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    @property
    def address(self) -> str:
        return self.running.address

    def stop(self) -> None:
        self.channel.close()
        self.run(self.running.stop(grace_s=2))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture
def make_service(tmp_path: Path) -> Iterator[Callable[..., LiveService]]:
    started: list[LiveService] = []

    def make(encoder: Encoder, **overrides: Any) -> LiveService:
        values: dict[str, Any] = {"milvus_uri": str(tmp_path / "milvus.db"), "host": "127.0.0.1", "port": 0,
                                  "metrics_port": 0,
                                  "collection": "docs"}
        values.update(overrides)
        service = LiveService(Settings(**values), encoder)
        started.append(service)
        return service

    yield make
    for service in started:
        service.stop()


@pytest.fixture
def store_factory() -> Iterator[Callable[[str], MilvusStore]]:
    stores: list[MilvusStore] = []

    def make(uri: str) -> MilvusStore:
        store = MilvusStore(uri, timeout_s=30)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that starts or shares a Milvus server must say so (`-m "not milvus_server"` skips them)."""
    unmarked = [item.nodeid for item in items
                if any("milvus_server" in name for name in getattr(item, "fixturenames", ()))
                and item.get_closest_marker("milvus_server") is None]
    if unmarked:
        raise pytest.UsageError("tests that need the Milvus server lack @pytest.mark.milvus_server: "
                                + ", ".join(unmarked))
    # Longest first: with several workers (-n) the minutes-long flows start at once instead of
    # running alone at the end (a stable sort keeps every module's own order).
    items.sort(key=lambda item: LONGEST_MODULES.index(item.path.name) if item.path.name in LONGEST_MODULES
               else len(LONGEST_MODULES))


LONGEST_MODULES = ["test_user_flows.py", "test_promotion.py", "test_resilience.py", "test_faults.py",
                   "test_indexer.py", "test_recipe.py"]


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: half as many workers again as cores (at least 2, at most 8). The slow tests spend
    most of their time waiting on subprocesses and the Milvus server, not computing."""
    cores = os.cpu_count() or 1
    return max(2, min(8, cores + cores // 2))


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and another CA."""
    import trustme

    ca = trustme.CA()
    directory = tmp_path_factory.mktemp("pki")
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@semsearch")
    other_ca = trustme.CA()  # a CA that signed nothing of this service
    paths = {name: directory / name for name in
             ("ca.pem", "other-ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
    ca.cert_pem.write_to_path(str(paths["ca.pem"]))
    other_ca.cert_pem.write_to_path(str(paths["other-ca.pem"]))
    server.cert_chain_pems[0].write_to_path(str(paths["server.pem"]))
    server.private_key_pem.write_to_path(str(paths["server.key"]))
    client.cert_chain_pems[0].write_to_path(str(paths["client.pem"]))
    client.private_key_pem.write_to_path(str(paths["client.key"]))
    return paths
