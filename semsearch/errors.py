"""Errors shared by every part of semsearch, each with the gRPC status it maps to.

The transport layers (gRPC service, CLI) translate these; nothing below them knows about gRPC.
"""

from __future__ import annotations

import grpc


class SemsearchError(Exception):
    """Base class: a failure with a reason a caller can read."""

    status_code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidInputError(SemsearchError, ValueError):
    """The caller sent something we will not process (empty query, bad filter, bad row)."""

    status_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(SemsearchError, LookupError):
    status_code = grpc.StatusCode.NOT_FOUND


class ModelNotFoundError(SemsearchError):
    """The configured model cannot be found locally or downloaded."""

    status_code = grpc.StatusCode.FAILED_PRECONDITION


class ModelMismatchError(SemsearchError):
    """A collection's vectors were made by another model version than the serving encoder's."""

    status_code = grpc.StatusCode.FAILED_PRECONDITION


class BackendUnavailableError(SemsearchError):
    """Milvus or a remote encoder is down or timed out; the caller may retry."""

    status_code = grpc.StatusCode.UNAVAILABLE


class OverloadedError(SemsearchError):
    """A bounded queue is full; the caller should back off."""

    status_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class CollectionNotLoadedError(BackendUnavailableError):
    """A collection is released or still loading (a restarted Milvus, a reopened Lite): transient."""


class StoreRefusedError(InvalidInputError):
    """Milvus refused the data or expression of this request: retrying it cannot help."""


class StoreError(SemsearchError):
    """Milvus failed in a way we do not recognise: not reported as UNAVAILABLE (a retryable code)."""

    status_code = grpc.StatusCode.INTERNAL


class ConflictError(SemsearchError):
    """A compare-and-swap lost: someone else changed the record since it was read. Re-read and retry."""

    status_code = grpc.StatusCode.ABORTED


def retryable(exc: BaseException) -> bool:
    """Worth retrying after a wait: the backend is down or recovering, or failed in a way we do not
    recognise. Never a refusal of the request itself (bad input, refused data, missing collection)."""
    return isinstance(exc, BackendUnavailableError | StoreError)


class RerankerNotConfiguredError(SemsearchError):
    """A request asks for reranking and the service has no reranker."""

    status_code = grpc.StatusCode.FAILED_PRECONDITION
