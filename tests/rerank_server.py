"""A loopback stand-in for the rerank APIs that differ from infinity's (tested for real in
test_rerank_infinity.py), with faults on demand. Shapes, from their docs and source:

- TEI: GET /info {"model_id", "model_sha", "model_type": {"reranker": ...}};
  POST /rerank {query, texts, raw_scores, return_text, truncate} -> [{"index", "score"}], best first.
- vLLM: GET /v1/models {"data": [{"id", "root", "owned_by": "vllm"}]}; POST /v1/rerank {model, query,
  documents, top_n, return_documents} -> {"id", "model", "usage", "results": [{"index",
  "document", "relevance_score"}]}: sigmoid scores for a one-label cross-encoder.
- sglang: GET /model_info {"model_path", "is_generation": false, "weight_version"}; POST /v1/rerank
  {query, documents} -> [{"score", "document", "index", "meta_info"}]: sigmoid scores.

Scores are real: `logits(query, texts)` of an in-process cross-encoder.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LogitsFn = Callable[[str, list[str]], list[float]]


class RerankServer:
    """`with RerankServer(flavor, model_path, logits) as server:` then `server.url`. Faults:
    `drop_one` answers one score too few; `answer_model` names another model in answers."""

    def __init__(self, flavor: str, model_path: str, logits: LogitsFn, *, weight_version: str | None = None) -> None:
        assert flavor in ("tei", "vllm", "sglang")
        self.flavor = flavor
        self.model_path = model_path
        self.logits = logits
        self.weight_version = weight_version
        self.drop_one = False
        self.answer_model: str | None = None
        self.requests: list[dict[str, Any]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                identity = owner.identity(self.path)
                self._send(200, identity) if identity is not None else self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append(body)
                path = "/rerank" if owner.flavor == "tei" else "/v1/rerank"
                if self.path != path:
                    self._send(404, {"error": "not found"})
                    return
                self._send(200, owner.answer(body))

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def identity(self, path: str) -> dict[str, Any] | None:
        if self.flavor == "tei" and path == "/info":
            return {"model_id": self.model_path, "model_sha": None, "model_type": {"reranker": {"id2label": {}}}}
        if self.flavor == "vllm" and path == "/v1/models":
            return {"object": "list", "data": [{"id": self.model_path, "root": self.model_path, "owned_by": "vllm"}]}
        if self.flavor == "sglang" and path == "/model_info":
            return {"model_path": self.model_path, "is_generation": False, "weight_version": self.weight_version}
        return None

    def answer(self, body: dict[str, Any]) -> Any:
        texts = body["texts"] if self.flavor == "tei" else body["documents"]
        logits = self.logits(body["query"], texts)
        raw = self.flavor == "tei" and body.get("raw_scores")
        scores = logits if raw else [1 / (1 + math.exp(-x)) for x in logits]
        order = sorted(range(len(texts)), key=lambda i: -scores[i])
        if self.drop_one:
            order = order[:-1]
        if self.flavor == "tei":
            return [{"index": i, "score": scores[i]} for i in order]
        if self.flavor == "sglang":
            return [{"score": scores[i], "document": texts[i], "index": i, "meta_info": {}} for i in order]
        return {"id": "rerank-1", "model": self.answer_model or self.model_path, "usage": {"total_tokens": 1},
                "results": [{"index": i, "document": {"text": texts[i]}, "relevance_score": scores[i]} for i in order]}

    def __enter__(self) -> RerankServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
