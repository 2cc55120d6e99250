"""How Milvus failures reach semsearch: `translate_milvus_error` types them (transient, refused,
unknown), `is_connection_failure` tells a dead connection from a refused request or a slow server, and the two
refusals of the store's own (no tenant field, no BM25 field)."""

from __future__ import annotations

import grpc
from pymilvus import MilvusException
from pymilvus.exceptions import (
    AutoIDException,
    ConnectError,
    ConnectionNotExistException,
    DataNotMatchException,
    DataTypeNotMatchException,
    DataTypeNotSupportException,
    FieldsTypeException,
    FieldTypeException,
    MilvusUnavailableException,
    ParamError,
    PrimaryKeyException,
)

from semsearch.errors import (
    BackendUnavailableError,
    CollectionNotLoadedError,
    SemsearchError,
    StoreError,
    StoreRefusedError,
)


class TenantsUnavailableError(SemsearchError):
    """A tenant other than the default one, asked of a collection made before tenants existed."""

    status_code = grpc.StatusCode.FAILED_PRECONDITION


def no_tenants_reason(collection: str) -> str:
    return (f"collection {collection!r} was created before tenants existed and holds only the default "
            "tenant (tenant ''). To upgrade it, copy it into a collection with a tenant field: "
            "`semsearch promote <the same model> --collection <name> --force`")


class LexicalUnavailableError(SemsearchError):
    """Lexical or hybrid retrieval asked of a backend or collection without a BM25 field."""

    status_code = grpc.StatusCode.FAILED_PRECONDITION


class MilvusTimeoutError(BackendUnavailableError):
    """Milvus took longer than the call's deadline: a slow server (a restarted one warming up, a busy
    one), not a broken connection. UNAVAILABLE like any outage, but no reason to reconnect."""


def is_connection_failure(exc: BaseException) -> bool:
    """The connection itself failed (server gone, restarted, channel broken), not the request."""
    if isinstance(exc, MilvusTimeoutError):
        return False
    text = str(exc).lower()
    return any(marker in text for marker in ("fail connecting", "connect", "no channel", "rpcerror", "unavailable:"))


# Milvus error codes (merr, 2.3+) that mean "not now": not ready, unavailable, memory/request/disk
# limits, rate limit, collection/partition/segment not loaded, channel or query node not available.
_TRANSIENT_CODES = frozenset({1, 2, 3, 4, 7, 8, 101, 103, 201, 503, 601, 602, 901, 902, 903, 904, 905})
_INPUT_CODES = frozenset({1100, 1101})  # ParameterInvalid, ParameterMissing
_REFUSED_TYPES = (ParamError, DataTypeNotMatchException, DataNotMatchException, DataTypeNotSupportException,
                  PrimaryKeyException, FieldTypeException, FieldsTypeException, AutoIDException)
_UNAVAILABLE_TYPES = (ConnectError, MilvusUnavailableException, ConnectionNotExistException)
_NOT_LOADED_MARKERS = ("not loaded", "state 'released'", "not fully loaded")
_UNAVAILABLE_MARKERS = ("unavailable", "deadline", "timeout", "connect", "not ready", "rate limit", "too many",
                        "node not match", "node not found", "recovering")
_REFUSED_MARKERS = ("exceed", "invalid", "illegal", "expected dim", "parse", "malformed", "too long",
                    "out of range", "filter", "expr")


def translate_milvus_error(exc: MilvusException) -> SemsearchError:
    """A typed error: transient (BackendUnavailableError, retried), refused (StoreRefusedError,
    INVALID_ARGUMENT, never retried) or unknown (StoreError, INTERNAL)."""
    message = str(exc.message)
    text = message.lower()
    code = getattr(exc, "code", None)
    if any(marker in text for marker in _NOT_LOADED_MARKERS) or code in (101, 103, 201, 601):
        return CollectionNotLoadedError(f"Milvus unavailable: {message}")
    if isinstance(exc, _REFUSED_TYPES) or code in _INPUT_CODES or getattr(exc, "is_input_error", False):
        return StoreRefusedError(f"Milvus refused the request: {message}")
    if (isinstance(exc, _UNAVAILABLE_TYPES) or code in _TRANSIENT_CODES or getattr(exc, "retriable", False)
            or any(marker in text for marker in _UNAVAILABLE_MARKERS)):
        return BackendUnavailableError(f"Milvus unavailable: {message}")
    if any(marker in text for marker in _REFUSED_MARKERS):
        return StoreRefusedError(f"Milvus refused the request: {message}")
    return StoreError(f"Milvus error: {message}")
