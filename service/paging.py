"""Page tokens (AIP-158): opaque, HMAC-signed, bound to one query and one serving (model, collection) pair.

A token carries the offset of the next page in the stable order (score desc, id, chunk), the pair
that served the first page, what fixed the first page's ranking (the mode it ran in, the fusion and
the depth its hybrid candidate pool was sized for: every page fuses the same pool, so pages neither
repeat nor skip a hit), an expiry, and a digest of the request without its paging fields (with the
tenant the call resolved to). It is signed, not encrypted: it reveals nothing the response did
not (model version and collection are in every response).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from semsearch.config import Settings
from semsearch.errors import InvalidInputError
from semsearch.fusion import Fusion
from semsearch.v1 import search_pb2 as pb

log = structlog.get_logger(__name__)

MAX_TOKEN_CHARS = 1024
_MAC_BYTES = 16


@dataclass(frozen=True)
class Cursor:
    offset: int
    model_version: str
    collection: str
    mode: str = ""  # the mode the first page ran in ("" = tokens of older releases: the request's)
    fusion: Fusion | None = None  # the fusion of the first page (hybrid)
    pool_depth: int = 0  # the depth the hybrid candidate pool was sized for (0: by each page's depth)


def binding(request: pb.SearchDocumentsRequest, tenant: str) -> str:
    """Digest of what a page token must match: the request minus page_size/page_token, plus the tenant."""
    fixed = pb.SearchDocumentsRequest()
    fixed.CopyFrom(request)
    fixed.ClearField("page_size")
    fixed.ClearField("page_token")
    fixed.tenant = tenant
    return hashlib.sha256(fixed.SerializeToString(deterministic=True)).hexdigest()[:32]


def page_secrets(settings: Settings) -> list[bytes]:
    """The HMAC keys of page tokens, the signing one first: `page_token_secret` and then
    `page_token_secrets` (every one verifies, so secrets rotate without breaking tokens in flight);
    none set: one derived from the API keys (shared by replicas with the same keys), or random per
    process when there are none (tokens then work on the issuing replica only)."""
    configured = [settings.page_token_secret] if settings.page_token_secret is not None else []
    configured += settings.page_token_secrets
    if configured:
        return [secret.get_secret_value().encode("utf-8") for secret in configured]
    if settings.api_keys:
        material = "\n".join(sorted(k.key.get_secret_value() for k in settings.api_keys))
        return [hmac.new(b"semsearch page tokens", material.encode("utf-8"), hashlib.sha256).digest()]
    log.warning("page_token_secret_random",
                note="page tokens are valid on this process only: set page_token_secrets for several replicas")
    return [secrets.token_bytes(32)]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PageTokens:
    """Issues tokens signed with the first secret and opens tokens signed with any of them."""

    def __init__(self, secrets: bytes | Sequence[bytes], ttl_s: float) -> None:
        self._secrets = [secrets] if isinstance(secrets, bytes) else list(secrets)
        if not self._secrets:
            raise ValueError("page tokens need at least one secret")
        self.ttl_s = ttl_s

    @staticmethod
    def _mac(secret: bytes, payload: bytes) -> bytes:
        return hmac.new(secret, payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def issue(self, bound_to: str, cursor: Cursor) -> str:
        fields: dict[str, object] = {"o": cursor.offset, "m": cursor.model_version, "c": cursor.collection,
                                     "b": bound_to, "e": int(time.time() + self.ttl_s)}
        if cursor.mode:
            fields["md"] = cursor.mode
        if cursor.pool_depth:
            fields["p"] = cursor.pool_depth
        if cursor.fusion is not None:
            fields["f"] = dataclasses.asdict(cursor.fusion)
        payload = json.dumps(fields, separators=(",", ":")).encode()
        return f"{_b64(payload)}.{_b64(self._mac(self._secrets[0], payload))}"

    def open(self, token: str, bound_to: str, where: str = "page_token") -> Cursor:
        """The cursor of a token this service issued for this very query; INVALID_ARGUMENT otherwise."""
        if len(token) > MAX_TOKEN_CHARS:
            raise InvalidInputError(f"{where} is not a page token of this service")
        try:
            encoded, mac = token.split(".")
            payload = _unb64(encoded)
            given = _unb64(mac)
            # A list, not a generator: every secret is tried, so the timing does not tell which matched.
            valid = any([hmac.compare_digest(self._mac(secret, payload), given) for secret in self._secrets])
        except (ValueError, binascii.Error):
            valid = False
        if not valid:
            raise InvalidInputError(f"{where} is not a page token of this service")
        fields = json.loads(payload)
        if fields["b"] != bound_to:
            raise InvalidInputError(f"{where} belongs to another query: every field but page_size and "
                                    "page_token must equal the first page's request")
        if fields["e"] < time.time():
            raise InvalidInputError(f"{where} has expired: search again from the first page")
        return Cursor(offset=int(fields["o"]), model_version=str(fields["m"]), collection=str(fields["c"]),
                      mode=str(fields.get("md", "")), pool_depth=int(fields.get("p", 0)),
                      fusion=Fusion(**fields["f"]) if "f" in fields else None)
