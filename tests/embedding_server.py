"""A loopback stand-in for an sglang 0.5.x embedding server (`--is-embedding`), with faults on demand.

It follows sglang's documented shapes (python/sglang/srt/entrypoints/http_server.py,
openai/protocol.py, openai/serving_embedding.py):

- POST /v1/embeddings {"model", "input": str | [str], "encoding_format"} ->
  {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [...]}],
   "model": <model_path>, "usage": {"prompt_tokens", "total_tokens", ...}}.
  Errors are {"object": "error", "message", "type", "param", "code"} with HTTP 400: empty input,
  an input longer than the context length, a body that is not application/json.
  sglang up to 0.5.x ignores encoding_format and always answers floats (`honor_base64=False`);
  newer sglang, vLLM and TEI answer base64 little-endian float32 (`honor_base64=True`).
- GET /model_info (and the older /get_model_info): model_path, tokenizer_path, is_generation,
  preferred_sampling_params, weight_version.
- GET /v1/models, GET /health (200 with no body).
- With an API key, everything but /health wants `Authorization: Bearer <key>`, else 401.

`flavor` makes it another OpenAI-compatible server: "vllm", "tei", or "infinity" (infinity-emb's
default layout: GET /models and POST /embeddings at the root, no /v1; FastAPI errors
{"detail": ...}). `path_prefix` serves everything under a path (a path-routing proxy, or infinity's
--url-prefix).

Vectors are real: by default `encode_documents` of an in-process encoder on the raw input (sglang
adds no instruction). Run it alone (`python -m tests.embedding_server --dimension 1024`) for the
benchmark: random unit vectors, no model.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import socket
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

EmbedFn = Callable[[list[str]], np.ndarray]
_MODEL_LOCK = threading.Lock()


def random_unit_vectors(dimension: int) -> EmbedFn:
    """Deterministic per text, cheap, unit norm: for benchmarks and dimension-only tests."""

    def embed(texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), dimension), dtype=np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
            row = np.random.default_rng(seed).standard_normal(dimension).astype(np.float32)
            out[i] = row / np.linalg.norm(row)
        return out

    return embed


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: EmbeddingServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # connections cut by stop() or drop_connection are expected here


class EmbeddingServer:
    """Start with `with EmbeddingServer(...) as server:` (or start()/stop()); `server.url` is the base.

    Faults (set any time): `statuses` - HTTP codes answered, one each, by the next embedding
    requests; `fail_all` - a code for every embedding request; `delay_s` - time before answering;
    `dimension` - cut vectors to this length; `response_model` - the `model` written in answers
    (a swap /model_info does not show); `reverse_order` - data listed last index first;
    `scale` - multiply vectors (a server that does not normalize); `retry_after` - header on 429/503;
    `drop_connection` - close the socket without answering.
    """

    def __init__(
        self,
        embed: EmbedFn,
        *,
        model_path: str,
        weight_version: str = "default",
        max_tokens: int | None = None,
        count_tokens: Callable[[Sequence[str]], list[int]] | None = None,
        api_key: str | None = None,
        honor_base64: bool = True,
        legacy_model_info: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        cache_responses: bool = False,
        flavor: str = "sglang",
        served_name: str | None = None,
        path_prefix: str = "",
        port: int = 0,
    ) -> None:
        if flavor not in ("sglang", "vllm", "tei", "infinity"):
            raise ValueError(f"unknown flavor {flavor!r}")
        self.embed = embed
        self.model_path = model_path
        self.weight_version = weight_version
        self.max_tokens = max_tokens
        self.count_tokens = count_tokens
        self.api_key = api_key
        self.honor_base64 = honor_base64
        self.legacy_model_info = legacy_model_info
        self.ssl_context = ssl_context
        self.cache_responses = cache_responses
        # Other OpenAI-compatible servers: "vllm" (no /model_info; /v1/models lists the served name,
        # which requests must use and answers carry), "tei" (/info with model_id and model_sha).
        self.flavor = flavor
        self.served_name = served_name or model_path
        self.path_prefix = path_prefix.rstrip("/")
        self.revision = "0123abcd"
        self.port = port
        # Faults.
        self.statuses: deque[int] = deque()
        self.fail_all: int | None = None
        self.delay_s = 0.0
        self.dimension: int | None = None
        self.response_model: str | None = None
        self.reverse_order = False
        self.scale = 1.0
        self.retry_after: str | None = None
        self.drop_connection = False
        # Observations.
        self.lock = threading.Lock()
        # One forward pass at a time, as on a GPU; a fast tokenizer also refuses concurrent use, and
        # servers in one test share one encoder: one lock for all of them.
        self.model_lock = _MODEL_LOCK
        self.embedding_requests: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.auth_headers: list[str | None] = []
        self.active = 0
        self.max_active = 0
        self._cache: dict[tuple[str, tuple[str, ...]], bytes] = {}
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    @classmethod
    def for_encoder(cls, encoder: Any, **kwargs: Any) -> EmbeddingServer:
        """Serve an in-process TorchEncoder's document vectors under its model path and limits."""
        kwargs.setdefault("model_path", encoder.manifest.model_path)
        kwargs.setdefault("max_tokens", encoder.max_tokens)
        kwargs.setdefault("count_tokens", encoder.count_tokens)
        return cls(encoder.encode_documents, **kwargs)

    # ----- lifecycle -----

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}{self.path_prefix}"

    def start(self) -> EmbeddingServer:
        httpd = _Server(("127.0.0.1", self.port), _Handler)
        httpd.owner = self
        if self.ssl_context is not None:
            httpd.socket = self.ssl_context.wrap_socket(httpd.socket, server_side=True)
        self.port = int(httpd.server_address[1])
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name=f"embedding-server-{self.port}")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut open keep-alive connections: clients now see connection errors."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        with self.lock:
            connections, self._connections = set(self._connections), set()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        if self._thread is not None:
            self._thread.join(5)

    def restart(self) -> None:
        """Listen again on the same port (a server coming back)."""
        self.start()

    def swap_model(self, model_path: str, weight_version: str = "default") -> None:
        """A hot swap: /model_info and every answer now name the new model."""
        self.model_path = model_path
        self.weight_version = weight_version

    def __enter__(self) -> EmbeddingServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def embedding_calls(self) -> int:
        return len(self.embedding_requests)

    def track(self, conn: socket.socket, opened: bool) -> None:
        with self.lock:
            if opened:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    # ----- answers -----

    def model_info(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "tokenizer_path": self.model_path, "is_generation": False,
                "preferred_sampling_params": None, "weight_version": self.weight_version}

    def models(self) -> dict[str, Any]:
        card: dict[str, Any] = {"id": self.served_name, "object": "model", "created": int(time.time()),
                                "owned_by": self.flavor}
        if self.flavor == "infinity":  # as infinity-emb 0.0.78 answers: no root
            card.update(backend="torch", capabilities=["embed"])
        else:
            card.update(root=self.model_path, max_model_len=self.max_tokens)
        return {"object": "list", "data": [card]}

    def tei_info(self) -> dict[str, Any]:
        return {"model_id": self.model_path, "model_sha": self.revision, "model_dtype": "float16",
                "model_type": {"embedding": {"pooling": "cls"}}, "max_input_length": self.max_tokens,
                "version": "1.5.0"}

    def embeddings(self, body: Any) -> tuple[int, bytes]:
        """(status, body) for one POST /v1/embeddings."""
        if not isinstance(body, dict) or "input" not in body:
            return _error(400, "Field required: input")
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        if not isinstance(texts, list) or not texts:
            return _error(400, "Input cannot be empty")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                return _error(400, "All items in input list must be strings")
            if not text.strip():
                return _error(400, f"Input at index {i} cannot be empty or whitespace only")
        if self.flavor == "vllm" and body.get("model") != self.served_name:
            return _error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        fmt = body.get("encoding_format", "float")
        with self.model_lock:
            counts = self.count_tokens(texts) if self.count_tokens else [0] * len(texts)
        if self.max_tokens is not None:
            for count in counts:
                if count > self.max_tokens:
                    return _error(400, f"The input ({count} tokens) is longer than the model's context "
                                       f"length ({self.max_tokens} tokens).")
        key = (str(fmt), tuple(texts))
        if self.cache_responses and key in self._cache:
            return 200, self._cache[key]
        with self.model_lock:
            vectors = np.asarray(self.embed(texts), dtype=np.float32) * np.float32(self.scale)
        if self.dimension is not None:
            vectors = vectors[:, : self.dimension]
        encoded: list[Any]
        if fmt == "base64" and self.honor_base64:
            encoded = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in vectors]
        else:
            encoded = vectors.tolist()
        data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)]
        if self.reverse_order:
            data.reverse()
        tokens = sum(counts)
        payload = json.dumps({
            "data": data, "object": "list",
            "model": self.response_model or (self.served_name if self.flavor in ("vllm", "infinity")
                                             else self.model_path),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                      "prompt_tokens_details": None},
        }).encode()
        if self.cache_responses:
            self._cache[key] = payload
        return 200, payload


def _error(status: int, message: str, kind: str = "BadRequestError") -> tuple[int, bytes]:
    body = {"object": "error", "message": message, "type": kind, "param": None, "code": status}
    return status, json.dumps(body).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn: the client reuses connections
    # TCP_NODELAY, as uvicorn: headers and body go out in two writes, and Nagle's algorithm with
    # delayed ACKs would add ~40 ms to every small answer.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.owner.track(self.connection, opened=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner.track(self.connection, opened=False)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self, owner: EmbeddingServer) -> bool:
        with owner.lock:
            owner.paths.append(f"{self.command} {self.path}")
            owner.auth_headers.append(self.headers.get("Authorization"))
        if owner.api_key is None or self.path.startswith("/health"):
            return True
        if self.headers.get("Authorization") == f"Bearer {owner.api_key}":
            return True
        self._send(401, json.dumps({"error": "Unauthorized"}).encode())
        return False

    def _route(self, owner: EmbeddingServer) -> str:
        """The path below the server's prefix ("" when outside it: answered 404)."""
        if not owner.path_prefix:
            return self.path
        if self.path.startswith(owner.path_prefix + "/"):
            return self.path[len(owner.path_prefix):]
        return ""

    def do_GET(self) -> None:
        owner = self.server.owner
        if not self._authorized(owner):
            return
        path = self._route(owner)
        sglang = owner.flavor == "sglang"
        api = "" if owner.flavor == "infinity" else "/v1"
        if path in ("/health", "/health_generate"):
            self._send(200)
        elif sglang and (path == "/get_model_info" or (path == "/model_info" and not owner.legacy_model_info)):
            self._send(200, json.dumps(owner.model_info()).encode())
        elif owner.flavor == "tei" and path == "/info":
            self._send(200, json.dumps(owner.tei_info()).encode())
        elif path == f"{api}/models" and owner.flavor != "tei":
            self._send(200, json.dumps(owner.models()).encode())
        else:
            self._send(404, json.dumps({"detail": "Not Found"}).encode())

    def do_POST(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if not self._authorized(owner):
            return
        if self._route(owner) != ("/embeddings" if owner.flavor == "infinity" else "/v1/embeddings"):
            self._send(404, json.dumps({"detail": "Not Found"}).encode())
            return
        with owner.lock:
            owner.active += 1
            owner.max_active = max(owner.max_active, owner.active)
        try:
            self._embeddings(owner, raw)
        finally:
            with owner.lock:
                owner.active -= 1

    def _embeddings(self, owner: EmbeddingServer, raw: bytes) -> None:
        content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        with owner.lock:
            owner.embedding_requests.append(body if isinstance(body, dict) else {"raw": raw[:200]})
            status = owner.statuses.popleft() if owner.statuses else owner.fail_all
        if owner.delay_s:
            time.sleep(owner.delay_s)
        if owner.drop_connection:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if status is not None:
            headers = {"Retry-After": owner.retry_after} if owner.retry_after and status in (429, 503) else {}
            _, payload = _error(status, f"injected fault {status}", "ServiceUnavailableError")
            self._send(status, payload, headers)
            return
        if content_type != "application/json":
            self._send(*_error(400, "Unsupported Media Type: Only 'application/json' is allowed"))
            return
        try:
            answer = owner.embeddings(body)
        except Exception as exc:  # a server bug answers 500, as uvicorn does
            answer = _error(500, f"{type(exc).__name__}: {exc}", "InternalServerError")
        self._send(*answer)


def main(argv: Sequence[str] | None = None) -> None:
    """Serve random unit vectors (no model) until killed; print the URL on the first line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dimension", type=int, default=1024)
    parser.add_argument("--model-path", default="BAAI/bge-large-zh-v1.5")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="simulated GPU time per request")
    parser.add_argument("--cache", action="store_true", help="serve repeated requests from a cache")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server = EmbeddingServer(random_unit_vectors(args.dimension), model_path=args.model_path,
                             cache_responses=args.cache, port=args.port)
    server.delay_s = args.delay_ms / 1000.0
    server.start()
    print(server.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
