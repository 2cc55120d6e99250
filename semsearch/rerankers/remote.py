"""`RemoteReranker`: the Reranker protocol over the rerank HTTP APIs of model servers.

The servers, their circuits, the identity check, quarantine, retries, failover and health are the
remote encoder's (`RemoteServerClient`); only the request and the answer differ. What a server is
(from the endpoint that told us what it serves) decides where and how it is asked:

    TEI       identity /info; POST /rerank {query, texts, raw_scores, return_text, truncate}
              -> [{index, score}]
    infinity  identity /models (/v1/models with --url-prefix /v1, its cards list `capabilities`);
              POST [/v1]/rerank {model, query, documents, top_n, return_documents, raw_scores}
              -> {results: [{index, relevance_score}], model}
    vLLM      identity /v1/models; POST /v1/rerank {model, query, documents, top_n, return_documents}
              (Jina/Cohere style) -> {results: [{index, relevance_score}], model}
    sglang    identity /model_info; POST /v1/rerank {query, documents, ...} -> [{index, score}]

Raw logits are asked for where the API allows it (TEI, infinity), then the manifest's activation
is applied here, so a remote score equals the in-process score of the same weights. vLLM and
sglang answer with their own activation (sigmoid for a one-label cross-encoder):
`server_activation` says so, and the scores are converted to the manifest's.

An answer is used only when it holds exactly one finite score for each passage sent (indices
0..n-1, each once) and, when it names a model, that model is the one the server was pinned to;
otherwise the request fails over to another server (wrong count) or the server is quarantined
(another model) — such scores are never returned.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, Literal

import httpx
import structlog

from semsearch.encoders.remote.client import RemoteServerClient
from semsearch.encoders.remote.config import Transport
from semsearch.encoders.remote.identity import ServerIdentity
from semsearch.encoders.remote.retry import Quarantined, Transient
from semsearch.encoders.remote.servers import Server
from semsearch.errors import BackendUnavailableError, InvalidInputError, ModelMismatchError, ModelNotFoundError
from semsearch.rerankers.base import Pair, convert, score_by_query
from semsearch.rerankers.manifest import (
    KNOWN_RERANKER_PROFILES,
    Activation,
    RerankerManifest,
    reranker_profile_for,
    resolve_reranker_manifest,
)

log = structlog.get_logger(__name__)

ServerActivation = Literal["auto", "none", "sigmoid"]
# Passages per HTTP request: TEI's default --max-client-batch-size is 32.
DEFAULT_RERANK_MAX_BATCH = 32

# Where the rerank API lives, by the endpoint that said what the server serves.
RERANK_PATHS = {"/info": "/rerank", "/models": "/rerank", "/v1/models": "/v1/rerank",
                "/model_info": "/v1/rerank", "/get_model_info": "/v1/rerank"}


class BadRerankAnswer(Exception):
    """An answer that cannot be used (wrong count, bad index, non-finite score)."""


def request_body(identity: ServerIdentity, query: str, texts: list[str], *, raw: bool) -> dict[str, Any]:
    """The request for one query's passages; `raw`: the server takes `raw_scores` (infinity)."""
    if identity.info_path == "/info":  # TEI
        return {"query": query, "texts": texts, "raw_scores": True, "return_text": False, "truncate": True}
    body: dict[str, Any] = {"query": query, "documents": texts, "top_n": len(texts), "return_documents": False}
    if identity.request_name:  # infinity and vLLM route by model name
        body["model"] = identity.request_name
    if raw:
        body["raw_scores"] = True
    return body


def parse_scores(body: Any, expected: int) -> tuple[list[float], str | None]:
    """Scores in input order and the model the answer names (None when it names none)."""
    model = body.get("model") if isinstance(body, dict) else None
    items = body
    if isinstance(body, dict):
        items = body.get("results", body.get("data"))
    if not isinstance(items, list):
        raise BadRerankAnswer("the answer holds no list of results")
    if len(items) != expected:
        raise BadRerankAnswer(f"answered {len(items)} scores for {expected} passages")
    scores: list[float | None] = [None] * expected
    for item in items:
        if not isinstance(item, dict):
            raise BadRerankAnswer("a result is not an object")
        index, value = item.get("index"), item.get("relevance_score", item.get("score"))
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < expected:
            raise BadRerankAnswer(f"result index {index!r} is not one of 0..{expected - 1}")
        if scores[index] is not None:
            raise BadRerankAnswer(f"result index {index} appears twice")
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise BadRerankAnswer(f"result {index} has no finite score ({value!r})")
        scores[index] = float(value)
    return [float(s) for s in scores if s is not None], None if model is None else str(model)


def takes_raw_scores(identity: ServerIdentity, client: httpx.Client, timeout: float) -> bool:
    """TEI and infinity answer raw logits when asked; vLLM and sglang apply the model's activation.
    infinity under `--url-prefix /v1` looks like vLLM at `/v1/models`, except that its model cards
    list `capabilities`."""
    if identity.info_path in ("/info", "/models"):
        return True
    if identity.info_path != "/v1/models":
        return False
    try:
        cards = client.get("/v1/models", timeout=timeout).json().get("data") or []
    except (httpx.HTTPError, ValueError, AttributeError):
        return False
    return any(isinstance(card, dict) and "capabilities" in card for card in cards)


class RemoteReranker(RemoteServerClient):
    """The `Reranker` protocol over TEI, infinity, vLLM or sglang rerank servers (blocking, thread-safe)."""

    kind = "reranker"

    def __init__(
        self,
        urls: Sequence[str],
        *,
        model_ref: str,
        transport: Transport = Transport(),
        max_batch: int = DEFAULT_RERANK_MAX_BATCH,
        server_activation: ServerActivation = "auto",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.max_batch = max_batch
        self.server_activation: ServerActivation = server_activation
        self._raw: dict[str, bool] = {}  # per server: does it take `raw_scores`
        super().__init__(urls, model_ref=model_ref, transport=transport)
        try:
            self._pinned_identity = self._connect(self._version_for)
            for server in self._servers:
                if server.pinned is not None:
                    self._raw[server.url] = takes_raw_scores(server.pinned, server.client, transport.timeout_s)
        except BaseException:
            self.close()
            raise
        log.info("remote_reranker_ready", servers=self.urls, model_version=self._manifest.version,
                 identity=self._pinned_identity.key,
                 rerank_path=RERANK_PATHS.get(self._pinned_identity.info_path, "/v1/rerank"))

    def _version_for(self, first: ServerIdentity) -> tuple[str, bool]:
        """A local copy of the model gives the manifest (version from its weights, as in-process);
        otherwise a known profile, versioned by the first server's identity."""
        from semsearch.encoders.local import locate_model

        try:
            model_dir = locate_model(self.model_ref)
            self._manifest = resolve_reranker_manifest(model_dir, self.model_ref)
            return self._manifest.version, True
        except ModelNotFoundError as exc:
            profile = reranker_profile_for(self.model_ref) or reranker_profile_for(first.model_path)
            if profile is None:
                raise ModelNotFoundError(
                    f"reranker {self.model_ref!r} has no local copy and no known profile, so its score "
                    "activation and version are unknown: pass a local directory with its config.json "
                    f"(and semsearch_reranker.json or the weights): {exc}") from exc
        identity_text = f"{first.model_path}\n{first.weight_version or ''}\n{first.revision or ''}"
        digest = hashlib.sha256(identity_text.encode()).hexdigest()[:12]
        self._manifest = RerankerManifest(name=profile, version=f"{profile}-remote-{digest}",
                                          model_path=first.model_path, **KNOWN_RERANKER_PROFILES[profile])
        return self._manifest.version, False

    # ----- the Reranker protocol -----

    @property
    def manifest(self) -> RerankerManifest:
        return self._manifest

    def score(self, query: str, texts: Sequence[str], *, timeout_s: float | None = None) -> list[float]:
        if self._closed:
            raise BackendUnavailableError("the remote reranker is closed")
        texts = list(texts)
        if not texts:
            return []
        if not query.strip():
            raise InvalidInputError("the query is empty")
        deadline = None if timeout_s is None else self._clock() + timeout_s
        chunks = [texts[start : start + self.max_batch] for start in range(0, len(texts), self.max_batch)]
        if len(chunks) == 1:
            return self._score_chunk(query, chunks[0], deadline)
        futures: list[Future[list[float]]] = [
            self._executor.submit(self._score_chunk, query, chunk, deadline) for chunk in chunks]
        try:
            return [value for future in futures for value in future.result()]
        finally:
            for future in futures:
                future.cancel()

    def score_pairs(self, pairs: Sequence[Pair], *, timeout_s: float | None = None) -> list[float]:
        return score_by_query(self, pairs, timeout_s)

    # ----- requests -----

    def _score_chunk(self, query: str, texts: list[str], deadline: float | None) -> list[float]:
        last_failed: list[Server] = []

        def attempt() -> list[float]:
            for _ in range(2 * len(self._servers) + 1):
                server = self._acquire_server(deadline, avoid=last_failed[-1:])
                try:
                    return self._post(server, query, texts, deadline)
                except Quarantined:
                    continue
                except Transient:
                    last_failed.append(server)
                    raise
                finally:
                    self._pool.release(server)
            raise ModelMismatchError(f"no reranker server kept serving {self._version!r}")

        return self._retrying(attempt, deadline)

    def _post(self, server: Server, query: str, texts: list[str], deadline: float | None) -> list[float]:
        assert server.pinned is not None
        identity = server.pinned

        def request(timeout: float) -> dict[str, Any]:
            if server.url not in self._raw:  # a server that joined after start-up
                self._raw[server.url] = takes_raw_scores(identity, server.client, timeout)
            return {"json": request_body(identity, query, texts, raw=self._raw[server.url])}

        return self._exchange(
            server, RERANK_PATHS.get(identity.info_path, "/v1/rerank"), deadline, request,
            lambda response: self._parse(server, response, len(texts)),
            not_found="not a rerank server or an unknown model name",
        )

    def _parse(self, server: Server, response: httpx.Response, expected: int) -> list[float]:
        assert server.pinned is not None
        try:
            body = response.json()
        except ValueError as exc:
            raise Transient(f"{server.url}: response is not JSON") from exc
        try:
            scores, model = parse_scores(body, expected)
        except BadRerankAnswer as exc:
            # Never used: a score list that does not match the passages would misorder silently.
            log.error("reranker_answer_refused", server=server.url, reason=str(exc))
            raise Transient(f"{server.url}: refused its answer: {exc}") from exc
        if model is not None and model not in server.pinned.served_names:
            reason = f"answered with model {model!r}, expected {server.pinned.model_path!r} (hot-swapped)"
            self._quarantine(server, reason, sticky=True)
            raise Quarantined(reason)
        given: Activation = "none" if self._raw.get(server.url) else (
            "sigmoid" if self.server_activation == "auto" else self.server_activation)
        return convert(scores, given, self._manifest.activation)
