"""The remote reranker over TEI, vLLM and sglang rerank shapes (a loopback stand-in; infinity is
tested for real in test_rerank_infinity.py): scores equal in-process ones; an answer with the wrong
number of scores or from another model is refused, never used."""

from __future__ import annotations

import pytest

from semsearch.encoders.remote.config import Transport
from semsearch.errors import BackendUnavailableError, ModelMismatchError
from semsearch.rerankers.local import TorchReranker
from semsearch.rerankers.remote import RemoteReranker, parse_scores
from tests.rerank_server import LogitsFn, RerankServer
from tests.tinymodel import build_tiny_cross_encoder

QUERY = "退钱怎么操作"
TEXTS = ["如何申请退款", "快递包裹几天没动静", "手机开不了机", "密码忘记了", "发票抬头写错能改吗"]


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> TorchReranker:
    model_dir = build_tiny_cross_encoder(tmp_path_factory.mktemp("remote-ce") / "tiny-ce", initializer_range=0.3)
    return TorchReranker.from_ref(str(model_dir), device="cpu")


def _logits(local: TorchReranker) -> LogitsFn:
    return lambda query, texts: local.score(query, texts)  # activation "none": the logits


@pytest.mark.parametrize("flavor", ["tei", "vllm", "sglang"])
def test_each_api_shape_gives_the_in_process_scores(flavor: str, local: TorchReranker) -> None:
    version = local.manifest.version if flavor == "sglang" else None
    with RerankServer(flavor, "tiny-ce", _logits(local), weight_version=version) as server:
        remote = RemoteReranker([server.url], model_ref=local.manifest.model_path, max_batch=2)
        try:
            assert remote.score(QUERY, TEXTS) == pytest.approx(local.score(QUERY, TEXTS), abs=1e-4)
        finally:
            remote.close()
        # Five passages in requests of at most two (sent in parallel).
        sent = sorted(server.requests, key=lambda body: TEXTS.index((body.get("texts") or body["documents"])[0]))
        assert len(sent) == 3
        if flavor == "tei":
            assert sent[0]["raw_scores"] is True and sent[0]["texts"] == TEXTS[:2]
        else:  # vLLM and sglang answer sigmoid scores; the client turned them back into logits
            assert sent[0]["documents"] == TEXTS[:2] and sent[0]["top_n"] == 2 and "raw_scores" not in sent[0]


def test_a_wrong_number_of_scores_is_refused(local: TorchReranker) -> None:
    with RerankServer("vllm", "tiny-ce", _logits(local)) as server:
        remote = RemoteReranker([server.url], model_ref=local.manifest.model_path,
                                transport=Transport(retries=1, backoff_base_s=0.01))
        try:
            server.drop_one = True
            with pytest.raises(BackendUnavailableError, match="answered 4 scores for 5 passages"):
                remote.score(QUERY, TEXTS)
        finally:
            remote.close()


def test_answers_of_another_model_are_refused(local: TorchReranker) -> None:
    with RerankServer("vllm", "tiny-ce", _logits(local)) as server:
        remote = RemoteReranker([server.url], model_ref=local.manifest.model_path)
        try:
            server.answer_model = "bge-reranker-v2-m3"
            with pytest.raises(ModelMismatchError, match="another model"):
                remote.score(QUERY, TEXTS)
            assert not remote.healthy()
        finally:
            remote.close()
    with RerankServer("tei", "other-reranker", _logits(local)) as server, \
            pytest.raises(ModelMismatchError, match="serves 'other-reranker'"):
        RemoteReranker([server.url], model_ref=local.manifest.model_path)
    with RerankServer("sglang", "tiny-ce", _logits(local), weight_version="tiny-ce-0000") as server, \
            pytest.raises(ModelMismatchError, match="weight version"):
        RemoteReranker([server.url], model_ref=local.manifest.model_path)


@pytest.mark.parametrize(("body", "reason"), [
    ({"results": [{"index": 0, "relevance_score": 1.0}, {"index": 0, "relevance_score": 2.0}]}, "appears twice"),
    ([{"index": 0, "score": 1.0}, {"index": 5, "score": 1.0}], "not one of 0..1"),
    ([{"index": 0, "score": "NaN"}, {"index": 1, "score": 1.0}], "no finite score"),
    ({"object": "list"}, "no list of results"),
])
def test_malformed_answers_are_named(body: object, reason: str) -> None:
    from semsearch.rerankers.remote import BadRerankAnswer

    with pytest.raises(BadRerankAnswer, match=reason):
        parse_scores(body, 2)


def test_answers_come_back_in_input_order() -> None:
    assert parse_scores([{"index": 1, "score": 0.5}, {"index": 0, "score": 2}], 2) == ([2.0, 0.5], None)
