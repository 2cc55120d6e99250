"""Encoder discovery through DNS (`dns+http://<headless Service>:<port>`): each pod its own server.

Two real embedding servers listen on the same port on two loopback addresses (127.0.0.1 and
127.0.0.2), as two pods behind a headless Service would; the resolver answers what the cluster DNS
would answer as pods come and go. The real resolver is exercised with `localhost`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from semsearch.config import Settings
from semsearch.encoders import TorchEncoder, create_encoder
from semsearch.encoders.discovery import (
    DiscoveringEncoder,
    expand_encoder_urls,
    is_discovery_url,
    resolve_addresses,
)
from semsearch.errors import BackendUnavailableError
from tests.conftest import free_port
from tests.embedding_server import EmbeddingServer, _Handler, _Server


class PodServer(EmbeddingServer):
    """An EmbeddingServer bound to one loopback address: a pod IP stand-in."""

    def __init__(self, *args: object, address: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.address = address

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def start(self) -> PodServer:
        httpd = _Server((self.address, self.port), _Handler)
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self


@pytest.fixture
def pods(tiny_encoder: TorchEncoder) -> Iterator[dict[str, PodServer]]:
    port = free_port()
    started = {}
    for address in ("127.0.0.1", "127.0.0.2"):
        server = PodServer(tiny_encoder.encode_documents, model_path=tiny_encoder.manifest.model_path,
                           max_tokens=tiny_encoder.max_tokens, count_tokens=tiny_encoder.count_tokens,
                           weight_version=tiny_encoder.manifest.version, port=port, address=address)
        started[address] = server.start()
    yield started
    for server in started.values():
        server.stop()


def test_expand_encoder_urls() -> None:
    answers = {"sglang": ["10.0.0.7", "10.0.0.3"], "v6": ["fd00::1"], "empty": []}

    def resolve(host: str, port: int) -> list[str]:
        if host not in answers:
            raise OSError(f"Name or service not known: {host}")
        return answers[host]

    assert expand_encoder_urls("dns+http://sglang:30000", resolve) == "http://10.0.0.7:30000,http://10.0.0.3:30000"
    assert expand_encoder_urls("http://static:1,dns+http://v6:30000/v1", resolve) == \
        "http://static:1,http://[fd00::1]:30000/v1"
    assert expand_encoder_urls("http://a:1, http://b:2", resolve) == "http://a:1,http://b:2"
    with pytest.raises(BackendUnavailableError, match="no addresses"):
        expand_encoder_urls("dns+http://empty:30000", resolve)
    with pytest.raises(BackendUnavailableError, match="does not resolve"):
        expand_encoder_urls("dns+http://missing:30000", resolve)
    with pytest.raises(ValueError, match="only dns\\+http"):
        expand_encoder_urls("dns+https://sglang:30000", resolve)
    with pytest.raises(ValueError, match="NAME:PORT"):
        expand_encoder_urls("dns+http://sglang", resolve)
    assert is_discovery_url("http://a:1,dns+http://b:2") and not is_discovery_url("http://a:1")
    assert not is_discovery_url(None)


def test_the_real_resolver() -> None:
    assert "127.0.0.1" in resolve_addresses("localhost", 30000)
    assert "http://127.0.0.1:30000" in expand_encoder_urls("dns+http://localhost:30000").split(",")


def settings_for(url: str, model_dir: Path) -> Settings:
    return Settings(encoder_url=url, model=str(model_dir), encoder_retries=0, encoder_timeout_s=5)


def discovering(port: int, model_dir: Path, answer: list[str]) -> DiscoveringEncoder:
    """A discovering encoder whose DNS answer is `answer` (the test edits it in place)."""
    return DiscoveringEncoder(settings_for(f"dns+http://sglang-headless:{port}", model_dir),
                              interval_s=3600, resolve=lambda host, _: list(answer), close_delay_s=0.2)


def test_each_pod_is_a_server_and_the_set_follows_dns(
    pods: dict[str, PodServer], tiny_model_dir: Path, tiny_encoder: TorchEncoder,
) -> None:
    port = pods["127.0.0.1"].port
    answer = ["127.0.0.1"]
    encoder = discovering(port, tiny_model_dir, answer)
    try:
        assert encoder.urls == f"http://127.0.0.1:{port}"
        expected = tiny_encoder.encode_queries(["退款"])
        np.testing.assert_allclose(encoder.encode_queries(["退款"]), expected, atol=1e-5)
        assert encoder.manifest.version == tiny_encoder.manifest.version

        answer[:] = ["127.0.0.1", "127.0.0.2"]  # scaled to two pods
        assert encoder.refresh()
        assert set(encoder.server_states()) == {f"http://127.0.0.1:{port}", f"http://127.0.0.2:{port}"}
        before = {a: s.embedding_calls for a, s in pods.items()}
        for _ in range(8):
            encoder.encode_documents(["如何申请退款？", "发票抬头写错能改吗"] * 8)
        assert all(pods[a].embedding_calls > before[a] for a in pods), "both pods serve"
        assert not encoder.refresh()  # same answer: nothing rebuilt

        answer[:] = ["127.0.0.2"]  # the first pod was replaced
        old = encoder.current
        assert encoder.refresh()
        calls = pods["127.0.0.1"].embedding_calls
        encoder.encode_documents(["快递包裹几天没动静"])
        assert pods["127.0.0.1"].embedding_calls == calls
        time.sleep(0.5)
        with pytest.raises(Exception):  # noqa: B017 - the replaced client is closed after the delay
            old.encode_documents(["x"])

        answer[:] = []  # a DNS answer with no pods keeps the current set
        assert not encoder.refresh()
        assert encoder.urls == f"http://127.0.0.2:{port}"
    finally:
        encoder.close()


def test_a_pod_serving_another_model_is_refused(
    pods: dict[str, PodServer], tiny_model_dir: Path, tiny_encoder: TorchEncoder,
) -> None:
    port = pods["127.0.0.1"].port
    answer = ["127.0.0.1"]
    encoder = discovering(port, tiny_model_dir, answer)
    try:
        pods["127.0.0.2"].swap_model("/models/other-model", weight_version="other-version")
        answer[:] = ["127.0.0.2"]  # every pod now serves another model: keep the verified set
        assert not encoder.refresh()
        assert encoder.urls == f"http://127.0.0.1:{port}"
        assert encoder.encode_queries(["退款"]).shape == (1, tiny_encoder.manifest.dimension)
    finally:
        encoder.close()


def test_settings_with_a_dns_url_build_a_discovering_encoder(pods: dict[str, PodServer], tiny_model_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    port = pods["127.0.0.1"].port
    encoder = create_encoder(settings_for(f"dns+http://localhost:{port}", tiny_model_dir))
    try:
        assert isinstance(encoder, DiscoveringEncoder)
        assert f"http://127.0.0.1:{port}" in encoder.urls.split(",")
        assert encoder.encode_documents(["退款"]).shape[0] == 1
    finally:
        encoder.close()
