"""The sglang backend against a loopback server that speaks sglang 0.5.x's wire format and serves the
in-process encoder's real vectors: contract, retries, deadlines, failover, circuit breaker, model
identity, and the same rankings through the gRPC service as the in-process backend."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from pydantic import SecretStr

from semsearch.config import Settings
from semsearch.encoders import TorchEncoder, create_encoder
from semsearch.encoders.base import Encoder
from semsearch.encoders.remote import RemoteEncoder, approximate_token_count, parse_encoder_urls
from semsearch.encoders.remote.config import with_transport
from semsearch.errors import BackendUnavailableError, InvalidInputError, ModelMismatchError
from semsearch.manifest import BGE_ZH_INSTRUCTION
from semsearch.v1 import search_pb2 as pb
from tests.embedding_server import EmbeddingServer, random_unit_vectors

DOCS = [
    "如何申请退款？请在订单页面点击申请退款。", "退款审核通过后三个工作日内退回原支付账号。",
    "快递包裹几天没动静怎么办？请联系客服查询物流。", "物流运输中的包裹一般三到五天送达。",
    "手机开不了机，请先给电池充电十分钟。", "手机电池发热是正常的吗？",
    "忘记密码怎么找回？请在登录页面点击找回密码。", "如何注册会员账号？", "会员积分可以换优惠券吗？",
    "会员等级有几个？一共有五个等级。", "发票抬头写错了能改吗？可以在订单页面修改。",
    "保修期是多久？产品保修期是一年。", "维修和更换需要多少天？",
    "支付失败怎么办？请选择其他支付方式。", "重复扣款的钱什么时候退回？",
    "优惠券怎么使用？在提交订单时选择优惠券。", "如何修改收货地址？",
    "如何取消订单？订单发货前可以取消。", "商品价格多少钱？请查看商品页面。",
    "客服工作时间是几点到几点？", "订单提交后多久处理？", "审核完成后会通知我吗？",
    "这个产品有没有大号的？", "七天内可以退货吗？", "积分多少天过期？",
    "登录账号时提示密码错误怎么办？", "快递能改地址吗？", "退钱到哪个账号？",
    "维修完成后怎么取回手机？", "优惠券过期了能不能退？",
]
QUERIES = ["怎么退款", "快递没动静", "手机开不了机", "密码忘记了", "发票抬头写错", "会员积分", "重复扣款"]


class FakeClock:
    """Time that moves only when a test says so: circuit breaker and identity re-checks."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def servers(tiny_encoder: TorchEncoder) -> Iterator[Callable[..., EmbeddingServer]]:
    started: list[EmbeddingServer] = []

    def make(**kwargs: Any) -> EmbeddingServer:
        server = EmbeddingServer.for_encoder(tiny_encoder, **kwargs).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def remote(tiny_model_dir: Path) -> Iterator[Callable[..., RemoteEncoder]]:
    made: list[RemoteEncoder] = []

    def make(*urls: str, **kwargs: Any) -> RemoteEncoder:
        kwargs.setdefault("model_ref", str(tiny_model_dir))
        kwargs.setdefault("backoff_base_s", 0.005)
        kwargs.setdefault("backoff_max_s", 0.02)
        encoder = RemoteEncoder(list(urls), **with_transport(kwargs))
        made.append(encoder)
        return encoder

    yield make
    for encoder in made:
        encoder.close()


def test_satisfies_the_encoder_protocol_and_matches_the_in_process_vectors(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder], tiny_encoder: TorchEncoder,
) -> None:
    server = servers()
    encoder = remote(server.url)
    assert isinstance(encoder, Encoder)
    assert encoder.manifest == tiny_encoder.manifest  # same local manifest: same model version
    np.testing.assert_allclose(encoder.encode_documents(DOCS[:5]), tiny_encoder.encode_documents(DOCS[:5]),
                               atol=1e-6)
    np.testing.assert_allclose(encoder.encode_queries(QUERIES), tiny_encoder.encode_queries(QUERIES),
                               atol=1e-6)
    assert encoder.count_tokens(DOCS) == tiny_encoder.count_tokens(DOCS)
    assert encoder.encode_documents([]).shape == (0, tiny_encoder.manifest.dimension)
    # The instruction is the client's job, once for queries and never for documents.
    documents, queries = (request["input"] for request in server.embedding_requests)
    assert documents == DOCS[:5]
    assert queries == [BGE_ZH_INSTRUCTION + q for q in QUERIES]
    assert all(request["model"] == tiny_encoder.manifest.model_path for request in server.embedding_requests)


@pytest.mark.parametrize("flavor", ["vllm", "tei"])
def test_other_openai_compatible_servers(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder], tiny_encoder: TorchEncoder,
    flavor: str,
) -> None:
    server = servers(flavor=flavor, served_name="tiny-bge")
    encoder = remote(server.url)
    np.testing.assert_array_equal(encoder.encode_documents(DOCS[:4]), tiny_encoder.encode_documents(DOCS[:4]))
    assert encoder.identity is not None
    if flavor == "vllm":  # the served name in requests (vLLM answers 404 otherwise) and in answers
        assert server.embedding_requests[-1]["model"] == "tiny-bge"
    else:  # TEI's model_sha is pinned: a new revision behind the same URL is another model
        assert encoder.identity.revision == server.revision
        server.revision = "4567ef01"
        encoder.identity_recheck_s = 0
        with pytest.raises(ModelMismatchError, match="4567ef01"):
            encoder.encode_documents(DOCS[:1])


@pytest.mark.parametrize(("flavor", "prefix", "suffix", "embeddings"), [
    ("infinity", "", "", "/embeddings"),  # infinity's default layout: /models and /embeddings, no /v1
    ("infinity", "", "/v1", "/embeddings"),  # a user who wrote /v1 anyway
    ("infinity", "/v1", "", "/v1/embeddings"),  # infinity --url-prefix /v1
    ("infinity", "/embed/minilm", "", "/embeddings"),  # behind a path-routing proxy
    ("sglang", "/gpu-a", "/v1", "/v1/embeddings"),
])
def test_url_layouts_with_and_without_v1_and_behind_a_path(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder], tiny_encoder: TorchEncoder,
    flavor: str, prefix: str, suffix: str, embeddings: str,
) -> None:
    server = servers(flavor=flavor, path_prefix=prefix)
    encoder = remote(server.url + suffix)
    np.testing.assert_array_equal(encoder.encode_documents(DOCS[:3]), tiny_encoder.encode_documents(DOCS[:3]))
    base = prefix.removesuffix("/v1")
    assert server.paths[-1] == f"POST {base}{embeddings}"
    assert encoder.identity is not None and encoder.identity.embeddings_path == embeddings
    if flavor == "infinity":  # the endpoint that answered is asked first on re-checks
        encoder.identity_recheck_s = 0
        seen = len(server.paths)
        encoder.encode_documents(DOCS[:1])
        models = embeddings.replace("/embeddings", "/models")
        assert server.paths[seen:] == [f"GET {base}{models}", f"POST {base}{embeddings}"]


def test_order_is_restored_from_index_across_split_requests(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder], tiny_encoder: TorchEncoder,
) -> None:
    server = servers()
    server.reverse_order = True  # OpenAI's contract is `index`, not list position
    encoder = remote(server.url, max_batch=3)
    np.testing.assert_allclose(encoder.encode_documents(DOCS[:10]), tiny_encoder.encode_documents(DOCS[:10]),
                               atol=1e-6)
    assert sorted(len(r["input"]) for r in server.embedding_requests) == [1, 3, 3, 3]


@pytest.mark.parametrize(("encoding_format", "honor_base64"),
                         [("float", True), ("base64", True), ("base64", False)])
def test_float_and_base64_answers_decode_to_the_same_vectors(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder], tiny_encoder: TorchEncoder,
    encoding_format: str, honor_base64: bool,
) -> None:
    # honor_base64=False is sglang <= 0.5.x: it ignores encoding_format and answers floats.
    server = servers(honor_base64=honor_base64)
    encoder = remote(server.url, encoding_format=encoding_format)
    # Bit for bit: float32 survives JSON floats and base64, and unit vectors are not re-normalized.
    np.testing.assert_array_equal(encoder.encode_documents(DOCS), tiny_encoder.encode_documents(DOCS))
    assert server.embedding_requests[-1]["encoding_format"] == encoding_format


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_wrong_dimension_is_another_model(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder], encoding_format: str,
) -> None:
    server = servers()
    encoder = remote(server.url, encoding_format=encoding_format)
    server.dimension = 16
    with pytest.raises(ModelMismatchError, match="dimension"):
        encoder.encode_documents(DOCS[:2])
    assert ModelMismatchError.status_code is grpc.StatusCode.FAILED_PRECONDITION
    calls = server.embedding_calls
    with pytest.raises(ModelMismatchError):  # quarantined: not asked again
        encoder.encode_documents(DOCS[:2])
    assert server.embedding_calls == calls


def test_vectors_far_from_unit_norm_are_flagged_and_renormalized(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder], tiny_encoder: TorchEncoder,
) -> None:
    server = servers()
    server.scale = 3.0
    encoder = remote(server.url)
    vectors = encoder.encode_documents(DOCS[:4])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(vectors, tiny_encoder.encode_documents(DOCS[:4]), atol=1e-6)
    assert encoder.stats.norm_flagged == 4


def test_503_is_retried_until_it_succeeds(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder], tiny_encoder: TorchEncoder,
) -> None:
    server = servers()
    encoder = remote(server.url, retries=3)
    server.statuses.extend([503, 503])
    np.testing.assert_allclose(encoder.encode_documents(DOCS[:3]), tiny_encoder.encode_documents(DOCS[:3]),
                               atol=1e-6)
    assert server.embedding_calls == 3
    assert encoder.stats.retries == 2
    assert encoder.server_states() == {server.url: "closed"}


def test_429_honors_retry_after_and_does_not_open_the_circuit(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder],
) -> None:
    server = servers()
    encoder = remote(server.url, failure_threshold=1)
    server.statuses.append(429)
    server.retry_after = "0.2"
    started = time.perf_counter()
    encoder.encode_documents(DOCS[:1])
    assert time.perf_counter() - started >= 0.2
    assert server.embedding_calls == 2
    assert encoder.server_states() == {server.url: "closed"}


def test_retries_are_bounded_then_unavailable(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder],
) -> None:
    server = servers()
    encoder = remote(server.url, retries=2, failure_threshold=10)
    server.fail_all = 500
    with pytest.raises(BackendUnavailableError, match="after 3 attempts"):
        encoder.encode_documents(DOCS[:1])
    assert server.embedding_calls == 3
    assert BackendUnavailableError.status_code is grpc.StatusCode.UNAVAILABLE


def test_over_long_input_is_the_callers_error_and_not_retried(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder],
) -> None:
    server = servers()
    encoder = remote(server.url, retries=3)
    with pytest.raises(InvalidInputError, match="context length"):
        encoder.encode_documents(["退款" * 100])  # 202 tokens; the model takes 128
    assert server.embedding_calls == 1
    server.statuses.append(422)
    with pytest.raises(InvalidInputError, match="422"):
        encoder.encode_documents(DOCS[:1])
    assert server.embedding_calls == 2
    with pytest.raises(InvalidInputError, match="index 1"):  # caught before the wire
        encoder.encode_documents(["退款", "  "])
    assert server.embedding_calls == 2
    assert InvalidInputError.status_code is grpc.StatusCode.INVALID_ARGUMENT
    assert encoder.server_states() == {server.url: "closed"}


def test_the_callers_deadline_bounds_the_call(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder],
) -> None:
    server = servers()
    encoder = remote(server.url, retries=5, timeout_s=5.0)
    server.delay_s = 1.0
    started = time.perf_counter()
    with pytest.raises(BackendUnavailableError, match="deadline"):
        encoder.encode_queries(QUERIES[:1], timeout_s=0.3)
    assert time.perf_counter() - started < 0.9  # not the server's 1 s
    # Without a deadline each request is bounded by timeout_s, and the call by the retries.
    quick = remote(server.url, retries=1, timeout_s=0.2, failure_threshold=10)
    started = time.perf_counter()
    with pytest.raises(BackendUnavailableError, match="timed out"):
        quick.encode_documents(DOCS[:1])
    assert time.perf_counter() - started < 1.5  # two attempts of 0.2 s, not two of the server's 1 s


def test_failover_to_the_live_server_and_probe_the_dead_one_back_in(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder], tiny_encoder: TorchEncoder,
) -> None:
    first, second = servers(), servers()
    clock = FakeClock()
    encoder = remote(first.url, second.url, failure_threshold=1, reset_s=30, clock=clock)
    first.stop()  # connection refused from now on
    expected = tiny_encoder.encode_documents(DOCS[:6])
    for _ in range(4):
        np.testing.assert_allclose(encoder.encode_documents(DOCS[:6]), expected, atol=1e-6)
    assert encoder.server_states() == {first.url: "open", second.url: "closed"}
    assert encoder.stats.per_server.get(first.url, 0) <= 1  # open after one failure: never tried again
    assert second.embedding_calls == 4
    first.restart()
    clock.now += 31
    np.testing.assert_allclose(encoder.encode_documents(DOCS[:6]), expected, atol=1e-6)
    assert first.embedding_calls == 1  # the probe
    assert encoder.server_states() == {first.url: "closed", second.url: "closed"}


def test_requests_spread_over_servers_within_the_concurrency_limit(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder], tiny_encoder: TorchEncoder,
) -> None:
    first, second = servers(), servers()
    for server in (first, second):
        server.delay_s = 0.05
    encoder = remote(first.url, second.url, max_batch=2, concurrency=2)
    np.testing.assert_allclose(encoder.encode_documents(DOCS[:20]), tiny_encoder.encode_documents(DOCS[:20]),
                               atol=1e-6)
    assert first.embedding_calls + second.embedding_calls == 10
    assert first.embedding_calls >= 2 and second.embedding_calls >= 2
    assert 1 <= first.max_active <= 2 and 1 <= second.max_active <= 2
    assert max(first.max_active, second.max_active) == 2


def test_circuit_breaker_fails_fast_then_half_open_probe(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder],
) -> None:
    server = servers()
    clock = FakeClock()
    encoder = remote(server.url, failure_threshold=2, reset_s=10, retries=5, clock=clock)
    server.fail_all = 503
    with pytest.raises(BackendUnavailableError, match="circuit open"):
        encoder.encode_documents(DOCS[:1])
    assert server.embedding_calls == 2  # opened at the threshold instead of spending 6 attempts
    assert encoder.server_states() == {server.url: "open"}
    started = time.perf_counter()
    with pytest.raises(BackendUnavailableError, match=r"next probe in 10\.0s"):
        encoder.encode_documents(DOCS[:1])
    assert time.perf_counter() - started < 0.5 and server.embedding_calls == 2  # fast, nothing sent
    clock.now += 10  # half-open: one probe, which fails and re-opens at once
    with pytest.raises(BackendUnavailableError, match="circuit open"):
        encoder.encode_documents(DOCS[:1])
    assert server.embedding_calls == 3
    assert encoder.server_states() == {server.url: "open"}
    server.fail_all = None
    clock.now += 10  # half-open again; the server recovered: the probe closes the circuit
    assert encoder.encode_documents(DOCS[:1]).shape == (1, 32)
    assert server.embedding_calls == 4
    assert encoder.server_states() == {server.url: "closed"}


def test_a_response_from_another_model_is_never_returned(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder],
) -> None:
    server = servers()
    encoder = remote(server.url)
    encoder.encode_documents(DOCS[:1])
    server.response_model = "BAAI/bge-large-zh-v1.5"  # swapped underneath; /model_info not yet updated
    with pytest.raises(ModelMismatchError, match=r"bge-large-zh-v1\.5"):
        encoder.encode_documents(DOCS[:1])
    assert encoder.server_states() == {server.url: "quarantined"}
    calls = server.embedding_calls
    with pytest.raises(ModelMismatchError):
        encoder.encode_documents(DOCS[:1])
    assert server.embedding_calls == calls


def test_a_weight_swap_in_place_is_caught_by_the_model_info_recheck(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder],
) -> None:
    # sglang's /update_weights_from_disk keeps model_path (so the answers' `model`) and changes
    # weight_version: only /model_info shows it, re-read every identity_recheck_s.
    server = servers()
    clock = FakeClock()
    encoder = remote(server.url, identity_recheck_s=30, clock=clock)
    encoder.encode_documents(DOCS[:1])
    server.swap_model(server.model_path, weight_version="tiny-zh-bert-finetune-2")
    encoder.encode_documents(DOCS[:1])  # the window: not re-checked yet
    clock.now += 30
    calls = server.embedding_calls
    with pytest.raises(ModelMismatchError, match="finetune-2"):
        encoder.encode_documents(DOCS[:1])
    assert server.embedding_calls == calls  # caught by /model_info before any request
    assert encoder.server_states() == {server.url: "quarantined"}


def test_a_server_restarted_on_another_model_is_caught_by_the_answer(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder],
) -> None:
    server = servers()
    encoder = remote(server.url)
    encoder.encode_documents(DOCS[:1])
    server.swap_model("/models/other-model")
    with pytest.raises(ModelMismatchError, match="other-model"):
        encoder.encode_documents(DOCS[:1])


def test_two_servers_one_swapped_keeps_serving_from_the_other(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder], tiny_encoder: TorchEncoder,
) -> None:
    first, second = servers(), servers()
    encoder = remote(first.url, second.url)
    first.response_model = "some/other-model"
    for _ in range(4):
        np.testing.assert_allclose(encoder.encode_documents(DOCS[:3]),
                                   tiny_encoder.encode_documents(DOCS[:3]), atol=1e-6)
    assert encoder.server_states() == {first.url: "quarantined", second.url: "closed"}


def test_start_up_checks_the_servers_identity_against_the_manifest(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder], tiny_encoder: TorchEncoder,
) -> None:
    version = tiny_encoder.manifest.version
    exact = remote(servers(weight_version=version).url)  # sglang --weight-version <manifest version>
    assert exact.identity is not None and exact.identity.versioned
    with pytest.raises(ModelMismatchError, match="weight version"):
        remote(servers(weight_version="some-other-finetune").url)
    with pytest.raises(ModelMismatchError, match="serves"):
        remote(servers(model_path="/models/bge-large-zh-v1.5").url)
    # A fleet where one server is wrong starts on the right ones and never uses the wrong one.
    good, bad = servers(), servers(weight_version="some-other-finetune")
    encoder = remote(good.url, bad.url)
    encoder.encode_documents(DOCS[:8])
    assert encoder.server_states()[bad.url] == "quarantined" and bad.embedding_calls == 0


def test_without_a_local_copy_the_profile_and_the_servers_identity_make_the_manifest(
    remote: Callable[..., RemoteEncoder],
) -> None:
    ref = "BAAI/bge-small-zh-v1.5"  # not available here: HF_HUB_OFFLINE and no cache
    with (EmbeddingServer(random_unit_vectors(512), model_path=ref, legacy_model_info=True) as server,
          EmbeddingServer(random_unit_vectors(512), model_path=ref, weight_version="v2") as other):
        encoder = remote(server.url, model_ref=ref)
        manifest = encoder.manifest
        assert (manifest.name, manifest.dimension, manifest.pooling) == ("bge-small-zh-v1.5", 512, "cls")
        assert manifest.version.startswith("bge-small-zh-v1.5-remote-")
        assert not encoder.counts_tokens_exactly
        assert encoder.count_tokens(["如何申请退款？", "iPhone 15 开不了机"]) == [9, 14]
        assert encoder.encode_queries(["退款"]).shape == (1, 512)
        assert server.embedding_requests[-1]["input"] == [BGE_ZH_INSTRUCTION + "退款"]
        assert "GET /get_model_info" in server.paths  # the name before sglang's /model_info
        # Another weight version is another model version: that server is refused.
        fleet = remote(server.url, other.url, model_ref=ref)
        fleet.encode_documents(["退款"] * 4)
        assert fleet.server_states()[other.url] == "quarantined" and other.embedding_calls == 0
        # Alone, `other` starts, with its own model version: collections of `server`'s never match it.
        assert remote(other.url, model_ref=ref).manifest.version != manifest.version
        # The derived version is stable for the same server identity.
        assert remote(server.url, model_ref=ref).manifest.version == manifest.version


def test_a_local_copy_without_weights_is_enough_when_it_has_the_manifest(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder], tiny_model_dir: Path,
    tiny_encoder: TorchEncoder, tmp_path: Path,
) -> None:
    light = tmp_path / tiny_model_dir.name  # manifest, config and tokenizer: what the client needs
    shutil.copytree(tiny_model_dir, light, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    encoder = remote(servers().url, model_ref=str(light))
    assert encoder.manifest.version == tiny_encoder.manifest.version
    assert encoder.counts_tokens_exactly and encoder.count_tokens(DOCS) == tiny_encoder.count_tokens(DOCS)


def test_approximate_token_count_errs_high_for_chinese_and_latin(tiny_encoder: TorchEncoder) -> None:
    texts = ["如何申请退款？请在订单页面点击申请退款", "abc 123 退款", "", "密码忘记了！！！"]
    for text, exact in zip(texts, tiny_encoder.count_tokens(texts), strict=True):
        assert approximate_token_count(text) >= exact


def test_api_key_is_sent_and_a_wrong_one_is_not_retried(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder],
) -> None:
    server = servers(api_key="s3cret")
    remote(server.url, api_key="s3cret").encode_documents(DOCS[:1])
    assert set(server.auth_headers) == {"Bearer s3cret"}
    seen = len(server.paths)
    with pytest.raises(BackendUnavailableError, match="API key"):
        remote(server.url, api_key="wrong", retries=3)
    assert len(server.paths) == seen + 1


def test_from_settings_and_create_encoder(
    servers: Callable[..., EmbeddingServer], tiny_model_dir: Path, tiny_encoder: TorchEncoder,
) -> None:
    first, second = servers(api_key="k"), servers(api_key="k")
    settings = SimpleNamespace(
        encoder_url=f" {first.url}/v1/ ,{second.url}", model=str(tiny_model_dir),
        encoder_api_key=SecretStr("k"),
        encoder_timeout_s=2.5, encoder_max_batch=4, encoder_concurrency=3, encoder_encoding_format="base64",
        encoder_retries=1,
    )
    encoder = RemoteEncoder.from_settings(cast(Settings, settings))
    try:
        assert encoder.urls == [first.url, second.url]
        assert (encoder.timeout_s, encoder.max_batch, encoder.concurrency, encoder.encoding_format,
                encoder.retries) == (2.5, 4, 3, "base64", 1)
        encoder.encode_documents(DOCS[:2])
    finally:
        encoder.close()
    # The real Settings and create_encoder (fields config.py lacks get their defaults).
    created = create_encoder(Settings(model=str(tiny_model_dir), encoder_url=servers().url))
    try:
        assert isinstance(created, RemoteEncoder) and created.manifest == tiny_encoder.manifest
        assert created.encode_queries(QUERIES[:1]).shape == (1, 32)
    finally:
        created.close()
    with pytest.raises(ValueError, match="twice"):
        parse_encoder_urls(f"{first.url},{first.url}/")
    with pytest.raises(ValueError, match="http"):
        parse_encoder_urls("grpc://127.0.0.1:1")


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


def test_https_server_is_verified_with_the_given_ca(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder], tiny_encoder: TorchEncoder,
    tls_cert: tuple[Path, Path],
) -> None:
    cert, key = tls_cert
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = servers(ssl_context=context)
    assert server.url.startswith("https://")
    encoder = remote(server.url, ca_file=str(cert))
    np.testing.assert_allclose(encoder.encode_documents(DOCS[:2]), tiny_encoder.encode_documents(DOCS[:2]),
                               atol=1e-6)
    with pytest.raises(BackendUnavailableError, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
        remote(server.url, retries=0)  # a self-signed certificate is not trusted by default


def test_healthy_follows_the_servers(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder],
) -> None:
    first, second = servers(), servers()
    clock = FakeClock()
    encoder = remote(first.url, second.url, failure_threshold=2, reset_s=10, health_fresh_s=2, clock=clock)
    assert encoder.healthy()
    checks = len(first.paths) + len(second.paths)
    assert encoder.healthy() and len(first.paths) + len(second.paths) == checks  # fresh: nothing sent
    first.stop()
    clock.now += 3  # no recent answer: probe; one server is enough
    assert encoder.healthy()
    second.stop()
    clock.now += 3
    assert not encoder.healthy()  # both refuse connections (one failure each)
    assert not encoder.healthy()  # second failure: both circuits open
    assert encoder.server_states() == {first.url: "open", second.url: "open"}
    checks = len(first.paths) + len(second.paths)
    assert not encoder.healthy() and len(first.paths) + len(second.paths) == checks  # open: nothing sent
    second.restart()
    clock.now += 10  # half-open: the health probe brings it back in
    assert encoder.healthy()
    assert encoder.server_states()[second.url] == "closed"
    assert encoder.encode_documents(DOCS[:1]).shape == (1, 32)
    encoder.close()
    assert not encoder.healthy()


def test_not_healthy_when_every_server_serves_another_model(
    servers: Callable[..., EmbeddingServer], remote: Callable[..., RemoteEncoder],
) -> None:
    server = servers()
    clock = FakeClock()
    encoder = remote(server.url, clock=clock)
    server.swap_model("/models/other-model")
    clock.now += 3
    assert not encoder.healthy()
    assert encoder.server_states() == {server.url: "quarantined"}


class HealthSwitch:
    """The tiny in-process encoder with a health a test sets. In-process encoders report healthy
    whenever they are loaded (LocalEncoder.healthy is `return True`), so what there is to test is
    the service's side of the contract: health follows healthy(), and a probe that hangs is bounded."""

    def __init__(self, inner: TorchEncoder) -> None:
        self.inner = inner
        self.up = True
        self.hang = threading.Event()  # set: healthy() blocks until released
        self.release = threading.Event()
        self.checks = 0

    def __getattr__(self, name: str) -> Any:  # manifest, encode_*, count_tokens: the tiny model's
        return getattr(self.inner, name)

    def healthy(self) -> bool:
        self.checks += 1
        if self.hang.is_set():
            self.release.wait(30)
        return self.up

    def close(self) -> None:
        self.release.set()


def test_service_health_follows_the_encoders_healthy_and_bounds_a_hung_probe(
    make_service: Callable[..., Any], tiny_encoder: TorchEncoder,
) -> None:
    from tests.test_faults import health_status, wait_for

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    encoder = HealthSwitch(tiny_encoder)
    service = make_service(encoder, health_probe_interval_s=0.2)
    assert health_status(service) == serving
    wait_for(lambda: encoder.checks >= 2, 10, "the service to ask the encoder")
    encoder.up = False
    wait_for(lambda: health_status(service) == not_serving, 10, "NOT_SERVING while healthy() is False")
    encoder.up = True
    wait_for(lambda: health_status(service) == serving, 10, "SERVING again")
    # A healthy() that never returns must not wedge the health loop: the probe gives up (1 s here).
    encoder.hang.set()
    started = time.monotonic()
    wait_for(lambda: health_status(service) == not_serving, 10, "NOT_SERVING while healthy() hangs")
    assert time.monotonic() - started < 5
    encoder.hang.clear()
    encoder.release.set()
    wait_for(lambda: health_status(service) == serving, 10, "SERVING once healthy() answers")


def test_service_health_follows_a_killed_and_restarted_encoder_server(
    make_service: Callable[..., Any], servers: Callable[..., EmbeddingServer],
    remote: Callable[..., RemoteEncoder],
) -> None:
    from tests.test_faults import health_status, wait_for

    server = servers()
    service = make_service(remote(server.url, failure_threshold=1, reset_s=0.5, health_fresh_s=0.2),
                           health_probe_interval_s=0.2)
    assert health_status(service) == health_pb2.HealthCheckResponse.SERVING
    service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="退款"), timeout=30)
    server.stop()
    started = time.monotonic()
    wait_for(lambda: health_status(service) == health_pb2.HealthCheckResponse.NOT_SERVING, 10, "NOT_SERVING")
    assert time.monotonic() - started < 5
    with pytest.raises(grpc.RpcError) as refused:
        service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="退款"), timeout=10)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    server.restart()  # the same port
    wait_for(lambda: health_status(service) == health_pb2.HealthCheckResponse.SERVING, 10, "SERVING again")
    service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="退款"), timeout=30)


def _index_and_search(stub: Any) -> list[list[tuple[str, float]]]:
    documents = [pb.Document(id=f"d{i:02d}", text=text) for i, text in enumerate(DOCS)]
    upserted = stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=documents), timeout=60)
    assert upserted.upserted_count == len(DOCS)
    rankings = []
    for query in QUERIES:
        response = stub.SearchDocuments(pb.SearchDocumentsRequest(query=query, top_k=10), timeout=30)
        rankings.append([(hit.id, hit.score) for hit in response.hits])
    return rankings


def test_grpc_service_ranks_the_same_with_the_sglang_backend(
    make_service: Callable[..., Any], servers: Callable[..., EmbeddingServer],
    remote: Callable[..., RemoteEncoder], tiny_encoder: TorchEncoder, tmp_path: Path,
) -> None:
    local_service = make_service(tiny_encoder, milvus_uri=str(tmp_path / "local.db"))
    remote_service = make_service(remote(servers().url, encoding_format="base64"),
                                  milvus_uri=str(tmp_path / "remote.db"))
    local = _index_and_search(local_service.stub)
    over_http = _index_and_search(remote_service.stub)
    for expected, got in zip(local, over_http, strict=True):
        assert [doc_id for doc_id, _ in got] == [doc_id for doc_id, _ in expected]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-5)
    versions = {
        service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="退款"), timeout=30).model_version
        for service in (local_service, remote_service)
    }
    assert versions == {tiny_encoder.manifest.version}
