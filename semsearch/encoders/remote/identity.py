"""What model a server serves, and whether it may serve ours.

Each server kind says it at its own endpoint, which also tells where its embeddings API lives:

    GET /model_info | /get_model_info  sglang: {"model_path", "weight_version", "is_generation", ...}
    GET /info                          TEI: {"model_id", "model_sha", ...}
    GET /v1/models                     vLLM and other OpenAI-compatible servers: {"data": [{"id", "root"}]}
    GET /models                        infinity's default layout (no /v1): {"data": [{"id"}]}

Launched with `--weight-version`, an sglang server must report exactly the manifest version; any
other server must serve a model of the same base name (weaker, warned about). What a server
reports at first is then pinned: a later change (a hot swap) quarantines it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

import httpx
import structlog

from semsearch.encoders.remote.retry import Transient
from semsearch.encoders.remote.status import Verdict, classify_status, retry_after_seconds
from semsearch.errors import BackendUnavailableError, ModelMismatchError, ModelNotFoundError
from semsearch.manifest import KNOWN_PROFILES, ModelManifest, profile_name_for

log = structlog.get_logger(__name__)

# sglang's --weight-version default: a server launched without the flag gives no version to check.
UNVERSIONED = frozenset({"", "default"})
OPENAI_EMBEDDINGS = "/v1/embeddings"
SGLANG_INFO = ("/model_info", "/get_model_info")
# Where each server kind says what it serves, in the order they are tried, and where its
# embeddings endpoint then is.
IDENTITY_ENDPOINTS: dict[str, str] = {
    "/model_info": OPENAI_EMBEDDINGS,
    "/get_model_info": OPENAI_EMBEDDINGS,
    "/info": OPENAI_EMBEDDINGS,
    "/v1/models": OPENAI_EMBEDDINGS,
    "/models": "/embeddings",
}
IDENTITY_PATHS = tuple(IDENTITY_ENDPOINTS)


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
    # Where this server answers embeddings, relative to its base URL (layout, not identity).
    embeddings_path: str = OPENAI_EMBEDDINGS
    # The endpoint that told us (tried first next time).
    info_path: str = "/model_info"

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


def model_basename(model_ref: str) -> str:
    return model_ref.rstrip("/").rsplit("/", 1)[-1].lower()


def parse_identity(url: str, path: str, body: Any) -> ServerIdentity | None:
    """The identity in one endpoint's answer; None when the answer does not say."""
    if not isinstance(body, dict):
        return None
    embeddings_path = IDENTITY_ENDPOINTS.get(path, OPENAI_EMBEDDINGS)
    if path in SGLANG_INFO and body.get("model_path"):
        if body.get("is_generation") is True:
            raise ModelMismatchError(f"{url} serves a generation model: launch sglang with --is-embedding")
        model_path = str(body["model_path"])
        version = body.get("weight_version")
        return ServerIdentity(model_path, None if version is None else str(version), frozenset({model_path}),
                              embeddings_path=embeddings_path, info_path=path)
    if path == "/info" and body.get("model_id"):  # text-embeddings-inference
        model_id = str(body["model_id"])
        sha = body.get("model_sha")
        return ServerIdentity(model_id, None, frozenset({model_id}), revision=None if sha is None else str(sha),
                              embeddings_path=embeddings_path, info_path=path)
    if path in ("/v1/models", "/models") and isinstance(body.get("data"), list) and body["data"]:
        card = body["data"][0]
        if isinstance(card, dict) and card.get("id"):
            names = {str(card["id"])} | ({str(card["root"])} if card.get("root") else set())
            return ServerIdentity(str(card.get("root") or card["id"]), None, frozenset(names),
                                  request_name=str(card["id"]), embeddings_path=embeddings_path, info_path=path)
    return None


def served_names(identity: ServerIdentity, models_body: Any) -> ServerIdentity:
    """sglang may answer with its --served-model-name: accept the names its /v1/models lists."""
    cards = models_body.get("data", []) if isinstance(models_body, dict) else []
    if not isinstance(cards, list):
        return identity
    names = {str(card["id"]) for card in cards if isinstance(card, dict) and card.get("id")
             and (card.get("root") in (None, identity.model_path))}
    return dataclasses.replace(identity, served_names=identity.served_names | names)


def fetch_identity(client: httpx.Client, url: str, timeout: float, first: str | None = None) -> ServerIdentity:
    """Ask the server what it serves, trying each kind's endpoint (`first` before the others).

    Transient on a connection error, timeout, 408/429/5xx; BackendUnavailableError when the key
    is refused or no endpoint says."""
    paths = IDENTITY_PATHS if first is None else (first, *(p for p in IDENTITY_PATHS if p != first))
    for path in paths:
        try:
            response = client.get(path, timeout=timeout)
        except httpx.TimeoutException as exc:
            raise Transient(f"{url}{path}: timed out after {timeout:.2f}s") from exc
        except httpx.RequestError as exc:  # connection, protocol, decoding
            raise Transient(f"{url}{path}: {type(exc).__name__}: {exc}") from exc
        verdict = classify_status(response.status_code)
        if verdict is Verdict.UNAUTHORIZED:
            raise BackendUnavailableError(f"{url} rejected the API key ({response.status_code}) on {path}")
        if verdict in (Verdict.BUSY, Verdict.FAILING):
            raise Transient(f"{url}{path}: HTTP {response.status_code}",
                            retry_after=retry_after_seconds(response.headers))
        if response.status_code != 200:
            continue
        try:
            body = response.json()
        except ValueError as exc:
            raise Transient(f"{url}{path}: invalid JSON") from exc
        identity = parse_identity(url, path, body)
        if identity is not None:
            if path in SGLANG_INFO:
                identity = _with_served_names(client, identity, timeout)
            return identity
    raise BackendUnavailableError(
        f"{url} does not say what model it serves (tried {', '.join(IDENTITY_PATHS)}): "
        "is it an embeddings server?"
    )


def _with_served_names(client: httpx.Client, identity: ServerIdentity, timeout: float) -> ServerIdentity:
    try:
        response = client.get("/v1/models", timeout=timeout)
        body = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return identity
    return served_names(identity, body)


@dataclass(frozen=True)
class IdentityPolicy:
    """Which identities may serve the manifest.

    With a local copy of the model, the manifest's version is the truth: a versioned server must
    report it, an unversioned one must serve a model of the same base name. Without one (profile
    mode) the version IS the first server's identity, and every other server must be the same."""

    model_ref: str
    manifest_version: str
    fleet_identity: ServerIdentity | None = None

    def problem(self, identity: ServerIdentity) -> str | None:
        """Why a server with this identity must not serve our manifest; None when it may."""
        if self.fleet_identity is not None:
            if not identity.same_as(self.fleet_identity):
                return f"serves {identity.key}, but the encoder is pinned to {self.fleet_identity.key}"
            return None
        if identity.versioned:
            # Launched with --weight-version: the version is the proof, whatever the path is called.
            if identity.weight_version != self.manifest_version:
                return (f"serves weight version {identity.weight_version!r}, but the manifest of "
                        f"{self.model_ref!r} has version {self.manifest_version!r}")
            return None
        if model_basename(identity.model_path) != model_basename(self.model_ref):
            return f"serves {identity.model_path!r}, not {self.model_ref!r}"
        return None

    def changed(self, pinned: ServerIdentity | None, identity: ServerIdentity) -> str | None:
        """`problem`, or why a server that was accepted before must not be used any more."""
        reason = self.problem(identity)
        if reason is None and pinned is not None and not identity.same_as(pinned):
            reason = f"changed from {pinned.key} to {identity.key} (hot-swapped)"
        return reason


def profile_manifest(model_ref: str, identity: ServerIdentity) -> ModelManifest:
    """No local copy: a known profile by name, with a version that is the server's identity."""
    profile = profile_name_for(model_ref) or profile_name_for(identity.model_path)
    if profile is None:
        raise ModelNotFoundError(
            f"model {model_ref!r} has no local copy and no known profile, so its pooling, "
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

