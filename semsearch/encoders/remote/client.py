"""`RemoteEncoder`: the Encoder protocol over OpenAI-compatible embedding servers.

It ties the parts together: options (config.py), per-server circuit (breaker.py), what a server
serves (identity.py), which server a request goes to (servers.py), retries (retry.py), what an
HTTP status means (status.py) and the wire format (payload.py).

Model identity (core invariant: a query vector is only compared with vectors of the same model
version). The manifest comes from a local copy of `model_ref` when there is one (resolved as the
in-process encoder does, so both backends report the same version for the same weights), otherwise
from a known profile with a version derived from the first server's identity. At start-up and
every `identity_recheck_s` after, each server's identity is re-read (identity.py). Every answer's
`model` must be one of the server's names and every vector of the manifest's dimension, or the
server is quarantined for good. With no server left, calls raise ModelMismatchError
(FAILED_PRECONDITION): vectors of an unexpected model are never returned.
"""

from __future__ import annotations

import dataclasses
import functools
import ssl
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import httpx
import numpy as np
import structlog

from semsearch.encoders.remote.breaker import CircuitBreaker
from semsearch.encoders.remote.config import (
    DEFAULT_ENCODING_FORMAT,
    DEFAULT_MAX_BATCH,
    EncodingFormat,
    Transport,
    check_limits,
    normalize_base_url,
    options_from_settings,
    plain_http_remote_urls,
)
from semsearch.encoders.remote.identity import IdentityPolicy, ServerIdentity, fetch_identity, profile_manifest
from semsearch.encoders.remote.payload import (
    NORM_TOLERANCE,
    DimensionMismatch,
    MalformedPayload,
    ModelChanged,
    checked_norms,
    decode_embeddings,
    normalize_rows,
    request_body,
)
from semsearch.encoders.remote.retry import Quarantined, Transient, retry_transient
from semsearch.encoders.remote.servers import Server, ServerPool
from semsearch.encoders.remote.status import Verdict, classify_status, error_message, retry_after_seconds
from semsearch.errors import (
    BackendUnavailableError,
    InvalidInputError,
    ModelMismatchError,
    ModelNotFoundError,
    SemsearchError,
)
from semsearch.manifest import MANIFEST_FILENAME, ModelManifest, resolve_manifest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from semsearch.config import Settings

log = structlog.get_logger(__name__)
T = TypeVar("T")

HEALTH_PROBE_TIMEOUT_S = 2.0


@dataclass
class RemoteStats:
    """Counters for tests, benchmarks and debugging (approximate under concurrency)."""

    requests: int = 0
    retries: int = 0
    failovers: int = 0
    identity_checks: int = 0
    norm_flagged: int = 0
    per_server: dict[str, int] = field(default_factory=dict)


def approximate_token_count(text: str) -> int:
    """An upper bound of the token count without the tokenizer, so that chunks stay under the limit.

    WordPiece (every BERT-family model, BGE included) gives a CJK character or punctuation mark one
    token and splits a word into pieces of at least one character (or one [UNK]): never more tokens
    than non-space characters, plus [CLS] and [SEP]. Exact for Chinese; Latin words count high.
    """
    return sum(1 for ch in text if not ch.isspace()) + 2


class RemoteServerClient:
    """What every client of model servers shares (the remote encoder, the remote reranker): the
    servers (URLs, TLS, key), their circuits and concurrency slots, the model-identity check at
    start-up and on every re-check, quarantine, retries within the caller's deadline, failover and
    health. A subclass supplies the manifest (`_connect`) and the requests."""

    kind = "encoder"  # in messages and log events: "every encoder server is failing"

    def __init__(
        self,
        urls: Sequence[str],
        *,
        model_ref: str,
        transport: Transport,
    ) -> None:
        self.urls = [normalize_base_url(url) for url in urls]
        if not self.urls:
            raise ValueError(f"a remote {self.kind} needs at least one server URL")
        self.model_ref = model_ref
        self.transport = transport
        self.timeout_s = timeout_s = transport.timeout_s
        self.concurrency = concurrency = transport.concurrency
        self.retries = transport.retries
        self.backoff_base_s = transport.backoff_base_s
        self.backoff_max_s = transport.backoff_max_s
        self.identity_recheck_s = transport.identity_recheck_s
        self.health_fresh_s = transport.health_fresh_s
        self.stats = RemoteStats()
        self._clock = clock = transport.clock
        ca_file, api_key = transport.ca_file, transport.api_key
        self._lock = threading.Lock()
        self._closed = False
        self._version = ""  # the model version every server must serve (set at start-up)
        self._pinned_identity: ServerIdentity | None = None
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if api_key:
            for url in plain_http_remote_urls(self.urls):
                log.warning(f"{self.kind}_api_key_over_plain_http", server=url,
                            note="the key crosses the network in clear text: use https")
        self._pool = ServerPool([
            Server(
                url=url,
                client=httpx.Client(
                    base_url=url, headers=headers, verify=verify, timeout=timeout_s,
                    # One connection more than slots: an identity re-check never waits for a request.
                    limits=httpx.Limits(max_connections=concurrency + 1,
                                        max_keepalive_connections=concurrency + 1),
                ),
                breaker=CircuitBreaker(transport.failure_threshold, transport.reset_s, clock),
                slots=threading.BoundedSemaphore(concurrency),
            )
            for url in self.urls
        ], clock)
        self._servers = self._pool.servers
        # Requests of one call run in parallel here; sized so every server's slots can be busy.
        self._executor = ThreadPoolExecutor(max_workers=concurrency * len(self._servers),
                                            thread_name_prefix=f"remote-{self.kind}")

    def healthy(self) -> bool:
        """Can a request be served now: is some server up and serving our model?

        Recent answers are enough; otherwise each server whose circuit allows it is probed
        (its identity endpoint, bounded by a short timeout). False while every server is down
        (circuit open) or quarantined. Blocks for at most a few seconds: call it off the event loop."""
        if self._closed:
            return False
        if self._pool.answered_within(self.health_fresh_s):
            return True
        deadline = self._clock() + min(self.timeout_s, HEALTH_PROBE_TIMEOUT_S)
        for server in self._pool.candidates(avoid=()):
            if server.sticky or not server.breaker.try_acquire():
                continue
            try:
                if not self._verified(server, deadline):
                    continue
            except SemsearchError:  # a refused key, not an embeddings server, the deadline
                server.breaker.release()
                continue
            self._pool.ok(server)
            return True
        return False

    def _verified(self, server: Server, deadline: float | None) -> bool:
        """Re-read a server's identity: False when it is quarantined or failed (recorded); other
        errors are the caller's to handle (its breaker slot is still held)."""
        try:
            self._verify(server, deadline)
        except Quarantined:
            return False
        except Transient as exc:
            self._pool.failed(server, str(exc))
            return False
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        for server in self._servers:
            server.client.close()

    @property
    def identity(self) -> ServerIdentity | None:
        """The identity the fleet was pinned to at start-up (first accepted server)."""
        return self._pinned_identity

    def server_states(self) -> dict[str, str]:
        return self._pool.states()

    def _fetch_identity(self, server: Server, deadline: float | None) -> ServerIdentity:
        self._bump("identity_checks")
        first = server.pinned.info_path if server.pinned is not None else None
        return fetch_identity(server.client, server.url, self._request_timeout(deadline), first)

    def _verify(self, server: Server, deadline: float | None) -> None:
        """Re-read the server's identity; quarantine it when it changed or no longer fits."""
        identity = self._fetch_identity(server, deadline)
        reason = self._policy.changed(server.pinned, identity)
        if reason:
            self._quarantine(server, reason)
            raise Quarantined(reason)
        # The same model: keep what may legitimately move (served names, layout) current.
        server.pinned = identity if server.pinned is None else dataclasses.replace(
            identity, served_names=identity.served_names | server.pinned.served_names)
        server.verified_at = self._clock()
        if server.quarantine_reason:
            log.warning(f"{self.kind}_server_restored", server=server.url, identity=identity.key)
            server.quarantine_reason = None

    def _quarantine(self, server: Server, reason: str, *, sticky: bool = False) -> None:
        server.quarantine(reason, sticky=sticky)
        log.error(f"{self.kind}_server_quarantined", server=server.url, reason=reason,
                  expected_model=self.model_ref, expected_version=self._version)

    def _retrying(self, fn: Callable[[], T], deadline: float | None) -> T:
        def before_retry(attempt: int, exc: BaseException | None, sleep_s: float) -> None:
            self._bump("retries")
            log.warning(f"{self.kind}_request_retry", attempt=attempt, reason=str(exc), sleep_s=round(sleep_s, 3))

        return retry_transient(fn, retries=self.retries, deadline=deadline, clock=self._clock,
                               backoff_base_s=self.backoff_base_s, backoff_max_s=self.backoff_max_s,
                               before_retry=before_retry)

    def _acquire_server(self, deadline: float | None, avoid: Sequence[Server]) -> Server:
        """The least-loaded usable server (not the one that just failed, when there is a choice),
        with one of its concurrency slots. Fails fast when every circuit is open."""
        for server in self._pool.candidates(avoid):
            if server.sticky or not server.breaker.try_acquire():
                continue
            # A probe re-reads the identity first (cheap, and a restarted server may serve another
            # model); the request that follows decides whether the circuit closes.
            due = self._clock() - server.verified_at >= self.identity_recheck_s
            if server.breaker.is_probing() or due or server.quarantine_reason:
                try:
                    if not self._verified(server, deadline):
                        continue
                except BaseException:
                    server.breaker.release()
                    raise
            timeout = None if deadline is None else max(0.0, deadline - self._clock())
            if not self._pool.take_slot(server, timeout):
                raise BackendUnavailableError(
                    f"{self.kind} deadline exceeded waiting for a free slot on {server.url}")
            if avoid and server not in avoid:
                self._bump("failovers")
            return server
        if self._pool.all_quarantined():
            raise ModelMismatchError(
                f"every {self.kind} server serves another model than "
                f"{self.model_ref!r} version {self._version!r}: "
                + "; ".join(f"{s.url} {s.quarantine_reason}" for s in self._servers)
            )
        raise BackendUnavailableError(
            f"every {self.kind} server is failing (circuit open); next probe in {self._pool.retry_in():.1f}s"
        )

    def _request_timeout(self, deadline: float | None) -> float:
        if deadline is None:
            return self.timeout_s
        remaining = deadline - self._clock()
        if remaining <= 0.001:
            raise BackendUnavailableError(f"{self.kind} deadline exceeded")
        return min(self.timeout_s, remaining)

    def _exchange(self, server: Server, path: str, deadline: float | None,
                  request: Callable[[float], dict[str, Any]], parse: Callable[[httpx.Response], T],
                  *, not_found: str) -> T:
        """One POST to one server, and what its answer means for the pool: a parsed answer, a
        Transient failure (retried elsewhere; the server's circuit counts it), or a permanent error.
        `request(timeout)` gives httpx's post arguments; `not_found` says what a 404 suggests."""
        try:
            timeout = self._request_timeout(deadline)
        except BackendUnavailableError:
            server.breaker.release()
            raise
        arguments = request(timeout)
        self._bump("requests", server.url)
        try:
            response = server.client.post(path, timeout=timeout, **arguments)
        except httpx.TimeoutException as exc:
            self._pool.failed(server, f"timed out after {timeout:.2f}s")
            raise Transient(f"{server.url}: timed out after {timeout:.2f}s") from exc
        except httpx.RequestError as exc:  # connection, protocol, decoding
            self._pool.failed(server, f"{type(exc).__name__}: {exc}")
            raise Transient(f"{server.url}: {type(exc).__name__}: {exc}") from exc
        status = response.status_code
        verdict = classify_status(status)
        if verdict is Verdict.OK:
            try:
                answer = parse(response)
            except Transient as exc:
                self._pool.failed(server, str(exc))
                raise
            self._pool.ok(server)
            return answer
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        message = error_message(body, response.text, response.reason_phrase)
        retry_after = retry_after_seconds(response.headers)
        if verdict is Verdict.BUSY:
            self._pool.ok(server)  # alive, only busy: no reason to open its circuit
            raise Transient(f"{server.url}: HTTP 429 {message}", retry_after=retry_after)
        if verdict is Verdict.FAILING:
            self._pool.failed(server, f"HTTP {status}")
            raise Transient(f"{server.url}: HTTP {status} {message}", retry_after=retry_after)
        self._pool.ok(server)  # it answered; the request is what was wrong
        if verdict is Verdict.UNAUTHORIZED:
            raise BackendUnavailableError(f"{server.url} rejected the API key (HTTP {status}): {message}")
        if verdict is Verdict.NOT_FOUND:
            raise BackendUnavailableError(f"{server.url}{path} answered {status} ({message}): {not_found}")
        raise InvalidInputError(f"the {self.kind} server rejected the input (HTTP {status}): {message}")

    def _bump(self, name: str, url: str | None = None, *, count: int = 1) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + count)
            if url is not None:
                self.stats.per_server[url] = self.stats.per_server.get(url, 0) + count

    def _connect(self, version_for: Callable[[ServerIdentity], tuple[str, bool]]) -> ServerIdentity:
        """Ask every server what it serves and pin the ones that may serve our model.

        `version_for(first identity)` gives the version to serve and whether it comes from a local
        copy (exact) or from that first server (then every other server must be the same)."""
        deadline = self._clock() + max(self.timeout_s, 1.0) * (self.retries + 1)
        identities: dict[str, ServerIdentity] = {}
        errors: dict[str, str] = {}
        for server in self._servers:
            try:
                identities[server.url] = self._retrying(
                    functools.partial(self._fetch_identity, server, deadline), deadline)
            except BackendUnavailableError as exc:
                # Others may serve; this one is probed back in (and verified) when its circuit allows.
                errors[server.url] = str(exc)
                server.breaker.force_open()
        if not identities:
            raise BackendUnavailableError(f"no {self.kind} server answered at start-up: {errors}")
        first = identities[next(iter(identities))]
        version, exact = version_for(first)
        self._version = version
        self._policy = IdentityPolicy(self.model_ref, version, None if exact else first)
        accepted: list[str] = []
        for server in self._servers:
            identity = identities.get(server.url)
            if identity is None:
                continue
            reason = self._policy.problem(identity)
            if reason:
                self._quarantine(server, reason)
                continue
            server.pinned = identity
            server.verified_at = server.last_ok = self._clock()
            accepted.append(server.url)
        if not accepted:
            reasons = {s.url: s.quarantine_reason for s in self._servers if s.quarantine_reason}
            raise ModelMismatchError(
                f"no {self.kind} server serves model {self.model_ref!r} version {version!r}: {reasons}"
            )
        pinned = next(s.pinned for s in self._servers if s.pinned is not None)
        if not pinned.versioned:
            log.warning(
                f"{self.kind}_server_unversioned", servers=accepted, model_path=pinned.model_path,
                note="launch sglang with --weight-version <manifest version> so that the model version "
                     "is checked exactly; now only the model name is",
            )
        if errors:
            log.warning(f"{self.kind}_servers_unreachable_at_start", servers=sorted(errors))
        return pinned


class RemoteEncoder(RemoteServerClient):
    """The `Encoder` protocol over one or more OpenAI-compatible embedding servers.

    Blocking and thread-safe. Inputs are split into requests of at most `max_batch` texts, at most
    `concurrency` in flight per server, spread over the healthy servers (least in flight first).
    Each request is retried (tenacity: exponential backoff with full jitter) on connection errors,
    timeouts, 408, 429 and 5xx, on another server when there is one; other 4xx are the caller's
    (InvalidInputError) and never retried. `timeout_s` on a call (the gRPC deadline) bounds the
    whole call, retries and waits included; without it each HTTP request is bounded by `timeout_s`
    of the constructor and the call by the retry count.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        model_ref: str,
        transport: Transport = Transport(),
        max_batch: int = DEFAULT_MAX_BATCH,
        encoding_format: EncodingFormat = DEFAULT_ENCODING_FORMAT,
        norm_tolerance: float = NORM_TOLERANCE,
    ) -> None:
        check_limits(encoding_format=encoding_format, max_batch=max_batch)
        self.max_batch = max_batch
        self.encoding_format: EncodingFormat = encoding_format
        self.norm_tolerance = norm_tolerance
        self._tokenizer_lock = threading.Lock()
        super().__init__(urls, model_ref=model_ref, transport=transport)
        try:
            self._manifest, self._tokenizer, self._pinned_identity = self._start()
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_settings(cls, settings: Settings) -> RemoteEncoder:
        options = options_from_settings(settings)
        return cls(options.urls, model_ref=options.model_ref, transport=options.transport,
                   max_batch=options.max_batch, encoding_format=options.encoding_format)

    # ----- the Encoder protocol -----

    @property
    def manifest(self) -> ModelManifest:
        return self._manifest

    def encode_queries(self, queries: Sequence[str], *, timeout_s: float | None = None) -> np.ndarray:
        # Embedding servers apply no instruction: this is the one place a query gets it.
        return self._encode([self._manifest.apply_query_instruction(q) for q in queries], timeout_s)

    def encode_documents(self, documents: Sequence[str], *, timeout_s: float | None = None) -> np.ndarray:
        return self._encode(list(documents), timeout_s)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        if self._tokenizer is not None:
            with self._tokenizer_lock:  # a fast tokenizer raises "Already borrowed" when shared
                encoded = self._tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
            return [len(ids) for ids in encoded]
        return [approximate_token_count(text) for text in texts]

    # ----- diagnostics -----

    @property
    def counts_tokens_exactly(self) -> bool:
        return self._tokenizer is not None

    # ----- start-up: manifest and identity -----

    def _start(self) -> tuple[ModelManifest, PreTrainedTokenizerBase | None, ServerIdentity]:
        local = self._local_manifest()
        found: list[tuple[ModelManifest, PreTrainedTokenizerBase | None]] = []

        def version_for(first: ServerIdentity) -> tuple[str, bool]:
            manifest, tokenizer = local if local is not None else (profile_manifest(self.model_ref, first), None)
            self._manifest = manifest
            found.append((manifest, tokenizer))
            return manifest.version, local is not None

        pinned = self._connect(version_for)
        manifest, tokenizer = found[0]
        log.info(
            "remote_encoder_ready", servers=self.urls, accepted=[s.url for s in self._servers if s.pinned],
            identity=pinned.key, model_version=manifest.version, dimension=manifest.dimension,
            exact_token_counts=tokenizer is not None, encoding_format=self.encoding_format,
            embeddings_path=pinned.embeddings_path,
        )
        return manifest, tokenizer, pinned

    def _local_manifest(self) -> tuple[ModelManifest, PreTrainedTokenizerBase | None] | None:
        """The manifest (and tokenizer) from a local copy of the model, as the in-process encoder
        resolves it; None when there is no usable local copy. The weights may be left out when a
        semsearch_manifest.json (which holds the version) sits beside config.json and the tokenizer;
        without it the version is a hash of the weights, so they must be there."""
        from semsearch.encoders.local import locate_model

        try:
            model_dir = locate_model(self.model_ref)
        except ModelNotFoundError as exc:
            log.info("remote_encoder_no_local_model", model=self.model_ref, reason=str(exc))
            return None
        has_weights = any(model_dir.glob("*.safetensors")) or any(model_dir.glob("pytorch_model*.bin"))
        if not (model_dir / MANIFEST_FILENAME).exists() and not has_weights:
            log.warning("remote_encoder_local_copy_unversioned", model_dir=str(model_dir),
                        note=f"neither {MANIFEST_FILENAME} nor weights: the version comes from the server")
            return None
        manifest = resolve_manifest(model_dir, self.model_ref)
        return manifest, self._load_tokenizer(model_dir)

    @staticmethod
    def _load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase | None:
        from transformers import AutoTokenizer

        try:
            return cast("PreTrainedTokenizerBase", AutoTokenizer.from_pretrained(str(model_dir)))
        except (OSError, ValueError) as exc:
            log.warning("remote_encoder_tokenizer_unavailable", model_dir=str(model_dir), reason=str(exc),
                        note="token counts are approximate")
            return None


    # ----- encoding -----

    def _encode(self, texts: list[str], timeout_s: float | None) -> np.ndarray:
        if self._closed:
            raise BackendUnavailableError("the remote encoder is closed")
        dimension = self._manifest.dimension
        if not texts:
            return np.empty((0, dimension), dtype=np.float32)
        for i, text in enumerate(texts):
            if not text.strip():
                # Servers reject it anyway; saying which one is kinder than their 400.
                raise InvalidInputError(f"text at index {i} is empty or whitespace only")
        deadline = None if timeout_s is None else self._clock() + timeout_s
        chunks = [texts[start : start + self.max_batch] for start in range(0, len(texts), self.max_batch)]
        if len(chunks) == 1:
            return self._encode_chunk(chunks[0], deadline)
        futures: list[Future[np.ndarray]] = [
            self._executor.submit(self._encode_chunk, chunk, deadline) for chunk in chunks
        ]
        try:
            return np.concatenate([future.result() for future in futures])
        finally:
            for future in futures:
                future.cancel()  # after a failure, chunks not yet started need not run

    def _encode_chunk(self, texts: list[str], deadline: float | None) -> np.ndarray:
        last_failed: list[Server] = []

        def attempt() -> np.ndarray:
            # A quarantined server is skipped at once, without spending a retry.
            for _ in range(2 * len(self._servers) + 1):
                server = self._acquire_server(deadline, avoid=last_failed[-1:])
                try:
                    return self._post(server, texts, deadline)
                except Quarantined:
                    continue
                except Transient:
                    last_failed.append(server)
                    raise
                finally:
                    self._pool.release(server)
            raise ModelMismatchError(f"no encoder server kept serving {self._manifest.version!r}")

        return self._retrying(attempt, deadline)


    def _post(self, server: Server, texts: list[str], deadline: float | None) -> np.ndarray:
        assert server.pinned is not None
        content = request_body(server.pinned.model_name, texts, self.encoding_format)
        return self._exchange(
            server, server.pinned.embeddings_path, deadline,
            lambda timeout: {"content": content, "headers": {"Content-Type": "application/json"}},
            lambda response: self._parse(server, response, len(texts)),
            not_found="not an embeddings server, an unknown model name, or sglang launched without --is-embedding",
        )

    def _parse(self, server: Server, response: httpx.Response, expected: int) -> np.ndarray:
        assert server.pinned is not None
        try:
            body = response.json()
        except ValueError as exc:
            raise Transient(f"{server.url}: response is not JSON") from exc
        try:
            vectors = decode_embeddings(body, expected=expected, dimension=self._manifest.dimension,
                                        served_names=server.pinned.served_names)
            if not self._manifest.normalize:
                checked_norms(vectors)
                return vectors
            report = normalize_rows(vectors, tolerance=self.norm_tolerance)
        except MalformedPayload as exc:
            raise Transient(f"{server.url}: {exc}") from exc
        except ModelChanged as exc:
            # The server was swapped underneath us: these vectors must never be used.
            reason = f"answered with model {exc.model!r}, expected {server.pinned.model_path!r} (hot-swapped)"
            self._quarantine(server, reason, sticky=True)
            raise Quarantined(reason) from exc
        except DimensionMismatch as exc:
            reason = (f"returned vectors of dimension {exc.got}, but the manifest of {self.model_ref!r} "
                      f"says {self._manifest.dimension}: another model")
            self._quarantine(server, reason, sticky=True)
            raise Quarantined(reason) from exc
        if report.flagged:
            self._bump("norm_flagged", count=report.flagged)
            log.warning("encoder_vector_norm_off", server=server.url, count=report.flagged,
                        min_norm=report.min_norm, max_norm=report.max_norm,
                        note="the server does not normalize: check its pooling/normalize config")
        return vectors

