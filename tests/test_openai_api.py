"""POST /v1/embeddings (OpenAI shape) and POST /v1/rerank (TEI/infinity/Cohere shape) on the HTTP port:
called by the official `openai` client, LangChain's OpenAIEmbeddings and the project's own remote
reranker, against a real service on loopback; the vectors are exactly the in-process encoder's."""

from __future__ import annotations

import base64
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import openai
import pytest
from langchain_openai import OpenAIEmbeddings
from prometheus_client import REGISTRY

from semsearch.client import SearchClient
from semsearch.config import ApiKey
from semsearch.encoders import TorchEncoder
from semsearch.rerankers.local import TorchReranker
from tests.conftest import LiveService, free_port
from tests.test_rerank_service import tiny_cross_encoder_dir, tiny_reranker  # noqa: F401 (fixtures)

READ_KEY = "read-key-0123456789abcdef"
WRITE_KEY = "write-key-0123456789abcdef"
KEYS = [ApiKey(name="reader", key=READ_KEY, scope="search"),  # type: ignore[arg-type]
        ApiKey(name="limited", key=WRITE_KEY, scope="write", rate_limit_per_s=0.01, rate_burst=1)]  # type: ignore[arg-type]
TEXTS = ["如何申请退款？", "发票抬头写错能改吗", "快递包裹几天没动静"]


def base_url(service: LiveService) -> str:
    return f"http://127.0.0.1:{service.running.http_port}/v1"


@pytest.fixture
def service(make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder,
            tiny_cross_encoder_dir: Path) -> LiveService:  # noqa: F811
    return make_service(tiny_encoder, http_port=free_port(), api_keys=KEYS, max_embed_inputs=8,
                        reranker_model=str(tiny_cross_encoder_dir))


def test_openai_client_gets_the_in_process_vectors(service: LiveService, tiny_encoder: TorchEncoder) -> None:
    client = openai.OpenAI(base_url=base_url(service), api_key=READ_KEY, max_retries=0)
    expected = tiny_encoder.encode_documents(TEXTS)
    # Without encoding_format the client asks for base64 and decodes it; "float" is the JSON list.
    formats: list[dict[str, Any]] = [{}, {"encoding_format": "float"}]
    for options in formats:
        answer = client.embeddings.create(model="any", input=TEXTS, **options)
        got = np.array([item.embedding for item in answer.data], dtype=np.float32)
        assert np.array_equal(got, expected), options
        assert [item.index for item in answer.data] == [0, 1, 2]
        assert answer.model == tiny_encoder.manifest.version
        assert answer.usage.prompt_tokens == sum(tiny_encoder.count_tokens(TEXTS)) == answer.usage.total_tokens
    raw = client.embeddings.create(model="any", input=TEXTS, encoding_format="base64")  # left to the caller
    decoded = [np.frombuffer(base64.b64decode(item.embedding), dtype="<f4") for item in raw.data]  # type: ignore[arg-type]
    assert np.array_equal(np.stack(decoded), expected)
    query = client.embeddings.create(model="any", input="退钱怎么操作", extra_body={"input_type": "query"})
    assert np.array_equal(np.array(query.data[0].embedding, dtype=np.float32),
                          tiny_encoder.encode_queries(["退钱怎么操作"])[0])
    same = client.embeddings.create(model="any", input="x", dimensions=tiny_encoder.manifest.dimension)
    assert len(same.data[0].embedding) == tiny_encoder.manifest.dimension
    with SearchClient(service.address, api_key=READ_KEY) as grpc_client:  # the Embed RPC behind the route
        vectors = grpc_client.embed(input=TEXTS).embeddings
        assert np.array_equal(np.array([list(v.values) for v in vectors], dtype=np.float32), expected)


def test_langchain_openai_embeddings(service: LiveService, tiny_encoder: TorchEncoder) -> None:
    embeddings = OpenAIEmbeddings(model="semsearch", base_url=base_url(service), api_key=READ_KEY,  # type: ignore[arg-type]
                                  check_embedding_ctx_length=False, chunk_size=2, max_retries=0)
    documents = embeddings.embed_documents(TEXTS)  # three texts in chunks of two: two requests
    assert np.array_equal(np.array(documents, dtype=np.float32), tiny_encoder.encode_documents(TEXTS))
    query = OpenAIEmbeddings(model="semsearch", base_url=base_url(service), api_key=READ_KEY,  # type: ignore[arg-type]
                             check_embedding_ctx_length=False, model_kwargs={"extra_body": {"input_type": "query"}})
    assert np.array_equal(np.array(query.embed_query("退钱怎么操作"), dtype=np.float32),
                          tiny_encoder.encode_queries(["退钱怎么操作"])[0])


def assert_openai_error(response: httpx.Response, status: int, param: str | None, *fragments: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["param"] == param, error
    for fragment in fragments:
        assert fragment in error["message"], error


BAD_EMBEDDINGS: list[tuple[dict[str, Any], str, str]] = [
    ({"input": []}, "input", "non-empty list"),
    ({"input": ["ok", 3]}, "input", "input[1] must be a string"),
    ({"input": [[101, 102]]}, "input", "token arrays"),
    ({"model": "m"}, "input", "input is required"),
    ({"input": ["t"] * 9}, "input", "at most 8"),
    ({"input": ["ok", "   "]}, "input", "input[1] is empty"),
    ({"input": "x", "dimensions": 7}, "dimensions", "not the model's dimension"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
    ({"input": "x", "input_type": "passage"}, "input_type", "'query' or 'document'"),
    ({"input": "x", "inputs": "y"}, "inputs", "unknown field 'inputs'"),
]


def test_bad_embedding_requests_are_400_naming_the_field(service: LiveService) -> None:
    for body, param, fragment in BAD_EMBEDDINGS:
        response = httpx.post(f"{base_url(service)}/embeddings", json=body,
                              headers={"authorization": f"Bearer {READ_KEY}"})
        assert_openai_error(response, 400, param, fragment)


def test_embeddings_need_a_key_and_obey_its_rate_limit(service: LiveService) -> None:
    url = f"{base_url(service)}/embeddings"
    assert_openai_error(httpx.post(url, json={"input": "x"}), 401, None, "missing API key")
    assert httpx.post(url, json={"input": "x"}, headers={"x-api-key": WRITE_KEY}).status_code == 200
    limited = httpx.post(url, json={"input": "x"}, headers={"x-api-key": WRITE_KEY})
    assert_openai_error(limited, 429, None, "rate limit")
    assert int(limited.headers["retry-after"]) >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url(service), api_key="wrong", max_retries=0).embeddings.create(
            model="m", input="x")


def test_rerank_in_tei_and_cohere_shapes(service: LiveService, tiny_reranker: TorchReranker) -> None:  # noqa: F811
    headers = {"authorization": f"Bearer {READ_KEY}"}
    expected = tiny_reranker.score("退钱怎么操作", TEXTS)  # the manifest's activation (raw logits here)
    tei = httpx.post(f"{base_url(service)[:-3]}/v1/rerank", headers=headers,
                     json={"query": "退钱怎么操作", "texts": TEXTS, "raw_scores": True, "return_text": True}).json()
    assert sorted(item["index"] for item in tei) == [0, 1, 2]
    for item in tei:
        assert item["score"] == pytest.approx(expected[item["index"]], abs=1e-5)
        assert item["text"] == TEXTS[item["index"]]
    assert [item["score"] for item in tei] == sorted((item["score"] for item in tei), reverse=True)
    cohere = httpx.post(f"{base_url(service)}/rerank", headers=headers,
                        json={"query": "退钱怎么操作", "documents": [{"text": t} for t in TEXTS], "top_n": 2,
                              "return_documents": True}).json()
    assert cohere["model"] == tiny_reranker.manifest.version and len(cohere["results"]) == 2
    best = cohere["results"][0]
    assert best["index"] == int(np.argmax(expected)) and best["document"] == {"text": TEXTS[best["index"]]}
    assert best["relevance_score"] == pytest.approx(1 / (1 + np.exp(-max(expected))), abs=1e-5)  # probability
    empty = httpx.post(f"{base_url(service)}/rerank", headers=headers, json={"query": "q", "documents": []})
    assert_openai_error(empty, 400, "documents", "non-empty list")
    blank = httpx.post(f"{base_url(service)}/rerank", headers=headers, json={"query": "q", "documents": ["a", " "]})
    assert_openai_error(blank, 400, "documents", "texts[1] is empty")  # the service's check, the caller's name



def test_concurrent_requests_share_forward_passes_and_are_counted(
        make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder) -> None:
    """Documents from concurrent requests meet in one forward pass (the first waits up to 200 ms for
    company); every call is counted under its RPC; without a reranker /v1/rerank is a 400 naming why."""
    service = make_service(tiny_encoder, http_port=free_port(), microbatch_max_wait_ms=200)
    url = f"{base_url(service)}/embeddings"
    before = REGISTRY.get_sample_value("semsearch_rpc_requests_total", {"method": "Embed", "code": "OK"}) or 0
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: httpx.post(url, json={"input": [f"文本{i}"]}, timeout=30), range(8)))
    assert all(answer.status_code == 200 for answer in answers)
    got = np.array([answer.json()["data"][0]["embedding"] for answer in answers], dtype=np.float32)
    assert np.array_equal(got, tiny_encoder.encode_documents([f"文本{i}" for i in range(8)]))
    assert service.running.servicer.embedding.documents.stats.max_batch_seen > 1
    after = REGISTRY.get_sample_value("semsearch_rpc_requests_total", {"method": "Embed", "code": "OK"})
    assert after == before + 8
    no_reranker = httpx.post(f"{base_url(service)}/rerank", json={"query": "q", "texts": ["a"]})
    assert_openai_error(no_reranker, 400, None, "no reranker")
    assert_openai_error(httpx.post(url, content=b"{not json"), 400, None, "not valid UTF-8 JSON")


def json_schema(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` as JSON Schema's `type: [T, "null"]` (the one difference used here)."""
    if isinstance(node, list):
        return [json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: json_schema(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") and "type" in node:
        converted["type"] = [node["type"], "null"]
    return converted


def test_openapi_json_describes_what_the_routes_accept_and_answer(service: LiveService) -> None:
    """GET /openapi.json documents both routes; real requests and answers (both encodings, both rerank
    shapes, an error) validate against what it says, and a body it forbids is one the route refuses."""
    root = base_url(service)[:-3]
    headers = {"authorization": f"Bearer {READ_KEY}"}
    paths = httpx.get(f"{root}/openapi.json").json()["paths"]

    def check(path: str, body: dict[str, Any]) -> httpx.Response:
        operation = paths[path]["post"]
        jsonschema.validate(body, json_schema(operation["requestBody"]["content"]["application/json"]["schema"]))
        answer = httpx.post(f"{root}{path}", headers=headers, json=body)
        documented = operation["responses"]["200" if answer.status_code == 200 else "default"]
        jsonschema.validate(answer.json(), json_schema(documented["content"]["application/json"]["schema"]))
        return answer

    assert check("/v1/embeddings", {"input": TEXTS, "encoding_format": "float"}).status_code == 200
    assert check("/v1/embeddings", {"input": "退钱", "encoding_format": "base64", "input_type": "query"}
                 ).status_code == 200
    assert check("/v1/rerank", {"query": "退钱", "texts": TEXTS, "return_text": True}).status_code == 200
    assert check("/v1/rerank", {"query": "退钱", "documents": [{"text": t} for t in TEXTS], "top_n": 1}
                 ).status_code == 200
    assert check("/v1/embeddings", {"input": ["a", " "]}).status_code == 400  # the error shape is documented too
    forbidden = {"input": "x", "encoding": "float"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(forbidden, paths["/v1/embeddings"]["post"]["requestBody"]["content"][
            "application/json"]["schema"])
    assert_openai_error(httpx.post(f"{root}/v1/embeddings", headers=headers, json=forbidden), 400, "encoding",
                        "unknown field")
