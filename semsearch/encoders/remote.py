"""Remote encoder: an OpenAI-compatible embeddings server over HTTP (sglang on GPUs in production).

Wire contract (sglang 0.5.x launched with `--is-embedding`; TEI, vLLM and infinity speak the same):

    POST {base}/v1/embeddings  {"model": ..., "input": [texts], "encoding_format": "float" | "base64"}
      -> {"object": "list", "model": <model_path>, "usage": {...},
          "data": [{"object": "embedding", "index": i, "embedding": [floats] | "<base64 float32 LE>"}]}
    GET  {base}/model_info     -> {"model_path", "tokenizer_path", "is_generation", "weight_version", ...}
                       (/get_model_info before sglang renamed it; /info on TEI; /v1/models elsewhere)

sglang adds no query instruction and, up to 0.5.x, ignores `encoding_format` (always floats): the
client adds the manifest's instruction to queries only, and decodes whichever form comes back.

Model identity (core invariant: a query vector is only compared with vectors of the same model
version). The manifest comes from a local copy of `settings.model` when there is one (resolved as the
in-process encoder does, so both backends report the same version for the same weights), otherwise
from a known profile with a version derived from the first server's (model_path, weight_version).
At start-up and every `identity_recheck_s` after, each server's /model_info is read: launched with
`--weight-version`, it must report exactly the manifest version; without it, a model of the same base
name (weaker). What it reports is then pinned: a later change (a hot swap) quarantines it. Every
answer's `model` must be one of the server's names and every vector of the manifest's dimension, or
the server is quarantined for good. With no server left, calls raise ModelMismatchError
(FAILED_PRECONDITION): vectors of an unexpected model are never returned.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import hashlib
import json
import math
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import httpx
import numpy as np
import structlog
from pydantic import SecretStr
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_any,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from semsearch.errors import (
    BackendUnavailableError,
    InvalidInputError,
    ModelMismatchError,
    ModelNotFoundError,
)
from semsearch.manifest import (
    KNOWN_PROFILES,
    MANIFEST_FILENAME,
    ModelManifest,
    profile_name_for,
    resolve_manifest,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from semsearch.config import Settings

log = structlog.get_logger(__name__)

EncodingFormat = Literal["float", "base64"]

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_BATCH = 32
DEFAULT_CONCURRENCY = 4
DEFAULT_RETRIES = 3
# Asking for base64 is safe everywhere: sglang <= 0.5.x ignores the field and answers floats (which
# we decode too); newer sglang, vLLM, TEI and infinity answer 4x smaller bodies that decode ~20x faster.
DEFAULT_ENCODING_FORMAT: EncodingFormat = "base64"
# A unit vector from an fp16/bf16 server lands within ~1e-3 of norm 1; far beyond that means the
# server does not normalize (wrong pooling config?) and is worth a warning, even though we fix it.
NORM_TOLERANCE = 0.05
# float32 rounding of a normalized vector: within this, it is unit already.
UNIT_NORM_EPSILON = 1e-5
# Honor a server's Retry-After up to this (and never past the caller's deadline).
RETRY_AFTER_CAP_S = 10.0
# sglang's --weight-version default: a server launched without the flag gives no version to check.
UNVERSIONED = frozenset({"", "default"})
# Where each server kind says what it serves, in the order they are tried.
IDENTITY_PATHS = ("/model_info", "/get_model_info", "/info", "/v1/models")


class _Transient(Exception):
    """One attempt failed in a way another attempt may not (connection, timeout, 408/429/5xx)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Quarantined(Exception):
    """The server serves another model than ours: never use it, try the others."""


@dataclass(frozen=True)
class ServerIdentity:
    """What a server says it serves."""

    model_path: str
    weight_version: str | None
    # Names the server may write in a response's `model` field (model path, served names).
    served_names: frozenset[str] = frozenset()
    # What to put in a request's `model`: vLLM wants its served name; sglang and TEI ignore it.
    request_name: str = ""
    # A revision that is not our manifest version but must not change either (TEI's model_sha).
    revision: str | None = None

    @property
    def model_name(self) -> str:
        return self.request_name or self.model_path

    @property
    def versioned(self) -> bool:
        return self.weight_version is not None and self.weight_version not in UNVERSIONED

    @property
    def key(self) -> str:
        revision = f"#{self.revision}" if self.revision else ""
        return f"{self.model_path}@{self.weight_version or 'unversioned'}{revision}"

    def same_as(self, other: ServerIdentity) -> bool:
        return (self.model_path, self.weight_version, self.revision) == (
            other.model_path, other.weight_version, other.revision)


class _StopAtDeadline(stop_base):
    """Stop retrying once the caller's deadline has passed."""

    def __init__(self, deadline: float | None, clock: Callable[[], float]) -> None:
        self.deadline = deadline
        self.clock = clock

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.deadline is not None and self.deadline - self.clock() <= 0.001


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """closed --(N consecutive failures)--> open --(reset_s)--> half-open: one probe --> closed | open.

    An open circuit makes a dead server cost nothing: no connect timeout per call, straight to
    the next server (or a fast UNAVAILABLE when none is left).
    """

    def __init__(self, failure_threshold: int, reset_s: float, clock: Callable[[], float]) -> None:
        self.failure_threshold = max(1, failure_threshold)
        self.reset_s = reset_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        return self._state

    def try_acquire(self) -> bool:
        """May a request use this server now? In half-open, only one (the probe) may."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.reset_s:
                self._state = BreakerState.HALF_OPEN
                self._probe_in_flight = False
            if self._state is BreakerState.HALF_OPEN and not self._probe_in_flight:
                self._probe_in_flight = True
                return True
            return False

    def is_probing(self) -> bool:
        return self._state is BreakerState.HALF_OPEN

    def record_success(self) -> bool:
        """The server answered; True when this closed an open or half-open circuit."""
        with self._lock:
            closed = self._state is not BreakerState.CLOSED
            self._state = BreakerState.CLOSED
            self._failures = 0
            self._probe_in_flight = False
            return closed

    def record_failure(self) -> bool:
        """Count a failure; True when this one opened the circuit."""
        with self._lock:
            self._failures += 1
            if self._state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
                opened = self._state is not BreakerState.OPEN
                self._state = BreakerState.OPEN
                self._opened_at = self._clock()
                self._probe_in_flight = False
                return opened
            return False

    def force_open(self) -> None:
        with self._lock:
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
            self._probe_in_flight = False

    def release(self) -> None:
        """A probe that ended with neither verdict (e.g. the caller's deadline) frees its slot."""
        with self._lock:
            self._probe_in_flight = False

    def retry_in(self) -> float:
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.reset_s - self._clock())


@dataclass(eq=False)  # compared by identity: `server in avoid`
class _Server:
    url: str
    client: httpx.Client
    breaker: CircuitBreaker
    slots: threading.BoundedSemaphore
    inflight: int = 0
    # The identity first accepted for this server: any later change quarantines it.
    pinned: ServerIdentity | None = None
    verified_at: float = -math.inf
    quarantine_reason: str | None = None
    # Quarantined for what it answered (other model, other dimension), not for what /model_info
    # says: a probe of /model_info cannot clear it; only a restart of this process does.
    sticky: bool = False


@dataclass
class RemoteStats:
    """Counters for tests, benchmarks and debugging (approximate under concurrency)."""

    requests: int = 0
    retries: int = 0
    failovers: int = 0
    identity_checks: int = 0
    norm_flagged: int = 0
    per_server: dict[str, int] = field(default_factory=dict)


def normalize_base_url(url: str) -> str:
    """`http://host:30000`, `http://host:30000/` and the OpenAI-style `.../v1` all mean one server."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"encoder URL must be http(s)://host[:port], got {url!r}")
    return url


def parse_encoder_urls(value: str) -> list[str]:
    urls = [normalize_base_url(part) for part in value.split(",") if part.strip()]
    if not urls:
        raise ValueError("--encoder-url is set but names no server")
    if len(set(urls)) != len(urls):
        raise ValueError(f"--encoder-url names a server twice: {value!r}")
    return urls


def approximate_token_count(text: str) -> int:
    """An upper bound of the token count without the tokenizer, so that chunks stay under the limit.

    WordPiece (every BERT-family model, BGE included) gives a CJK character or punctuation mark one
    token and splits a word into pieces of at least one character (or one [UNK]): never more tokens
    than non-space characters, plus [CLS] and [SEP]. Exact for Chinese; Latin words count high.
    """
    return sum(1 for ch in text if not ch.isspace()) + 2


def _model_basename(model_ref: str) -> str:
    return model_ref.rstrip("/").rsplit("/", 1)[-1].lower()


def _retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare from model servers, and our backoff covers it


def _error_message(response: httpx.Response) -> str:
    """The server's reason: OpenAI-style {"message"} / {"error": {"message"}} / {"error": "..."}."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:300]
        if body.get("message"):
            return str(body["message"])[:300]
        if isinstance(error, str):
            return error[:300]
    return str(body)[:300]


class RemoteEncoder:
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
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_batch: int = DEFAULT_MAX_BATCH,
        concurrency: int = DEFAULT_CONCURRENCY,
        encoding_format: EncodingFormat = DEFAULT_ENCODING_FORMAT,
        retries: int = DEFAULT_RETRIES,
        ca_file: str | None = None,
        failure_threshold: int = 3,
        reset_s: float = 5.0,
        backoff_base_s: float = 0.05,
        backoff_max_s: float = 2.0,
        identity_recheck_s: float = 30.0,
        norm_tolerance: float = NORM_TOLERANCE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if encoding_format not in ("float", "base64"):
            raise ValueError(f"encoding_format must be 'float' or 'base64', got {encoding_format!r}")
        if max_batch < 1 or concurrency < 1 or retries < 0 or timeout_s <= 0:
            raise ValueError("max_batch and concurrency must be >= 1, retries >= 0, timeout_s > 0")
        self.urls = [normalize_base_url(url) for url in urls]
        if not self.urls:
            raise ValueError("RemoteEncoder needs at least one server URL")
        self.model_ref = model_ref
        self.timeout_s = timeout_s
        self.max_batch = max_batch
        self.concurrency = concurrency
        self.encoding_format: EncodingFormat = encoding_format
        self.retries = retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.identity_recheck_s = identity_recheck_s
        self.norm_tolerance = norm_tolerance
        self.stats = RemoteStats()
        self._clock = clock
        self._lock = threading.Lock()
        self._rr = 0
        self._closed = False
        self._tokenizer_lock = threading.Lock()
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if api_key:
            for url in self.urls:
                parsed = httpx.URL(url)
                if parsed.scheme == "http" and parsed.host not in ("127.0.0.1", "localhost", "::1"):
                    log.warning("encoder_api_key_over_plain_http", server=url,
                                note="the key crosses the network in clear text: use https")
        self._servers = [
            _Server(
                url=url,
                client=httpx.Client(
                    base_url=url, headers=headers, verify=verify, timeout=timeout_s,
                    # One connection more than slots: an identity re-check never waits for a request.
                    limits=httpx.Limits(max_connections=concurrency + 1,
                                        max_keepalive_connections=concurrency + 1),
                ),
                breaker=CircuitBreaker(failure_threshold, reset_s, clock),
                slots=threading.BoundedSemaphore(concurrency),
            )
            for url in self.urls
        ]
        # Requests of one call run in parallel here; sized so every server's slots can be busy.
        self._pool = ThreadPoolExecutor(max_workers=concurrency * len(self._servers),
                                        thread_name_prefix="remote-encoder")
        try:
            self._manifest, self._tokenizer, self._pinned_identity = self._start()
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_settings(cls, settings: Settings) -> RemoteEncoder:
        """Settings: encoder_url (comma-separated), encoder_api_key, encoder_timeout_s,
        encoder_max_batch, encoder_concurrency, encoder_encoding_format, encoder_retries,
        encoder_ca_file; read with defaults so that older Settings without them still work."""
        if not settings.encoder_url:
            raise ValueError("RemoteEncoder.from_settings needs settings.encoder_url")
        def setting(name: str, default: Any) -> Any:
            value = getattr(settings, name, None)
            return default if value is None else value

        api_key = setting("encoder_api_key", None)
        if isinstance(api_key, SecretStr):
            api_key = api_key.get_secret_value()
        return cls(
            parse_encoder_urls(settings.encoder_url),
            model_ref=settings.model,
            api_key=api_key or None,
            timeout_s=float(setting("encoder_timeout_s", DEFAULT_TIMEOUT_S)),
            max_batch=int(setting("encoder_max_batch", DEFAULT_MAX_BATCH)),
            concurrency=int(setting("encoder_concurrency", DEFAULT_CONCURRENCY)),
            encoding_format=cast(EncodingFormat, setting("encoder_encoding_format", DEFAULT_ENCODING_FORMAT)),
            retries=int(setting("encoder_retries", DEFAULT_RETRIES)),
            ca_file=setting("encoder_ca_file", None),
        )

    # ----- the Encoder protocol -----

    @property
    def manifest(self) -> ModelManifest:
        return self._manifest

    def encode_queries(self, queries: Sequence[str], *, timeout_s: float | None = None) -> np.ndarray:
        # sglang applies no instruction: this is the one place a query gets it.
        return self._encode([self._manifest.apply_query_instruction(q) for q in queries], timeout_s)

    def encode_documents(self, documents: Sequence[str], *, timeout_s: float | None = None) -> np.ndarray:
        return self._encode(list(documents), timeout_s)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        if self._tokenizer is not None:
            with self._tokenizer_lock:  # a fast tokenizer raises "Already borrowed" when shared
                encoded = self._tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
            return [len(ids) for ids in encoded]
        return [approximate_token_count(text) for text in texts]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        for server in self._servers:
            server.client.close()

    # ----- diagnostics -----

    @property
    def identity(self) -> ServerIdentity | None:
        """The identity the fleet was pinned to at start-up (first accepted server)."""
        return self._pinned_identity

    @property
    def counts_tokens_exactly(self) -> bool:
        return self._tokenizer is not None

    def server_states(self) -> dict[str, str]:
        return {
            s.url: "quarantined" if s.quarantine_reason else s.breaker.state.value for s in self._servers
        }

    # ----- start-up: manifest and identity -----

    def _start(self) -> tuple[ModelManifest, PreTrainedTokenizerBase | None, ServerIdentity]:
        local = self._local_manifest()
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
            raise BackendUnavailableError(f"no encoder server answered at start-up: {errors}")
        first = identities[next(iter(identities))]
        if local is not None:
            manifest, tokenizer = local
        else:
            manifest, tokenizer = self._profile_manifest(first), None
        self._manifest = manifest
        self._expected_name = _model_basename(self.model_ref)
        self._fleet_identity = first if local is None else None
        accepted: list[str] = []
        for server in self._servers:
            identity = identities.get(server.url)
            if identity is None:
                continue
            reason = self._identity_problem(identity)
            if reason:
                self._quarantine(server, reason)
                continue
            server.pinned = identity
            server.verified_at = self._clock()
            accepted.append(server.url)
        if not accepted:
            reasons = {s.url: s.quarantine_reason for s in self._servers if s.quarantine_reason}
            raise ModelMismatchError(
                f"no encoder server serves model {self.model_ref!r} version {manifest.version!r}: {reasons}"
            )
        pinned = next(s.pinned for s in self._servers if s.pinned is not None)
        if not pinned.versioned:
            log.warning(
                "encoder_server_unversioned", servers=accepted, model_path=pinned.model_path,
                note="launch sglang with --weight-version <manifest version> so that the model version "
                     "is checked exactly; now only the model name is",
            )
        log.info(
            "remote_encoder_ready", servers=self.urls, accepted=accepted, unreachable=sorted(errors),
            identity=pinned.key, model_version=manifest.version, dimension=manifest.dimension,
            exact_token_counts=tokenizer is not None, encoding_format=self.encoding_format,
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

    def _profile_manifest(self, identity: ServerIdentity) -> ModelManifest:
        """No local copy: a known profile by name, with a version that is the server's identity."""
        profile = profile_name_for(self.model_ref) or profile_name_for(identity.model_path)
        if profile is None:
            raise ModelNotFoundError(
                f"model {self.model_ref!r} has no local copy and no known profile, so its pooling, "
                "instruction and dimension are unknown: put its semsearch_manifest.json, config.json and "
                "tokenizer files in a local directory and pass that as --model"
            )
        identity_text = f"{identity.model_path}\n{identity.weight_version or ''}\n{identity.revision or ''}"
        digest = hashlib.sha256(identity_text.encode()).hexdigest()[:12]
        log.warning("remote_encoder_profile_manifest", profile=profile, identity=identity.key,
                    note="no local copy of the model: the version is derived from the server's identity, "
                         "so collections made in-process (version from the weights) are not served")
        return ModelManifest(**KNOWN_PROFILES[profile], name=profile, version=f"{profile}-remote-{digest}",
                             model_path=identity.model_path)

    def _identity_problem(self, identity: ServerIdentity) -> str | None:
        """Why a server with this identity must not serve our manifest; None when it may."""
        if self._fleet_identity is not None:  # profile mode: the version IS the first server's identity
            if not identity.same_as(self._fleet_identity):
                return f"serves {identity.key}, but the encoder is pinned to {self._fleet_identity.key}"
            return None
        if identity.versioned:
            # Launched with --weight-version: the version is the proof, whatever the path is called.
            if identity.weight_version != self._manifest.version:
                return (f"serves weight version {identity.weight_version!r}, but the manifest of "
                        f"{self.model_ref!r} has version {self._manifest.version!r}")
            return None
        if _model_basename(identity.model_path) != self._expected_name:
            return f"serves {identity.model_path!r}, not {self.model_ref!r}"
        return None

    def _fetch_identity(self, server: _Server, deadline: float | None) -> ServerIdentity:
        self._bump("identity_checks")
        timeout = self._request_timeout(deadline)
        for path in IDENTITY_PATHS:
            try:
                response = server.client.get(path, timeout=timeout)
            except httpx.TimeoutException as exc:
                raise _Transient(f"{server.url}{path}: timed out after {timeout:.2f}s") from exc
            except httpx.RequestError as exc:  # connection, protocol, decoding
                raise _Transient(f"{server.url}{path}: {type(exc).__name__}: {exc}") from exc
            status = response.status_code
            if status in (404, 405):
                continue
            if status in (401, 403):
                raise BackendUnavailableError(f"{server.url} rejected the API key ({status}) on {path}")
            if status in (408, 429) or status >= 500:
                raise _Transient(f"{server.url}{path}: HTTP {status}",
                                 retry_after=_retry_after_seconds(response))
            if status != 200:
                continue
            try:
                body = response.json()
            except ValueError as exc:
                raise _Transient(f"{server.url}{path}: invalid JSON") from exc
            identity = self._parse_identity(server, path, body)
            if identity is not None:
                if path in ("/model_info", "/get_model_info"):
                    identity = self._with_served_names(server, identity, timeout)
                return identity
        raise BackendUnavailableError(
            f"{server.url} does not say what model it serves (tried {', '.join(IDENTITY_PATHS)}): "
            "is it an embeddings server?"
        )

    @staticmethod
    def _parse_identity(server: _Server, path: str, body: Any) -> ServerIdentity | None:
        if not isinstance(body, dict):
            return None
        if path in ("/model_info", "/get_model_info") and body.get("model_path"):
            if body.get("is_generation") is True:
                raise ModelMismatchError(
                    f"{server.url} serves a generation model: launch sglang with --is-embedding"
                )
            model_path = str(body["model_path"])
            version = body.get("weight_version")
            return ServerIdentity(model_path, None if version is None else str(version),
                                  frozenset({model_path}))
        if path == "/info" and body.get("model_id"):  # text-embeddings-inference
            model_id = str(body["model_id"])
            sha = body.get("model_sha")
            return ServerIdentity(model_id, None, frozenset({model_id}),
                                  revision=None if sha is None else str(sha))
        if path == "/v1/models" and isinstance(body.get("data"), list) and body["data"]:
            card = body["data"][0]
            if isinstance(card, dict) and card.get("id"):
                names = {str(card["id"])} | ({str(card["root"])} if card.get("root") else set())
                return ServerIdentity(str(card.get("root") or card["id"]), None, frozenset(names),
                                      request_name=str(card["id"]))
        return None

    @staticmethod
    def _with_served_names(server: _Server, identity: ServerIdentity, timeout: float) -> ServerIdentity:
        """sglang may answer with its --served-model-name: accept the names /v1/models lists."""
        try:
            response = server.client.get("/v1/models", timeout=timeout)
            cards = response.json().get("data", []) if response.status_code == 200 else []
        except (httpx.HTTPError, ValueError, AttributeError):
            return identity
        names = {str(card["id"]) for card in cards if isinstance(card, dict) and card.get("id")
                 and (card.get("root") in (None, identity.model_path))}
        return dataclasses.replace(identity, served_names=identity.served_names | names)

    def _verify(self, server: _Server, deadline: float | None) -> None:
        """Re-read the server's identity; quarantine it when it changed or no longer fits."""
        identity = self._fetch_identity(server, deadline)
        reason = self._identity_problem(identity)
        if reason is None and server.pinned is not None and not identity.same_as(server.pinned):
            reason = f"changed from {server.pinned.key} to {identity.key} (hot-swapped)"
        if reason:
            self._quarantine(server, reason)
            raise _Quarantined(reason)
        if server.pinned is None:
            server.pinned = identity
        server.verified_at = self._clock()
        if server.quarantine_reason:
            log.warning("encoder_server_restored", server=server.url, identity=identity.key)
            server.quarantine_reason = None

    def _quarantine(self, server: _Server, reason: str, *, sticky: bool = False) -> None:
        server.quarantine_reason = reason
        server.sticky = server.sticky or sticky
        server.breaker.force_open()
        log.error("encoder_server_quarantined", server=server.url, reason=reason,
                  expected_model=self.model_ref, expected_version=self._manifest.version)

    # ----- encoding -----

    def _encode(self, texts: list[str], timeout_s: float | None) -> np.ndarray:
        if self._closed:
            raise BackendUnavailableError("the remote encoder is closed")
        dimension = self._manifest.dimension
        if not texts:
            return np.empty((0, dimension), dtype=np.float32)
        for i, text in enumerate(texts):
            if not text.strip():
                # sglang rejects it anyway; saying which one is kinder than its 400.
                raise InvalidInputError(f"text at index {i} is empty or whitespace only")
        deadline = None if timeout_s is None else self._clock() + timeout_s
        chunks = [texts[start : start + self.max_batch] for start in range(0, len(texts), self.max_batch)]
        if len(chunks) == 1:
            return self._encode_chunk(chunks[0], deadline)
        futures: list[Future[np.ndarray]] = [
            self._pool.submit(self._encode_chunk, chunk, deadline) for chunk in chunks
        ]
        try:
            return np.concatenate([future.result() for future in futures])
        finally:
            for future in futures:
                future.cancel()  # after a failure, chunks not yet started need not run

    def _encode_chunk(self, texts: list[str], deadline: float | None) -> np.ndarray:
        last_failed: list[_Server] = []

        def attempt() -> np.ndarray:
            # A quarantined server is skipped at once, without spending a retry.
            for _ in range(2 * len(self._servers) + 1):
                server = self._acquire_server(deadline, avoid=last_failed[-1:])
                try:
                    return self._post(server, texts, deadline)
                except _Quarantined:
                    continue
                except _Transient:
                    last_failed.append(server)
                    raise
                finally:
                    self._release(server)
            raise ModelMismatchError(f"no encoder server kept serving {self._manifest.version!r}")

        return cast(np.ndarray, self._retrying(attempt, deadline))

    def _retrying(self, fn: Callable[[], Any], deadline: float | None) -> Any:
        """Run `fn`, retrying `_Transient` failures; the last one becomes BackendUnavailableError."""
        jitter = wait_random_exponential(multiplier=self.backoff_base_s, max=self.backoff_max_s)

        def wait(state: RetryCallState) -> float:
            delay = jitter(state)
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, _Transient) and exc.retry_after is not None:
                delay = max(delay, min(exc.retry_after, RETRY_AFTER_CAP_S))
            if deadline is not None:
                delay = min(delay, max(0.0, deadline - self._clock()))
            return delay

        def before_sleep(state: RetryCallState) -> None:
            self._bump("retries")
            exc = state.outcome.exception() if state.outcome else None
            log.warning("encoder_request_retry", attempt=state.attempt_number, reason=str(exc),
                        sleep_s=round(state.upcoming_sleep, 3))

        retrying = Retrying(
            stop=stop_any(stop_after_attempt(self.retries + 1), _StopAtDeadline(deadline, self._clock)),
            wait=wait, retry=retry_if_exception_type(_Transient), before_sleep=before_sleep, reraise=True,
        )
        try:
            return retrying(fn)
        except _Transient as exc:
            if deadline is not None and deadline - self._clock() <= 0.001:
                raise BackendUnavailableError(f"encoder deadline exceeded: {exc}") from exc
            raise BackendUnavailableError(f"encoder failed after {self.retries + 1} attempts: {exc}") from exc

    def _acquire_server(self, deadline: float | None, avoid: Sequence[_Server]) -> _Server:
        """The least-loaded usable server (not the one that just failed, when there is a choice),
        with one of its concurrency slots. Fails fast when every circuit is open."""
        with self._lock:
            self._rr = (self._rr + 1) % len(self._servers)
            rotated = self._servers[self._rr :] + self._servers[: self._rr]
        # Servers due a probe first, so that a recovered server is probed back in promptly.
        ordered = sorted(
            rotated, key=lambda s: (s in avoid, s.breaker.state is BreakerState.CLOSED, s.inflight)
        )
        for server in ordered:
            if server.sticky or not server.breaker.try_acquire():
                continue
            # A probe re-reads the identity first (cheap, and a restarted server may serve another
            # model); the request that follows decides whether the circuit closes.
            due = self._clock() - server.verified_at >= self.identity_recheck_s
            if server.breaker.is_probing() or due or server.quarantine_reason:
                try:
                    self._verify(server, deadline)
                except _Quarantined:
                    continue
                except _Transient as exc:
                    self._server_failed(server, str(exc))
                    continue
                except BaseException:
                    server.breaker.release()
                    raise
            with self._lock:
                server.inflight += 1
            timeout = None if deadline is None else max(0.0, deadline - self._clock())
            if not server.slots.acquire(timeout=timeout):
                with self._lock:
                    server.inflight -= 1
                server.breaker.release()
                raise BackendUnavailableError(
                    f"encoder deadline exceeded waiting for a free slot on {server.url}")
            if avoid and server not in avoid:
                self._bump("failovers")
            return server
        if all(s.quarantine_reason for s in self._servers):
            raise ModelMismatchError(
                "every encoder server serves another model than "
                f"{self.model_ref!r} version {self._manifest.version!r}: "
                + "; ".join(f"{s.url} {s.quarantine_reason}" for s in self._servers)
            )
        retry_in = min(s.breaker.retry_in() for s in self._servers if not s.quarantine_reason)
        raise BackendUnavailableError(
            f"every encoder server is failing (circuit open); next probe in {retry_in:.1f}s"
        )

    def _release(self, server: _Server) -> None:
        server.slots.release()
        with self._lock:
            server.inflight -= 1

    def _request_timeout(self, deadline: float | None) -> float:
        if deadline is None:
            return self.timeout_s
        remaining = deadline - self._clock()
        if remaining <= 0.001:
            raise BackendUnavailableError("encoder deadline exceeded")
        return min(self.timeout_s, remaining)

    def _post(self, server: _Server, texts: list[str], deadline: float | None) -> np.ndarray:
        try:
            timeout = self._request_timeout(deadline)
        except BackendUnavailableError:
            server.breaker.release()
            raise
        assert server.pinned is not None
        body = {"model": server.pinned.model_name, "input": texts, "encoding_format": self.encoding_format}
        # Chinese stays UTF-8 (3 bytes a character) rather than \uXXXX escapes (6).
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        self._bump("requests", server.url)
        try:
            response = server.client.post("/v1/embeddings", content=content, timeout=timeout,
                                          headers={"Content-Type": "application/json"})
        except httpx.TimeoutException as exc:
            self._server_failed(server, f"timed out after {timeout:.2f}s")
            raise _Transient(f"{server.url}: timed out after {timeout:.2f}s") from exc
        except httpx.RequestError as exc:  # connection, protocol, decoding
            self._server_failed(server, f"{type(exc).__name__}: {exc}")
            raise _Transient(f"{server.url}: {type(exc).__name__}: {exc}") from exc
        status = response.status_code
        if status == 200:
            try:
                vectors = self._parse(server, response, len(texts))
            except _Transient as exc:
                self._server_failed(server, str(exc))
                raise
            self._server_ok(server)
            return vectors
        message = _error_message(response)
        if status == 429:
            self._server_ok(server)  # alive, only busy: no reason to open its circuit
            raise _Transient(f"{server.url}: HTTP 429 {message}", retry_after=_retry_after_seconds(response))
        if status == 408 or status >= 500:
            self._server_failed(server, f"HTTP {status}")
            raise _Transient(f"{server.url}: HTTP {status} {message}",
                             retry_after=_retry_after_seconds(response))
        self._server_ok(server)  # it answered; the request is what was wrong
        if status in (401, 403):
            raise BackendUnavailableError(f"{server.url} rejected the API key (HTTP {status}): {message}")
        if status == 404:
            raise BackendUnavailableError(
                f"{server.url}/v1/embeddings answered 404 ({message}): not an embeddings server, an unknown "
                "model name, or sglang launched without --is-embedding")
        raise InvalidInputError(f"the embedding server rejected the input (HTTP {status}): {message}")

    def _server_ok(self, server: _Server) -> None:
        if server.breaker.record_success():
            log.warning("encoder_circuit_closed", server=server.url)

    def _server_failed(self, server: _Server, reason: str) -> None:
        if server.breaker.record_failure():
            log.error("encoder_circuit_open", server=server.url, reason=reason,
                      reset_s=server.breaker.reset_s)

    def _parse(self, server: _Server, response: httpx.Response, expected: int) -> np.ndarray:
        try:
            body = response.json()
        except ValueError as exc:
            raise _Transient(f"{server.url}: response is not JSON") from exc
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            raise _Transient(f"{server.url}: response has no data list")
        assert server.pinned is not None
        model = body.get("model")
        if model is not None and str(model) not in server.pinned.served_names:
            # The server was swapped underneath us: these vectors must never be used.
            reason = f"answered with model {model!r}, expected {server.pinned.model_path!r} (hot-swapped)"
            self._quarantine(server, reason, sticky=True)
            raise _Quarantined(reason)
        data = body["data"]
        if len(data) != expected:
            raise _Transient(f"{server.url}: {len(data)} embeddings for {expected} inputs")
        dimension = self._manifest.dimension
        rows: list[Any] = [None] * expected
        for position, item in enumerate(data):
            index = item.get("index", position) if isinstance(item, dict) else None
            if not isinstance(index, int) or not 0 <= index < expected or rows[index] is not None:
                raise _Transient(f"{server.url}: bad or repeated index {index!r} in response")
            rows[index] = item.get("embedding")
        out = np.empty((expected, dimension), dtype=np.float32)
        if all(isinstance(row, list) for row in rows):
            lengths = {len(row) for row in rows}
            if lengths != {dimension}:
                self._dimension_mismatch(server, sorted(lengths))
            try:
                out[:] = np.asarray(rows, dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise _Transient(f"{server.url}: embedding is not a list of numbers") from exc
        else:
            for index, row in enumerate(rows):
                out[index] = self._decode_row(server, row, dimension)
        return self._normalize(server, out)

    def _decode_row(self, server: _Server, row: Any, dimension: int) -> np.ndarray:
        if isinstance(row, str):
            try:
                raw = base64.b64decode(row, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise _Transient(f"{server.url}: embedding is not valid base64") from exc
            if len(raw) % 4:
                raise _Transient(f"{server.url}: base64 embedding is not float32 ({len(raw)} bytes)")
            if len(raw) != 4 * dimension:
                self._dimension_mismatch(server, [len(raw) // 4])
            return np.frombuffer(raw, dtype="<f4")
        if isinstance(row, list):
            if len(row) != dimension:
                self._dimension_mismatch(server, [len(row)])
            try:
                return np.asarray(row, dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise _Transient(f"{server.url}: embedding is not a list of numbers") from exc
        raise _Transient(f"{server.url}: embedding is neither a float list nor base64")

    def _dimension_mismatch(self, server: _Server, got: list[int]) -> None:
        reason = (f"returned vectors of dimension {got}, but the manifest of {self.model_ref!r} "
                  f"says {self._manifest.dimension}: another model")
        self._quarantine(server, reason, sticky=True)
        raise _Quarantined(reason)

    def _normalize(self, server: _Server, vectors: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(vectors, axis=1)
        if not np.all(np.isfinite(norms)) or np.any(norms == 0):
            raise _Transient(f"{server.url}: zero or non-finite vector in response")
        if not self._manifest.normalize:
            return vectors
        off = np.abs(norms - 1.0) > self.norm_tolerance
        if off.any():
            self._bump("norm_flagged", count=int(off.sum()))
            log.warning("encoder_vector_norm_off", server=server.url, count=int(off.sum()),
                        min_norm=float(norms.min()), max_norm=float(norms.max()),
                        note="the server does not normalize: check its pooling/normalize config")
        # Defensive anyway: fp16 rounding leaves norms ~1e-3 off 1, and Milvus IP needs unit vectors.
        # Rows already unit to float32 precision are left as they are, bit for bit: the same model
        # gives the same vectors through this backend as in-process, and the same rankings.
        rescale = np.abs(norms - 1.0) > UNIT_NORM_EPSILON
        if rescale.any():
            vectors[rescale] /= norms[rescale, None]
        return vectors

    def _bump(self, name: str, url: str | None = None, *, count: int = 1) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + count)
            if url is not None:
                self.stats.per_server[url] = self.stats.per_server.get(url, 0) + count
