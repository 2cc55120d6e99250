"""Contract test of the remote reranker against a real third-party server: infinity-emb (its own
virtualenv, `.venv-infinity/`, made by scripts/setup.sh) serving a tiny random-weight
BertForSequenceClassification (num_labels=1, the tiny Chinese vocabulary) from a local directory,
offline, in its default layout (/models, /rerank) and under `--url-prefix /v1`. Our remote scores
must equal the in-process scores of the same directory, and the service must rank through it as
it ranks in-process."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from semsearch.encoders import TorchEncoder
from semsearch.rerankers import RerankerManifest
from semsearch.rerankers.local import TorchReranker
from semsearch.rerankers.remote import RemoteReranker
from semsearch.v1 import search_pb2 as pb
from tests.conftest import LiveService
from tests.infinity_server import InfinityServer, infinity_executable
from tests.test_service_grpc import seed
from tests.tinymodel import build_tiny_cross_encoder

if infinity_executable() is None:
    pytest.skip("infinity-emb is not installed (.venv-infinity/ absent): run bash scripts/setup.sh",
                allow_module_level=True)

QUERY = "退钱怎么操作"
TEXTS = [
    "如何申请退款？请在订单页面点击申请退款",
    "快递包裹几天没动静，物流一直在运输中",
    "手机开不了机，电池发热怎么办",
    "密码忘记了，如何找回账号登录",
    "发票抬头写错能改吗",
    "会员积分等级",
] * 7  # 42 passages: two requests of 32 + 10


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Served under its folder name: the unversioned identity check compares names.
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("infinity-ce") / "tiny-ce", initializer_range=0.3)


@pytest.fixture(scope="module")
def infinity(cross_encoder_dir: Path) -> Iterator[InfinityServer]:
    with InfinityServer(cross_encoder_dir, served_name="tiny-ce") as server:
        yield server


def test_remote_scores_equal_in_process_scores(infinity: InfinityServer, cross_encoder_dir: Path) -> None:
    local = TorchReranker.from_ref(str(cross_encoder_dir), device="cpu")
    remote = RemoteReranker([infinity.url], model_ref=str(cross_encoder_dir))
    try:
        assert remote.manifest.version == local.manifest.version  # from the same weights
        expected = local.score(QUERY, TEXTS)
        assert max(expected) - min(expected) > 1e-2  # spread enough that an order is a real check
        assert remote.score(QUERY, TEXTS) == pytest.approx(expected, abs=1e-5)
        pairs = [(QUERY, TEXTS[0]), ("快递几天没动静", TEXTS[1]), (QUERY, TEXTS[2])]
        assert remote.score_pairs(pairs) == pytest.approx(local.score_pairs(pairs), abs=1e-5)
        assert remote.stats.requests >= 2 and remote.healthy()
    finally:
        remote.close()


@pytest.mark.slow  # a second infinity server (~15 s to start)
def test_the_v1_layout_and_the_sigmoid_activation(cross_encoder_dir: Path, tmp_path: Path) -> None:
    # The same weights with a manifest that asks for sigmoid: infinity is asked for raw scores and
    # the client applies the activation, as in-process.
    copy = shutil.copytree(cross_encoder_dir, tmp_path / "tiny-ce")
    RerankerManifest(name="tiny-ce", version="tiny-ce-sigmoid", max_length=128, activation="sigmoid").save(copy)
    local = TorchReranker.from_ref(str(copy), device="cpu")
    with InfinityServer(cross_encoder_dir, served_name="tiny-ce", url_prefix="/v1") as server:
        remote = RemoteReranker([server.url], model_ref=str(copy))
        try:
            assert remote.manifest.version == "tiny-ce-sigmoid"
            assert remote.score(QUERY, TEXTS[:6]) == pytest.approx(local.score(QUERY, TEXTS[:6]), abs=1e-6)
        finally:
            remote.close()


def test_the_service_reranks_through_infinity(infinity: InfinityServer, cross_encoder_dir: Path,
                                              make_service: Callable[..., LiveService],
                                              tiny_encoder: TorchEncoder) -> None:
    in_process = make_service(tiny_encoder, reranker_model=str(cross_encoder_dir), collection="a")
    remote = make_service(tiny_encoder, reranker_model=str(cross_encoder_dir), reranker_url=infinity.url,
                          collection="b")
    for service in (in_process, remote):
        seed(service, extra=10)
    request = pb.SearchDocumentsRequest(query=QUERY, top_k=5, rerank=True, rerank_candidates=15)
    got = remote.stub.SearchDocuments(request, timeout=60)
    want = in_process.stub.SearchDocuments(request, timeout=60)
    assert got.reranker_version == want.reranker_version != ""
    assert [h.id for h in got.hits] == [h.id for h in want.hits]
    assert [h.rerank_score for h in got.hits] == pytest.approx([h.rerank_score for h in want.hits], abs=1e-5)
